"""Where a merged unit sits for Qwen's 2D rotary embedding: ``keep`` against ``unmerge``.

A merged unit of a Qwen2.5-VL tower has no single position. ``keep`` gives it its
destination's (ToMe's approximation: the tower then runs at the merged length throughout);
``unmerge`` gathers q/k/v back to every original unit inside each attention, rotates them at
their own positions and averages each group's outputs (exact positions, but attention at the
full length). This measures both on the Qwen2.5-VL shapes of ``bench_vlm_qwen.py`` (random
weights, the bundled photos, thresholds per DyMU budget):

* fidelity: per unit, the cosine similarity between the tower's output with merging (each
  merged token repeated over its units) and the unmodified tower's output, mean over the
  photos' units (1 = identical);
* speed: the tower's forward, vanilla and both ways, interleaved in one run (medians).

Run from the repository root::

    python scripts/bench_qwen_positions.py --threads 2   # small shape (the README's figures)
    python scripts/bench_qwen_positions.py --quick       # smoke run (CI)
"""

from __future__ import annotations

import argparse
import logging
import statistics

import torch
from bench_encoder import time_interleaved
from bench_vlm_qwen import BUDGETS, batch_of, build_model, calibrate, photo_inputs

from dymu.encoder.qwen import POSITIONS, expand_units
from dymu.integrations import hf_qwen_vl

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (what CI runs)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--reps", type=int, default=None, help="default 5 (quick: 1)")
    p.add_argument("--data", default=str(ROOT / "examples" / "images.json"))
    args = p.parse_args()
    args.shape, args.device, args.dtype, args.seed = (
        "quick" if args.quick else "small", "cpu", torch.float32, 0,
    )  # fmt: skip
    args.reps = args.reps or (1 if args.quick else 5)
    return args


def fidelity(out, reference: torch.Tensor) -> float:
    """Mean per-unit cosine similarity of the merged output (expanded) to the reference."""
    cos = torch.nn.functional.cosine_similarity(expand_units(out).float(), reference.float(), -1)
    return float(cos.mean())


def main() -> None:
    args = parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    visual = model.model.visual
    images, _ = photo_inputs(args)
    batch = batch_of(images)
    pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
    print(
        f"Qwen2.5-VL tower ({args.shape}): {visual.config.depth} blocks x "
        f"{visual.config.hidden_size}, {len(images)} photos at {tuple(grid[0].tolist())} "
        f"patches, fp32, cpu, {torch.get_num_threads()} threads, {args.reps} reps"
    )
    header = f"{'budget':<7} {'kept':>6} " + " ".join(
        f"{p + ' cos':>12} {p + ' ms':>11} {p + ' speedup':>15}" for p in POSITIONS
    )
    print(f"\n{header}\n{'-' * len(header)}")
    with torch.inference_mode():
        reference = visual(pixels, grid_thw=grid).pooler_output
        for budget in BUDGETS:
            thresholds = calibrate(model, [batch], BUDGETS[budget])
            encoders = {}
            for positions in POSITIONS:
                encoders[positions] = hf_qwen_vl.build_encoder(model, thresholds)
                encoders[positions].positions = positions
            outs = {p: enc(pixels, grid) for p, enc in encoders.items()}
            fns = {"vanilla": lambda: visual(pixels, grid_thw=grid)}
            fns.update({p: (lambda e=e: e(pixels, grid)) for p, e in encoders.items()})
            ms = time_interleaved(fns, args.reps, 1)
            kept = statistics.fmean(outs["keep"].host_lengths)
            cells = [
                f"{fidelity(outs[p], reference):>12.4f} {ms[p]:>11.1f} "
                f"{ms['vanilla'] / ms[p]:>14.2f}x"
                for p in POSITIONS
            ]
            print(f"{budget:<7} {kept:>6.1f} " + " ".join(cells))
    units = int(grid[0].prod()) // 4
    print(f"\nkept: LLM tokens per photo (of {units}); vanilla tower {ms['vanilla']:.1f} ms")


if __name__ == "__main__":
    main()
