"""The ``dymu-find-thresholds`` runs the CLI tests share: the arguments of a tiny calibration,
the one line a refused run prints, and a partial left by an interrupted run."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from conftest import TINY, interrupt_after

from dymu.calibration.job import CalibrationConfig, run_calibration
from dymu.cli import find_thresholds_main

MODEL = f"{TINY}-tome-24out"
FIND = "dymu-find-thresholds"
ROOT = Path(__file__).parent.parent


def cli(args, capsys) -> tuple[int, str, str]:
    code = find_thresholds_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The single line a refused run prints (tqdm's bar lines aside), no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith(FIND)]
    assert len(lines) == 1, err
    return lines[0]


def args(data, out, *extra) -> list[str]:
    base = ["--data", data, "--model", MODEL, "--pretrained", "none", "--batch-size", 2]
    return [str(a) for a in [*base, "--num-workers", 0, "--out", out, *extra]]


def config(data, out, **kw) -> CalibrationConfig:
    kw.setdefault("batch_size", 2)
    kw.setdefault("inference_sample", 0)
    return CalibrationConfig(str(data), MODEL, "none", out=str(out), **kw)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def interrupted(photo_dir, out: Path, after: int = 1, pause: float = 0.0) -> Path:
    """An ``OUT.partial`` from a run stopped by Ctrl-C after ``after`` batches."""
    stop = interrupt_after(after, [])

    def on_batch(batch, tokens):
        time.sleep(pause)
        stop(batch, tokens)

    with pytest.raises(KeyboardInterrupt):
        run_calibration(config(photo_dir / "images.json", out), on_batch=on_batch)
    partial = Path(f"{out}.partial")
    assert partial.exists() and not out.exists()
    return partial


def subset(photo_dir, tmp_path, name: str, images: list[str]) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps([{"image": str(photo_dir / "img" / i)} for i in images]))
    return path
