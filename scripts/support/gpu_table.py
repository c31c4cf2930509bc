"""The table ``bench_gpu.py`` prints and writes: its rows, the time limit they run under,
sections that fail as rows, the device heading, JSON and a plot."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch


@dataclass
class Row:
    """One measurement: figures in ``unit`` (ms: lower is better; img/s, tok/s: higher)."""

    section: str
    model: str
    batch: int | None = None
    setting: str = ""
    vanilla: float | None = None
    dymu: float | None = None
    unit: str = ""
    bound: float | None = None  # FLOP bound of the speedup
    target: float | None = None  # the speedup to reach
    reference: float | None = None  # ToMe's own patch, in ``unit``
    note: str = ""  # an error, or why the row was skipped
    detail: dict = field(default_factory=dict)  # the sibling's own row, for the JSON

    @property
    def speedup(self) -> float | None:
        if self.vanilla is None or self.dymu is None:
            return None
        return self.vanilla / self.dymu if self.unit == "ms" else self.dymu / self.vanilla

    @property
    def met(self) -> bool | None:
        if self.target is None or self.speedup is None:
            return None
        return self.speedup >= self.target


class Clock:
    """Seconds since the start against ``--time-limit``."""

    def __init__(self, limit: float) -> None:
        self.start, self.limit = time.perf_counter(), limit
        self.interrupted = False  # stopped by Ctrl-C or SIGTERM: nothing more starts

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate: float = 0.0) -> bool:
        return not self.interrupted and self.elapsed() + estimate < self.limit

    def why_not(self) -> str:
        """The note of a part that did not start."""
        return "skipped: interrupted" if self.interrupted else "skipped: time limit"


def guarded(section: str, label: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """``fn``'s rows, its prints sent to stderr; an error row where it fails."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return fn()
    except (Exception, SystemExit) as exc:  # a failing part is a row; the others still run
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:100]
        return [Row(section, label, note=f"error: {type(exc).__name__}: {first}")]
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def device_info(device: str, dtype: str, vlm_dtype: str) -> dict[str, str]:
    """The device named as the table's heading names it, with the torch version and dtypes."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = [line.split(":", 1)[1].strip() for line in
                  (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
                  if line.startswith("model name")]  # fmt: skip
        name = f"{models[0] if models else platform.processor() or 'CPU'} ({os.cpu_count()} CPUs)"
    return {"device": name, "torch": torch.__version__, "dtype": dtype, "vlm_dtype": vlm_dtype}


def cell(value: float | None, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.1f} {unit}" if unit in ("ms", "tok/s") else f"{value:.0f} {unit}"


def print_table(rows: list[Row], info: dict[str, str], seconds: float) -> None:
    print(
        f"{info['device']} | torch {info['torch']} | {info['dtype']} (encoder, calibration, "
        f"ToMe), {info['vlm_dtype']} (VLM) | {seconds:.0f} s"
    )
    head = (
        f"{'section':<11} {'model':<36} {'batch':>5} {'setting':<15} {'vanilla':>11} "
        f"{'dymu':>11} {'ToMe own':>11} {'speedup':>7} {'bound':>6} {'target':>6} met"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.note:
            print(f"{r.section:<11} {r.model:<36} {r.note}")
            continue
        met = "-" if r.met is None else "yes" if r.met else "no"
        print(
            f"{r.section:<11} {r.model:<36} {r.batch:>5} {r.setting:<15} "
            f"{cell(r.vanilla, r.unit):>11} {cell(r.dymu, r.unit):>11} "
            f"{cell(r.reference, r.unit):>11} {cell(r.speedup, 'x'):>7} {cell(r.bound, 'x'):>6} "
            f"{cell(r.target, 'x'):>6} {met}"
        )
    print("speedup = vanilla ms / dymu ms, or dymu / vanilla for img/s and tok/s; bound = FLOPs")


def write_outputs(
    rows: list[Row], info: dict, seconds: float, json_path: str | None, plot_path: str | None,
    plot: Callable[[list, str], None],
) -> None:  # fmt: skip
    """The rows as JSON at ``json_path`` and drawn by ``plot`` at ``plot_path`` (each where
    given)."""
    if json_path:
        rows_out = [{**asdict(r), "speedup": r.speedup, "met": r.met} for r in rows]
        payload = {**info, "seconds": seconds, "command": sys.argv, "rows": rows_out}
        Path(json_path).write_text(json.dumps(payload, indent=1))
        print(f"JSON written to {json_path}")
    if plot_path:
        bars = [
            SimpleNamespace(model=f"{r.section}: {r.model.split('-tome')[0]}\n{r.setting}",
                            batch=r.batch,
                            speedup=r.speedup, bound=math.nan if r.bound is None else r.bound)
            for r in rows if r.speedup is not None
        ]  # fmt: skip
        plot(bars, plot_path)
