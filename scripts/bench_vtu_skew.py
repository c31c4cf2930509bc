"""Does a VTU batch cost its slots, whatever their spread between samples? (issue 20)

A batch of 8 prompts of ``--positions`` (400) full positions on a Llama-shaped LM (random,
seeded weights; SDPA, float32 on CPU): **skewed**, one prompt keeps 276 slots and seven keep
20, against **uniform**, every prompt keeps 52: the same 416 slots in all, the same attention
at 8 x 400 full positions. Each prompt's slots are contiguous runs of its positions (every
slot used). VTU runs norms, projections and MLPs on the batch's packed slots (``sum(M_i)``
rows), so both cost about the same; a language model padded to the longest sample runs the
skewed batch at 8 x 276 rows (dymu before it packed slots: 1.33x the uniform batch's time
with these defaults on 2 CPU threads).
Target: skewed / uniform at most 1.15. Prefills (``torch.inference_mode``, ``use_cache=False``)
are timed interleaved, order flipped every rep, medians.

Run from the repository root::

    python scripts/bench_vtu_skew.py --threads 2
    python scripts/bench_vtu_skew.py --quick          # smoke run (what CI runs)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

from bench_vtu import build_model, interleave  # noqa: E402

import dymu  # noqa: E402

TARGET = 1.15
SKEWED = [276] + [20] * 7
UNIFORM = [52] * 8


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--positions", type=int, default=400, help="full positions per prompt")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers of 128, 1 rep")
    args = p.parse_args()
    if args.quick:
        args.layers, args.hidden, args.reps, args.warmup = 2, 128, 1, 0
    heads = args.hidden // 64
    args.lm, args.heads, args.kv_heads, args.vocab = "llama", heads, heads, 32000
    args.intermediate = args.hidden * 11 // 4
    return args


def mapping_for(kept: list[int], positions: int) -> torch.Tensor:
    """(B, N): prompt ``b``'s positions fall into ``kept[b]`` contiguous runs."""
    return torch.stack([torch.arange(positions) * k // positions for k in kept])


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    lm = dymu.apply_vtu(build_model(args))
    embeds = torch.randn(len(SKEWED), args.positions, args.hidden)
    maps = {"skewed": mapping_for(SKEWED, args.positions)}
    maps["uniform"] = mapping_for(UNIFORM, args.positions)
    assert all(int((m.amax(1) + 1).sum()) == sum(UNIFORM) for m in maps.values())

    def prefill(mapping: torch.Tensor):
        return lambda: lm(inputs_embeds=embeds, vtu_mapping=mapping, use_cache=False)

    with torch.inference_mode():
        ms = interleave({k: prefill(m) for k, m in maps.items()}, args.reps, args.warmup)
    ratio = ms["skewed"] / ms["uniform"]
    verdict = "PASS" if ratio <= TARGET else "MISS"
    print(
        f"Llama {args.layers} x {args.hidden}, 8 prompts x {args.positions} positions, "
        f"{sum(UNIFORM)} slots; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'batch':<8} {'slots per prompt':<22} {'prefill ms':>10}")
    print(f"{'skewed':<8} {'276, 7 x 20':<22} {ms['skewed']:>10.1f}")
    print(f"{'uniform':<8} {'8 x 52':<22} {ms['uniform']:>10.1f}")
    print(f"skewed / uniform = {ratio:.2f} (target <= {TARGET}): {verdict}")


if __name__ == "__main__":
    main()
