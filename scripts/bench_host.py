"""Time the host's share of an encoder forward: what a launch-bound GPU waits on.

At batch 1 a GPU finishes a ViT block's kernels faster than the host can issue them, so a
forward takes the host's time: Python, dispatch, launches, a compiled call's guards and
wrappers. ``bench_overhead.py`` counts the ops; this times them, where the arithmetic is
negligible: a tower of 24 blocks of width 64 at 64 px (65 tokens), random (seeded) weights,
thresholds calibrated on the bundled photos for 16 kept tokens, one CPU thread. The counts
do not show that a compiled merge step is a handful of kernels but a host cost of many ops
(dynamo's guards, AOT autograd's and inductor's wrappers); this does.

Rows per batch size, interleaved medians: ``vanilla`` (the tower's own forward), ``dymu``
(threshold merging, eager), ``dymu fused`` (the compiled step, a GPU's default),
``fixed-r`` and ``fixed-r fused`` (ToMe, the same schedule), ``no-merge`` (dymu's block loop,
nothing merged); with ``--whole`` also ``vanilla whole`` and ``fixed-r whole``, the forward
compiled as one graph (what a static-shape path would give; threshold merging reads lengths
inside the loop and cannot be one graph yet). Images of different lengths attend as
``auto`` does on a GPU (one padded call). ``us/block`` is the forward over the 24 blocks;
``+us/merge`` what each merging block adds over ``no-merge``; ``vs vanilla`` is vanilla's
time over the row's, the speedup a launch-bound GPU would show if its launches cost what a
CPU's tiny ops cost (on a GPU a launch costs a few microseconds more, a compiled step's
Triton launches more again).

Run from the repository root::

    python scripts/bench_host.py                 # batch 1 and 8, 100 reps
    python scripts/bench_host.py --quick         # fewer reps (what CI runs)
    python scripts/bench_host.py --whole         # with the whole-forward compiled rows
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

from bench_encoder import time_interleaved  # noqa: E402
from bench_overhead import QUICK_TOWER, encoder_variants, median_index, pick  # noqa: E402

import dymu  # noqa: E402
from dymu.engine.attention import auto_way  # noqa: E402
from dymu.sources.stream import load_rgb, open_source  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = 24
NAME = "ViT-T-8-host-tome-16out"


@contextmanager
def deep_tiny_tower() -> Iterator[None]:
    """``bench_overhead``'s tiny tower with 24 blocks, registered as ``ViT-T-8-host``."""
    import open_clip

    config = {**QUICK_TOWER, "vision_cfg": {**QUICK_TOWER["vision_cfg"], "layers": BLOCKS}}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ViT-T-8-host.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
        yield


def variants() -> tuple[dymu.DyMUEncoder, dict[str, torch.nn.Module], torch.Tensor, torch.Tensor]:
    """The calibrated encoder, the timed variants, the photos' pixels and kept counts."""
    enc = dymu.build_encoder(NAME, pretrained=None)
    photos = list(open_source(str(ROOT / "examples" / "images.json")).paths)
    pixels = torch.stack([enc.preprocess(load_rgb(p)) for p in photos])
    with torch.inference_mode():
        enc.set_thresholds(dymu.find_thresholds(enc, list(pixels.split(4))))
        kept = torch.cat([enc(p[None]).lengths for p in pixels])
    variants = encoder_variants(enc, auto_way("cuda"))  # one padded call, as on a GPU
    return enc, {"vanilla": enc.tower.module, **variants}, pixels, kept


def print_rows(bsz: int, ms: dict[str, float], merges: dict[str, int]) -> None:
    base = ms["no-merge"]
    for name, value in ms.items():
        extra = (value - base) * 1e3 / merges[name] if merges.get(name) else None
        print(
            f"{name:<14} {bsz:>5} {value:>9.2f} {value * 1e3 / BLOCKS:>9.0f} "
            f"{'-' if extra is None else f'{extra:.0f}':>10} {ms['vanilla'] / value:>9.2f}x"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--reps", type=int, default=None, help="timed reps (default 100; quick 10)")
    p.add_argument("--warmup", type=int, default=5, help="untimed reps (compiles included)")
    p.add_argument("--quick", action="store_true", help="fewer reps (what CI runs)")
    p.add_argument(
        "--whole",
        action="store_true",
        help="also vanilla and fixed-r with the whole forward compiled (inductor, fullgraph; "
        "minutes of compiling on a CPU): the host cost of one graph instead of one per step",
    )
    args = p.parse_args()
    reps = args.reps or (10 if args.quick else 100)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights
    torch.set_num_threads(1)
    start = time.perf_counter()
    with deep_tiny_tower():
        enc, models, pixels, kept = variants()
    if args.whole:
        models["vanilla whole"] = torch.compile(models["vanilla"], fullgraph=True)
        models["fixed-r whole"] = torch.compile(models["fixed-r"], fullgraph=True)
    print(f"{NAME}: {BLOCKS} blocks, width 64, 65 tokens; one thread; torch {torch.__version__}")
    print(f"{'':<14} {'batch':>5} {'ms':>9} {'us/block':>9} {'+us/merge':>10} {'vs vanilla':>10}")
    merging = sum(1 for r in enc.r if r > 0)
    merged = ["dymu", "dymu fused", "fixed-r", "fixed-r fused", "fixed-r whole"]
    merges = dict.fromkeys(merged, merging)
    with torch.inference_mode():
        for bsz in args.batch_sizes:
            batch = pixels[pick(list(range(len(pixels))), bsz, median_index(kept))]
            fns = {name: (lambda m=model, b=batch: m(b)) for name, model in models.items()}
            print_rows(bsz, time_interleaved(fns, reps, args.warmup), merges)
    print(
        f"\n+us/merge: over no-merge, per merging block ({merging} of {BLOCKS}); "
        f"total {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
