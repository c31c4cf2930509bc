"""Benchmark DyMU end to end in a Qwen2.5-VL-shaped model (``bench_vlm.py --family qwen2_5_vl``).

The model is a transformers ``Qwen2_5_VLForConditionalGeneration`` built from configs with
random (seeded) weights. ``--shape 7b`` (the default on ``--device cuda``, bf16) has
Qwen2.5-VL-7B's shapes: a 32-block tower (width 1280, 16 heads, SwiGLU MLP 3420, 112-pixel
windows, full attention in blocks 7/15/23/31) and a 28-layer LM (hidden 3584, 28 heads, 4
KV heads, MLP 18944, vocab 152064), at a 1024x1024 photo processed to 74x74 patches (5476
patches, 1369 LLM tokens). ``--small`` (the default on CPU) is a narrow 8-block tower
(width 128) at a 532-pixel photo (38x38 patches, 361 LLM tokens) and a 6-layer LM of hidden
512, so that, as at 7B (about 70%), most of the prefill is the language model; ``--quick``
is a tiny smoke run (what CI runs).

Inputs are the bundled photos (``--data``), squashed to the square image size and run through
Qwen's own image processor; a prompt is ``<vision_start>``, one ``<image_pad>`` per unit,
``<vision_end>`` and 8 text tokens. Per budget, thresholds are calibrated on the photos with
the batch rule (``dymu.find_thresholds``) for the fraction of units the DyMU paper keeps in
LLaVA-1.5: **low** 89/576, **mid** 195/576, **high** 394/576 (merges per 16-unit window);
the threshold rule then gives every photo its own count, printed as mean (min-max).

Models share one set of weights (deep copies sharing parameters): ``vanilla`` (unpatched)
and one ``dymu+VTU`` per budget (``dymu.apply(model, thresholds)``). A check pass runs a
never-merge copy, whose first-token logits must equal vanilla's. Interleaved in one run
(medians of ``--reps``): prefill (``model(**inputs, use_cache=True, logits_to_keep=1)``: time
to first token, tower included) and greedy ``generate()`` of ``--new-tokens`` tokens.

``bound`` = vanilla prefill FLOPs / dymu's (per sequence, averaged over the batch;
``support/flops.py``): the tower (the patch embedding, projections and MLP per block at the
block's tokens, attention over each frame or window, dymu's windows taken at the frame's
kept share; the patch merger), and the LM as ``flops.lm`` counts it (VTU: projections and
MLP at the M slots, attention at N). Targets (issue 21, on an H100 at batch 1 and 16, low
budget): prefill at least 2x, generate at least 1.0x; on CPU the scaled-down shape at 0.8 of
the FLOP bound.

``--compile`` compiles every model's language model in place (inductor, dynamic shapes:
``support/compiled.py``), vanilla's and each dymu's alike; the towers run as they are. The
untimed warmup reps (at least 2) compile.

Run from the repository root::

    python scripts/bench_vlm.py --family qwen2_5_vl --threads 2        # CPU, small shape
    python scripts/bench_vlm.py --family qwen2_5_vl --device cuda      # 7b shapes, bf16
    python scripts/bench_vlm.py --family qwen2_5_vl --device cuda --compile --budgets low
    python scripts/bench_vlm.py --family qwen2_5_vl --quick            # smoke run (CI)
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from pathlib import Path

import torch
from bench_encoder import time_interleaved
from support import flops
from support.compiled import compile_in_place
from torch import nn

import dymu
from dymu.encoder.model import EncoderOutput
from dymu.integrations import hf_qwen_vl
from dymu.sources.stream import load_rgb, open_source

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE, VIDEO, START, END = 151655, 151656, 151652, 151653
TEXT_AFTER = 8
BUDGETS = {"low": 89 / 576, "mid": 195 / 576, "high": 394 / 576}  # units kept
SHAPES = {
    "7b": dict(
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                    out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31]),
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
        image=1036,
    ),
    "small": dict(
        vision=dict(depth=8, hidden_size=128, intermediate_size=352, num_heads=4,
                    out_hidden_size=512, fullatt_block_indexes=[3, 7]),
        text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=152064),
        image=532,
    ),
    "quick": dict(
        vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                    out_hidden_size=64, fullatt_block_indexes=[1, 3]),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=152064),
        image=224,
    ),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="qwen2_5_vl", help=argparse.SUPPRESS)
    p.add_argument("--shape", choices=list(SHAPES), default=None, help="default: 7b on cuda")
    p.add_argument("--small", action="store_true", help="--shape small (the CPU figures)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (what CI runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="bf16 on cuda, else fp32")
    p.add_argument(
        "--batch-sizes", nargs="+", type=int, default=None, help="default 1 16 (CPU: 1 8)"
    )
    p.add_argument("--budgets", nargs="+", choices=list(BUDGETS), default=list(BUDGETS))
    p.add_argument("--reps", type=int, default=None, help="default 5 (batch 1: 10)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=None, help="default 32 on cuda, else 4")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--data", type=Path, default=ROOT / "examples" / "images.json")
    p.add_argument("--seed", type=int, default=0)
    compile_help = "compile the language models (inductor, dynamic shapes), vanilla's too"
    p.add_argument("--compile", action="store_true", help=compile_help)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.shape is None:
        args.shape = "quick" if args.quick else "small" if args.small or not cuda else "7b"
    args.dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 16] if cuda else [1, 8])
    args.new_tokens = args.new_tokens or (32 if cuda else 2 if args.quick else 4)
    if args.quick:
        args.reps, args.warmup = args.reps or 1, 0
    if args.compile:
        args.warmup = max(args.warmup, 2)  # the compiles happen in untimed reps
    return args


def build_model(args: argparse.Namespace) -> nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    shape = SHAPES[args.shape]
    vision = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112)
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    heads = shape["text"]["num_attention_heads"]
    half = shape["text"]["hidden_size"] // heads // 2  # M-RoPE sections fill half a head
    rope["mrope_section"] = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    config = Qwen2_5_VLConfig(
        vision_config={**vision, **shape["vision"]},
        text_config={**shape["text"], "rope_parameters": rope, "max_position_embeddings": 8192},
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
        vision_end_token_id=END,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=args.dtype, attn_implementation="sdpa"
        )
    model.generation_config.pad_token_id = 0
    return model.eval()


def photo_inputs(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Per photo of ``args.data``: Qwen's processor output at the shape's square size (one
    grid for all); and the photos in batches of 4 (what calibration takes)."""
    from transformers import Qwen2VLImageProcessor

    side = SHAPES[args.shape]["image"]
    processor = Qwen2VLImageProcessor(min_pixels=side * side, max_pixels=side * side)
    out = []
    for path in open_source(str(args.data)).paths:
        got = processor(images=[load_rgb(path).resize((side, side))], return_tensors="pt")
        pixels = got["pixel_values"].to(args.device, args.dtype)
        out.append({"pixel_values": pixels, "image_grid_thw": got["image_grid_thw"]})
    return out, [batch_of(out[i : i + 4]) for i in range(0, len(out), 4)]


def model_inputs(images: list[dict], device: str) -> dict:
    """A batch of prompts, one photo each."""
    grid = torch.cat([i["image_grid_thw"] for i in images])
    units = int(grid[0].prod()) // 4
    row = [START] + [IMAGE] * units + [END] + list(range(10, 10 + TEXT_AFTER))
    ids = torch.tensor([row] * len(images), device=device)
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=(ids == IMAGE).int(),
        pixel_values=torch.cat([i["pixel_values"] for i in images]),
        image_grid_thw=grid,
    )


def calibrate(model: nn.Module, images: list[dict], keep: float) -> dymu.Thresholds:
    """Thresholds keeping about ``keep`` of each window's 16 units on the photos."""
    probe = hf_qwen_vl.build_encoder(model)
    units = probe.tower.window_units
    merges = min(units - 1, round(units * (1 - keep)))
    enc = hf_qwen_vl.build_encoder(model, r_total=merges)
    return dymu.find_thresholds(enc, images)


def shared_copy(model: nn.Module) -> nn.Module:
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def prefill_flops(model: nn.Module, out: EncoderOutput | None, n_full: int, grid) -> float:
    """Mean prefill FLOPs per sequence: tower, then LM (VTU: M slots, attention at N)."""
    vision, lm = model.config.vision_config, flops.lm_shape(model.config.text_config)
    if out is None:
        return flops.qwen_tower(vision, grid, None) + flops.lm(lm, n_full, n_full, n_full)
    units0 = grid[1] * grid[2] // vision.spatial_merge_size**2
    per_frame = [  # VTU: the frame's kept units are its slots
        flops.qwen_tower(vision, grid, counts) + flops.lm(lm, n_full, n_full - units0 + k, n_full)
        for k, counts in zip(out.host_lengths, out.block_lengths.tolist(), strict=True)
    ]
    return statistics.fmean(per_frame)


def never(thresholds: dymu.Thresholds) -> dymu.Thresholds:
    return dymu.Thresholds.from_values(
        torch.ones(thresholds.num_blocks), thresholds.r, thresholds.metadata
    )


def batch_of(images: list[dict]) -> dict:
    return {
        "pixel_values": torch.cat([i["pixel_values"] for i in images]),
        "image_grid_thw": torch.cat([i["image_grid_thw"] for i in images]),
    }


def check_unmerged(model: nn.Module, thresholds: dymu.Thresholds, inputs: dict) -> None:
    """Never-merge dymu+VTU must be the model: first-token logits to float rounding."""
    unmerged = dymu.apply(shared_copy(model), never(thresholds))
    want = model(**inputs, logits_to_keep=1).logits.float()
    got = unmerged(**inputs, logits_to_keep=1).logits.float()
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 0.1
    if (want - got).abs().max() > tol * want.abs().max().clamp(min=1):
        raise SystemExit("check failed: dymu+VTU with nothing merged differs from the model")


def bench_batch(models: dict, encoders: dict, images: list[dict], args) -> list[dict]:
    """Rows (vanilla first) for one batch: prefill and generate, interleaved, with bounds."""
    inputs = model_inputs(images, args.device)
    n_full = inputs["input_ids"].shape[1]
    grid = tuple(images[0]["image_grid_thw"][0].tolist())
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    fns = {}
    for name, model in models.items():
        fns[f"prefill {name}"] = lambda m=model: m(**inputs, use_cache=True, logits_to_keep=1)
        fns[f"generate {name}"] = lambda m=model: m.generate(**inputs, **gen)
    with torch.inference_mode():
        outs = {
            k: enc(inputs["pixel_values"], inputs["image_grid_thw"]) for k, enc in encoders.items()
        }
        reps = args.reps or (10 if len(images) == 1 else 5)
        ms = time_interleaved(fns, reps, args.warmup, sync)
    rows = []
    for name in models:
        out = outs.get(name)
        kept = list(out.host_lengths) if out is not None else [grid[1] * grid[2] // 4] * len(images)
        cost = prefill_flops(models[name], out, n_full, grid)
        rows.append(dict(model=name, batch=len(images), kept=kept, prefill=ms[f"prefill {name}"],
                         generate=ms[f"generate {name}"], flops=cost))  # fmt: skip
    return rows


def print_table(rows: list[dict], new_tokens: int) -> None:
    header = (
        f"{'model':<15} {'batch':>5} {'LLM image tokens':>18} {'prefill ms':>11} {'speedup':>8} "
        f"{'bound':>6} {'ratio':>6} {'gen tok/s':>10} {'speedup':>8}"
    )
    print(header)
    print("-" * len(header))
    base = None
    for r in rows:
        base = r if r["model"] == "vanilla" else base
        t = r["kept"]
        seen = f"{statistics.fmean(t):.1f} ({min(t)}-{max(t)})" if len(set(t)) > 1 else str(t[0])
        speedup, bound = base["prefill"] / r["prefill"], base["flops"] / r["flops"]
        tps = r["batch"] * new_tokens / r["generate"] * 1e3
        print(
            f"{r['model']:<15} {r['batch']:>5} {seen:>18} {r['prefill']:>11.1f} {speedup:>7.2f}x "
            f"{bound:>5.2f}x {speedup / bound:>6.2f} {tps:>10.1f} "
            f"{base['generate'] / r['generate']:>7.2f}x"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = build_model(args)
    images, batches = photo_inputs(args)
    models, encoders = {"vanilla": model}, {}
    with torch.inference_mode():
        for budget in args.budgets:
            thresholds = calibrate(model, batches, BUDGETS[budget])
            name = f"dymu+VTU {budget}"
            encoders[name] = hf_qwen_vl.build_encoder(model, thresholds)
            models[name] = dymu.apply(shared_copy(model), thresholds)
        check_unmerged(model, thresholds, model_inputs(images[:1], args.device))
        first = next(iter(encoders.values()))
        kept = [
            sum(
                first(
                    **{"pixel_values": i["pixel_values"], "grid_thw": i["image_grid_thw"]}
                ).host_lengths
            )
            for i in images
        ]
    median = images[sorted(range(len(kept)), key=kept.__getitem__)[(len(kept) - 1) // 2]]
    if args.compile:
        for each in models.values():
            compile_in_place(each.model.language_model)
    v, t = model.config.vision_config, model.config.text_config
    grid = images[0]["image_grid_thw"][0].tolist()
    print(
        f"Qwen2.5-VL ({args.shape}): tower {v.depth} x {v.hidden_size}, {grid[1]}x{grid[2]} "
        f"patches ({grid[1] * grid[2] // 4} LLM tokens); LM {t.num_hidden_layers} x "
        f"{t.hidden_size} (MLP {t.intermediate_size}); {str(args.dtype).removeprefix('torch.')}, "
        f"{args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.new_tokens} new tokens{'; language models compiled' if args.compile else ''}"
        f" (built in {time.perf_counter() - start:.0f} s)"
    )
    rows = []
    for bsz in args.batch_sizes:
        chosen = [median] if bsz == 1 else [images[i % len(images)] for i in range(bsz)]
        rows += bench_batch(models, encoders, chosen, args)
    print()
    print_table(rows, args.new_tokens)
    print(
        "\nspeedup and bound: vanilla / dymu prefill (time to first token, tower included); "
        f"gen tok/s = batch x {args.new_tokens} / generate time (prefill included)"
    )
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
