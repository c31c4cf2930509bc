"""Benchmark ``dymu.apply_tome`` (fixed-r ToMe) on ViT classifiers against the unpatched model.

Models (random weights, built from their configs, no downloads): timm ``vit_base_patch16_224``
and ``vit_large_patch16_224``, and transformers ``ViTForImageClassification`` at ViT-B/16
shape (``hf-vit-base-patch16-224``). For every model and batch size the unpatched model and
the model patched with each ``r`` run interleaved in one process (warmup reps, then the
variants alternate with the order rotating every rep); medians are reported, as throughput
ratios. Switching variants between calls (``apply_tome``/``remove_tome``) is included in the
timed call; it costs microseconds.

The FLOP bound is vanilla FLOPs / patched FLOPs per image at the token counts each block
really had (qkv, output projection and attention at the block's input length, the MLP at its
merged length; the patch embedding and head are left out, as in ``bench_encoder.py``).
``ratio`` = speedup / bound; the target is >= 0.85 at batch 64.

Run from the repository root::

    python scripts/bench_tome.py --threads 2
    python scripts/bench_tome.py --models timm:vit_base_patch16_224 --batch-sizes 64 --r 16
    python scripts/bench_tome.py --quick   # tiny models, one rep: what CI runs
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from bench_encoder import plot, time_interleaved
from support import flops

import dymu

DEFAULT_MODELS = [
    "timm:vit_base_patch16_224",
    "timm:vit_large_patch16_224",
    "hf-vit-base-patch16-224",
]
QUICK_MODELS = ["timm:tiny", "hf-vit-tiny"]
TARGETS = {64: 0.85}  # batch size -> minimum speedup/bound ratio


@dataclass
class Row:
    model: str
    batch: int
    r: int
    vanilla_ms: float
    tome_ms: float
    bound: float
    tokens_out: int
    theirs_ms: float | None = None  # facebookresearch/ToMe's own timm patch, where timed

    @property
    def speedup(self) -> float:
        return self.vanilla_ms / self.tome_ms

    @property
    def ratio(self) -> float:
        return self.speedup / self.bound


def build(name: str) -> tuple[torch.nn.Module, Callable[[torch.Tensor], object], int]:
    """(model, how to call it on pixels, image size)."""
    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        arch = name.split(":", 1)[1]
        if arch == "tiny":
            kwargs = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4)
            model = timm.models.vision_transformer.VisionTransformer(**kwargs)
        else:
            model = timm.create_model(arch, pretrained=False)
        return model.eval(), model, model.patch_embed.img_size[0]
    from transformers import ViTConfig, ViTForImageClassification

    if name == "hf-vit-tiny":
        config = ViTConfig(image_size=64, patch_size=8, hidden_size=64, intermediate_size=256)
        config.num_hidden_layers, config.num_attention_heads = 4, 4
    elif name == "hf-vit-base-patch16-224":
        config = ViTConfig()  # google/vit-base-patch16-224's shape
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(DEFAULT_MODELS)}")
    config.num_labels = 1000
    model = ViTForImageClassification(config).eval()
    return model, lambda x: model(pixel_values=x), config.image_size


def theirs(model: torch.nn.Module) -> torch.nn.Module | None:
    """facebookresearch/ToMe's own timm patch on a copy sharing ``model``'s weights (set
    ``.r`` before a call); None where the ``tome`` package is missing or the model isn't timm's."""
    try:
        import timm
        import tome
    except ImportError:
        return None
    if not isinstance(model, timm.models.vision_transformer.VisionTransformer):
        return None
    from support.llava_shapes import shared_copy

    copy = shared_copy(model)
    tome.patch.timm(copy)
    return copy


def run_theirs(model: torch.nn.Module, r: int, x: torch.Tensor) -> object:
    model.r = r
    return model(x)


def bench(
    name: str,
    batches: list[int],
    rs: list[int],
    reps: int,
    warmup: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    own: bool = False,
) -> list[Row]:
    """Rows per batch and r; ``own``: ToMe's own patch timed beside, where importable."""
    model, call, size = build(name)
    model.to(device, dtype)
    ref = theirs(model) if own else None
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    tower = dymu.build_encoder(model).tower  # the tower's shape, for FLOP counts
    width, mlp_width, n0, patch = flops.vit_dims(tower)
    vanilla_flops = flops.vit_image([n0] * tower.num_blocks, n0, width, mlp_width, patch)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size).to(device, dtype)

        def variant(r: int | None, x: torch.Tensor = x) -> Callable[[], object]:
            def run() -> object:
                if r is None:
                    dymu.remove_tome(model)
                elif model.__dict__.get("dymu_tome") is None or model.dymu_tome.r[0] != r:
                    dymu.apply_tome(model, r=r)
                return call(x)

            return run

        fns = {"vanilla": variant(None), **{f"r{r}": variant(r) for r in rs}}
        if ref is not None:
            fns.update({f"tome r{r}": functools.partial(run_theirs, ref, r, x) for r in rs})
        with torch.inference_mode():
            ms = time_interleaved(fns, reps, warmup, sync)
            for r in rs:
                dymu.apply_tome(model, r=r)
                call(x[:1])
                counts = [int(v[0]) for v in model.dymu_tome.block_lengths]
                bound = vanilla_flops / flops.vit_image(counts, n0, width, mlp_width, patch)
                rows.append(Row(name, batch, r, ms["vanilla"], ms[f"r{r}"], bound, counts[-1],
                                ms.get(f"tome r{r}")))  # fmt: skip
        dymu.remove_tome(model)
    return rows


def print_table(rows: list[Row]) -> None:
    print(
        "| model | batch | r | tokens out | vanilla ms | tome ms | speedup | FLOP bound | ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        target = TARGETS.get(row.batch)
        mark = f" (target {target})" if target else ""
        print(
            f"| {row.model} | {row.batch} | {row.r} | {row.tokens_out} | {row.vanilla_ms:.1f} | "
            f"{row.tome_ms:.1f} | {row.speedup:.2f} | {row.bound:.2f} | {row.ratio:.2f}{mark} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help=f"default: {DEFAULT_MODELS}")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--r", nargs="+", type=int, default=[8, 16], help="ToMe r per block")
    parser.add_argument("--reps", type=int, default=None, help="timed reps (default 5, b64: 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--plot", default=None, help="write a bar chart here (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="tiny models, one rep (CI)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    batches = [1, 4] if args.quick else args.batch_sizes
    rs = [2] if args.quick else args.r
    rows = []
    for name in models:
        for batch in batches:
            reps = args.reps or (1 if args.quick else 3 if batch >= 32 else 5)
            rows += bench(name, [batch], rs, reps, args.warmup)
    print_table(rows)
    if args.plot:
        for row in rows:  # the plot labels bars by model and batch
            row.model = f"{row.model} r{row.r}"
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
