"""Benchmark DyMU encoders against their vanilla towers, and check the speedup is real.

For every model: build the encoder with random (seeded) weights, calibrate thresholds on the
bundled photos (``examples/images.json``), then time the vanilla tower (the unmodified
module's own forward, ``enc.tower.module(pixels)``) and the merging encoder (``enc(pixels)``)
interleaved in one run: warmup reps first, then vanilla/dymu reps alternating (the order
rotates every rep), and medians of each.

Models are dymu names (open_clip CLIP and SigLIP towers, e.g.
``ViT-SO400M-14-SigLIP-384-tome-192out``) or transformers SigLIP towers built from the
config of a published checkpoint, named ``hf-<shape>-tome-<K>out`` (shapes: see
``HF_SIGLIP``; ``hf-siglip-so400m-14-384`` is google/siglip-so400m-patch14-384, the tower of
LLaVA-OneVision).

Batch 1 uses one photo: by default the one whose final dymu token count is the median over
the bundled photos (``--b1-image`` picks another). Larger batches take the photos in list
order, cycled to fill the batch.

The FLOP bound is vanilla FLOPs / dymu FLOPs at the measured per-block token counts, per
image (``support/flops.py``: qkv ``2nD*3D``, out projection ``2nD^2``, attention ``4n^2D``
at the attention's n, MLP ``4nD*mlp`` at the post-merge n, patch embedding identical for
both), dymu FLOPs averaged over the batch's images. ``pad bound`` is the same at the batch's
padded length: what an implementation that pads every image to the longest would be limited
to (dymu packs tokens, so it is not). ``ratio`` = speedup / bound; targets: >= 0.85 at batch
1, >= 0.75 at larger batches. ``no-merge ms`` times dymu's own block loop with merging off,
so ``vs no-merge`` shows the gain of merging alone, apart from the attention kernel
(open_clip's ``nn.MultiheadAttention`` path vs ``scaled_dot_product_attention``).

``--fuse`` says whether merges run the compiled merge step (``dymu.engine.fused``): ``auto``
(the encoder's default: on CUDA only), ``on``, ``off``, or ``both``: the table's dymu runs
compiled and the eager merge is timed beside it, in the same run (listed with the other ways
below the table). Compiling happens in the untimed forwards before the timed ones.

Run from the repository root::

    python scripts/bench_encoder.py
    python scripts/bench_encoder.py --models ViT-B-16-tome-100out --batch-sizes 1 8 --reps 10
    python scripts/bench_encoder.py --threads 2 --plot bench.png
    python scripts/bench_encoder.py --quick   # small models, one rep: what CI runs
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from support import flops

import dymu
from dymu.engine.attention import ATTENTION_MODES
from dymu.sources.stream import load_rgb, open_source

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = [
    "ViT-B-16-tome-100out",
    "ViT-L-14-336-tome-72out",
    "ViT-SO400M-14-SigLIP-384-tome-192out",
    "hf-siglip-so400m-14-384-tome-192out",
]
QUICK_MODELS = [
    "ViT-B-16-tome-100out",
    "ViT-B-16-SigLIP-tome-100out",
    "hf-siglip-base-16-224-tome-100out",
]
# Default timed reps per model (ViT-L-14-336 at batch 8 takes ~10 s a forward on 2 cores,
# SO400M at 384 px ~25 s).
DEFAULT_REPS = {"ViT-B-16-tome-100out": 10, "ViT-L-14-336-tome-72out": 5}
SO400M_REPS = 3
# transformers SigLIP towers, shaped like published checkpoints (random weights)
HF_SIGLIP = {
    "hf-siglip-so400m-14-384": dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
    ),
    "hf-siglip-base-16-224": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
    ),
}
TARGETS = {1: 0.85}  # batch size -> minimum speedup/bound ratio
TARGET_OTHER = 0.75


@dataclass
class Row:
    model: str
    batch: int
    vanilla_ms: float
    dymu_ms: float
    plain_ms: float  # dymu's loop with merging off
    bound: float
    pad_bound: float
    final_tokens: float
    block_tokens: list[float]
    ways: dict[str, float] = field(default_factory=dict)  # ms of the other attention ways

    @property
    def speedup(self) -> float:
        return self.vanilla_ms / self.dymu_ms

    @property
    def merge_speedup(self) -> float:
        return self.plain_ms / self.dymu_ms

    @property
    def ratio(self) -> float:
        return self.speedup / self.bound

    @property
    def target(self) -> float:
        return TARGETS.get(self.batch, TARGET_OTHER)


def flop_bounds(enc: dymu.DyMUEncoder, block_lengths: torch.Tensor) -> tuple[float, float]:
    """(bound at per-image counts, bound at the batch's padded counts)."""
    dim, mlp_width, n0, patch = flops.vit_dims(enc.tower)
    blocks = block_lengths.shape[1]

    def image(counts: list[int]) -> float:
        return flops.vit_image(counts, n0, dim, mlp_width, patch)

    vanilla = image([n0] * blocks)
    per_image = [image(row) for row in block_lengths.tolist()]
    padded = image(block_lengths.max(0).values.tolist())
    return vanilla / statistics.fmean(per_image), vanilla / padded


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    reps: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Median ms of each function, interleaved; the order rotates every rep. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before the clock starts and stops."""
    times: dict[str, list[float]] = {key: [] for key in fns}
    items = list(fns.items())
    sync = sync or (lambda: None)
    for rep in range(warmup + reps):
        shift = rep % len(items)
        for key, fn in items[shift:] + items[:shift]:
            sync()
            start = time.perf_counter()
            fn()
            sync()
            elapsed = (time.perf_counter() - start) * 1e3
            if rep >= warmup:
                times[key].append(elapsed)
    return {key: statistics.median(values) for key, values in times.items()}


def build(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dymu.DyMUEncoder:
    """A dymu name, or ``hf-<shape>-tome-<K>out``: a transformers SigLIP tower (random)."""
    base, _, keep = name.partition("-tome-")
    if base not in HF_SIGLIP:
        return dymu.build_encoder(name, pretrained=None, device=device, dtype=dtype)
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(**HF_SIGLIP[base])
    model = SiglipVisionModel(config).eval().to(device=device, dtype=dtype)
    patches = (config.image_size // config.patch_size) ** 2
    enc = dymu.build_encoder(model, r_total=patches - int(keep.removesuffix("out")))
    enc.name = name
    return enc


def bench_model(name: str, args: argparse.Namespace, reps: int, warmup: int) -> list[Row]:
    enc = build(name, args.device, DTYPES[args.dtype])
    paths = list(open_source(str(args.data)).paths)
    pixels = torch.stack([enc.preprocess(load_rgb(p)) for p in paths])
    pixels = pixels.to(args.device, DTYPES[args.dtype])
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    calib = [pixels[i : i + 4] for i in range(0, len(pixels), 4)]
    enc.set_thresholds(dymu.find_thresholds(enc, calib))
    # dymu's own block loop with merging off: separates the merging gain from kernel choice
    plain = dymu.DyMUEncoder(enc.tower, [0] * enc.tower.num_blocks).eval()
    with torch.inference_mode():
        final = torch.cat([enc(p[None]).lengths for p in pixels]).cpu()
    b1_image = args.b1_image
    if b1_image is None:  # the photo with the median final token count
        b1_image = int(final.argsort()[(len(final) - 1) // 2])
    rows = []
    for bsz in args.batch_sizes:
        if bsz == 1:
            batch = pixels[b1_image : b1_image + 1]
        else:
            batch = pixels[torch.arange(bsz) % len(pixels)]

        def run_vanilla(batch: torch.Tensor = batch) -> object:
            with torch.inference_mode():
                return enc.tower.module(batch)

        def run_dymu(
            batch: torch.Tensor = batch,
            way: str = args.attention[0],
            fuse: bool | None = FUSE[args.fuse],
        ) -> object:
            enc.attention, enc.fuse = way, fuse
            with torch.inference_mode():
                return enc(batch)

        def run_plain(batch: torch.Tensor = batch) -> object:
            with torch.inference_mode():
                return plain(batch)

        fns = {"vanilla": run_vanilla, "dymu": run_dymu, "plain": run_plain}
        for way in args.attention[1:]:  # the other ways images of different lengths attend
            fns[way] = functools.partial(run_dymu, batch, way)
        if args.fuse == "both":
            fns["eager merge"] = functools.partial(run_dymu, batch, args.attention[0], False)
        if args.fuse != "off":
            run_dymu()  # compiles the merge step for this kind of batch, untimed
        ms = time_interleaved(fns, reps, warmup, sync)
        enc.attention, enc.fuse = args.attention[0], FUSE[args.fuse]
        with torch.inference_mode():
            out = enc(batch)
        bound, pad_bound = flop_bounds(enc, out.block_lengths)
        rows.append(
            Row(
                model=name,
                batch=bsz,
                vanilla_ms=ms["vanilla"],
                dymu_ms=ms["dymu"],
                plain_ms=ms["plain"],
                bound=bound,
                pad_bound=pad_bound,
                final_tokens=out.lengths.float().mean().item(),
                block_tokens=out.block_lengths.float().mean(0).tolist(),
                ways={way: ms[way] for way in fns if way not in ("vanilla", "dymu", "plain")},
            )
        )
    return rows


FUSE = {"auto": None, "on": True, "off": False, "both": True}  # --fuse: the encoder's fuse


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'model':<36} {'batch':>5} {'vanilla ms':>11} {'dymu ms':>9} {'speedup':>8} "
        f"{'no-merge ms':>11} {'vs no-merge':>11} "
        f"{'tokens':>7} {'bound':>6} {'pad bound':>9} {'ratio':>6} {'target':>6}  result"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        result = "PASS" if r.ratio >= r.target else "MISS"
        print(
            f"{r.model:<36} {r.batch:>5} {r.vanilla_ms:>11.1f} {r.dymu_ms:>9.1f} "
            f"{r.speedup:>7.2f}x {r.plain_ms:>11.1f} {r.merge_speedup:>10.2f}x "
            f"{r.final_tokens:>7.1f} {r.bound:>5.2f}x {r.pad_bound:>8.2f}x "
            f"{r.ratio:>6.2f} {r.target:>6.2f}  {result}"
        )
    print()
    print("speedup = vanilla tower / dymu; 'vs no-merge' = dymu's own loop without merging /")
    print("dymu (the part of the gain that comes from merging, not from the attention kernel).")
    print("mean tokens per image after each block:")
    for r in rows:
        blocks = " ".join(f"{v:.0f}" for v in r.block_tokens)
        print(f"  {r.model} b{r.batch}: {blocks}")


def print_ways(rows: list[Row], first: str) -> None:
    """dymu's time with each way images of different lengths attend (--attention)."""
    ways = list(rows[0].ways)
    print(f"\nother ways (dymu ms; x = time / {first}'s, measured in the same run):")
    print(f"{'model':<36} {'batch':>5} {first:>12}" + "".join(f" {w:>16}" for w in ways))
    for r in rows:
        cells = "".join(f" {r.ways[w]:>9.1f} {r.ways[w] / r.dymu_ms:>5.2f}x" for w in ways)
        print(f"{r.model:<36} {r.batch:>5} {r.dymu_ms:>12.1f}{cells}")


def plot(rows: list[Row], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path}")
        return
    labels = [f"{r.model.split('-tome')[0]}\nb{r.batch}" for r in rows]
    xs = range(len(rows))
    width = 0.4
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 2, 4))
    ax.bar([x - width / 2 for x in xs], [r.speedup for r in rows], width, label="measured")
    ax.bar([x + width / 2 for x in xs], [r.bound for r in rows], width, label="FLOP bound")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("speedup over vanilla")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def default_reps(name: str) -> int:
    return SO400M_REPS if "so400m" in name.lower() else 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=None, help="default: " + " ".join(DEFAULT_MODELS)
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 1 8")
    parser.add_argument(
        "--reps", type=int, default=None, help="timed reps (default: 10 for B, 5 for L, 3 SO400M)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed reps first (default 1)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (what CI runs): " + ", ".join(QUICK_MODELS) + "; batch 1 and 2, 1 rep",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--data", type=Path, default=ROOT / "examples" / "images.json")
    parser.add_argument(
        "--b1-image", type=int, default=None, help="photo index for batch 1 (default: median)"
    )
    parser.add_argument("--plot", default=None, help="save a bar chart here (needs matplotlib)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on cuda, else fp32"
    )
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["auto"],
        choices=ATTENTION_MODES,
        help="how images of different lengths attend (dymu.engine.attention); the first is the "
        "table's dymu, the others are timed beside it in the same run (default: auto)",
    )
    parser.add_argument(
        "--fuse",
        choices=sorted(FUSE),
        default="auto",
        help="merges run the compiled step: auto (on CUDA only), on, off, or both (compiled, "
        "with the eager merge timed beside it)",
    )
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "fp16" if args.device.startswith("cuda") else "fp32"
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 8])
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    rows = []
    start = time.perf_counter()
    for name in models:
        reps = args.reps or (1 if args.quick else DEFAULT_REPS.get(name, default_reps(name)))
        rows += bench_model(name, args, reps, warmup)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, {device}, {args.dtype}, {torch.get_num_threads()} threads")
    print_table(rows)
    if rows and rows[0].ways:
        print_ways(rows, args.attention[0])
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
