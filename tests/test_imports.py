"""``import dymu`` is lazy: the heavy libraries load only when a name that needs them is used."""

from __future__ import annotations

import subprocess
import sys

import pytest

import dymu

HEAVY = ("open_clip", "transformers", "timm", "torch")


def loaded_after(code: str) -> list[str]:
    """The heavy libraries a fresh interpreter has imported after running ``code``."""
    check = f"{code}\nimport sys; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


@pytest.mark.parametrize(
    "module", ["dymu", "dymu.errors", "dymu.encoder.names", "dymu.engine.schedule"]
)
def test_light_imports_load_no_heavy_library(module):
    assert loaded_after(f"import {module}") == []


def test_a_light_name_stays_light_and_a_heavy_one_loads_its_library():
    assert loaded_after("from dymu import DyMUError, make_schedule") == []
    assert "open_clip" in loaded_after("import dymu; dymu.build_encoder")


def test_submodules_resolve_as_attributes():
    code = "import dymu; assert dymu.schedule.make_schedule is dymu.make_schedule"
    assert loaded_after(code) == []
    assert "torch" in loaded_after("import dymu; dymu.thresholds.Thresholds")


def test_every_public_name_resolves():
    assert set(dymu.__all__) == {*dymu._LAZY, "__version__"}
    for name in dymu.__all__:
        value = getattr(dymu, name)
        if name != "__version__":
            assert value.__name__ == name
    assert set(dymu.__all__) <= set(dir(dymu))
    with pytest.raises(AttributeError, match="no_such_name"):
        dymu.no_such_name  # noqa: B018
