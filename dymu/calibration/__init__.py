"""Calibration: finding per-block thresholds on an image set.

``loop`` is the batch rule over a stream of batches (the one calibration loop and its
metadata), ``config`` a run's settings checked before any work, ``job`` a whole run
(checkpoints, resume, torchrun, files), ``checkpoint`` the ``.partial`` progress and the run
lock, ``coverage`` which images a file counted (so ``merge`` refuses overlaps),
``inference_counts`` what the found thresholds keep per image.
"""
