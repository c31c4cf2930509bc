"""``scripts/bench_gpu.py`` on a GPU machine lent for minutes: a unit stopped by Ctrl-C or
SIGTERM (``timeout``) must not take the units already measured with it, and nothing more
starts after it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_gpu  # noqa: E402
from support.gpu_table import Clock, Row  # noqa: E402


def units(stop_at: str | None):
    done: list[str] = []

    def run(item: str) -> list[Row]:
        if item == stop_at:
            raise KeyboardInterrupt
        done.append(item)
        return [Row("s", item, batch=1, vanilla=2.0, dymu=1.0, unit="ms")]

    return done, run


def test_an_interrupted_unit_keeps_the_units_before_it_and_starts_none_after():
    clock = Clock(limit=1e9)
    done, run = units(stop_at="b")
    rows = bench_gpu.run_units(clock, "s", ["a", "b", "c"], run)
    assert done == ["a"]  # c never started
    assert [(r.model, r.note) for r in rows] == [
        ("a", ""),
        ("b", "interrupted"),
        ("c", "skipped: interrupted"),
    ]
    assert rows[0].speedup == 2.0
    assert clock.interrupted and not clock.allows()
    later = bench_gpu.run_units(clock, "t", ["d"], units(stop_at=None)[1])
    assert [(r.model, r.note) for r in later] == [("d", "skipped: interrupted")]


def test_without_an_interrupt_every_unit_runs_and_past_the_limit_none_does():
    done, run = units(stop_at=None)
    rows = bench_gpu.run_units(Clock(limit=1e9), "s", ["a", "b"], run)
    assert done == ["a", "b"] and all(r.note == "" for r in rows)
    rows = bench_gpu.run_units(Clock(limit=0.0), "s", ["a"], run)
    assert [(r.model, r.note) for r in rows] == [("a", "skipped: time limit")]
