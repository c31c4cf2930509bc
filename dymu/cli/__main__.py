"""``python -m dymu.cli ARGS`` is ``dymu-find-thresholds ARGS`` (e.g. ``torchrun -m dymu.cli``)."""

import sys

from . import find_thresholds_main

sys.exit(find_thresholds_main())
