"""Benchmark DyMU end to end in a LLaVA-1.5-shaped model: time to first token and generation.

The model is a transformers ``LlavaForConditionalGeneration`` built from configs with random
(seeded) weights. ``--shape 7b`` (the default on ``--device cuda``, bf16) has llava-1.5-7b's
shapes: a CLIP ViT-L-14-336 tower (24 layers, width 1024, 576 patches, features from layer
-2, class token dropped), the mlp2x_gelu projector and a Llama-7B LM (32 layers, hidden 4096,
32 heads, MLP 11008, vocab 32064). ``--small`` (the default on CPU) keeps the 336 px / 14 px
grid of 576 patches in a narrow 6-layer tower (width 192) and a 4-layer Llama of hidden 512
(MLP 1408, Llama's ratio), so that the LM dominates prefill as it does at 7B (about 3/4 of the
vanilla prefill FLOPs here, 19/20 at 7B); ``--quick`` is a tiny smoke run (112 px,
64 patches; what CI runs).

Inputs are the bundled photos (``--data``) through a ``LlavaProcessor`` built offline (a
``CLIPImageProcessor`` at the tower's size and a word-level tokenizer), one prompt per image:
``USER: <image>\\nDescribe the image. ASSISTANT:`` (576 image tokens plus the text). Batch 1
uses the photo whose kept token count is the median; larger batches take the photos in
order, cycled.

Thresholds are calibrated on the bundled photos (``dymu.find_thresholds``) for ``--keep``
tokens per image on average over them (default 89 of 576, about the paper's DyMU-low budget
for LLaVA-1.5); with random weights this fixes the budget, not what a trained tower keeps.
The threshold rule then gives every photo its own count, printed per batch (mean/min/max).

Three models share one set of weights (instances deep-copied with the parameters and
buffers shared): ``vanilla`` (transformers, unpatched), ``dymu+VTU``
(``hf_llava.apply(model, thresholds, vtu=True)``) and ``dymu no-VTU`` (``vtu=False``: the
LM runs unchanged on the full-length prompt of repeated merged features). A check pass
also warms up: one prefill and one greedy generate of each (first-token logits, output
shapes), and a fourth copy patched with never-merge thresholds (``dymu+VTU`` with nothing
merged, so the unmodified model) whose generate must give vanilla's tokens, every one, and
its logits at every step (to ``LOGIT_RTOL``; in fp32 it is bit for bit): the benchmark stops
with an error rather than time a path that does not compute the model (a VTU cache or layout
bug shows here). In fp16/bf16 kernels may round differently, so the two may part at a step
where vanilla's two best tokens lie within that tolerance (a near tie), and only there;
then, interleaved in one run (``bench_encoder.time_interleaved``: ``--warmup`` untimed reps,
then the six calls in an order that rotates every rep; medians of ``--reps``: default 10 at
batch 1, 5 above), under ``torch.inference_mode``, timed:

* prefill: ``model(**inputs, use_cache=True, logits_to_keep=1)``, which is what
  ``generate()`` runs before its first token: time to first token;
* generate: greedy ``model.generate(**inputs, max_new_tokens=T, min_new_tokens=T)`` with
  ``T = --new-tokens``; tokens/s = batch x T / time (prefill included).

``bound`` = vanilla prefill FLOPs / dymu prefill FLOPs (per sequence, dymu's averaged over
the batch; ``support/flops.py``): the vision tower as ``flops.vit_image`` counts it (vanilla
runs all its layers, as transformers does, and keeps hidden state -2; dymu runs all but the
last, at the measured per-block token counts), the projector ``2n(Dv*Dt + Dt*Dt)`` at 576 or
the kept count, and the LM as ``flops.lm`` counts it (projections, MLP, causal attention,
the head for the last position): vanilla and no-VTU at the full length N everywhere, VTU
with projections and MLP at M slots (text tokens plus kept visual tokens) and attention at
N. Norms, softmax, the patch-to-slot bookkeeping and the decode steps are not counted.
``pad bound`` is the same with every sequence at the batch's most kept tokens: what a batch
would cost padded to its longest M (the VTU language model packs its slots across the batch
and the tower its tokens, so only the small projector pads; the FLOP bound is the target).
``ratio`` = speedup / bound. The first-token logits cosine
(vanilla vs dymu) is printed for information: merged tokens change the logits.

Run from the repository root::

    python scripts/bench_vlm.py --small --threads 2          # the README's CPU figures
    python scripts/bench_vlm.py --device cuda --new-tokens 32  # llava-1.5-7b shapes, bf16
    python scripts/bench_vlm.py --quick                      # smoke run (what CI runs)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_encoder import plot, time_interleaved
from support import flops
from support.generation_check import check_same_generation
from support.llava_shapes import PROMPT, SHAPES, build_model, build_processor, shared_copy
from torch import nn
from transformers import LlavaProcessor

import dymu
from dymu.encoder.model import EncoderOutput
from dymu.engine.schedule import make_schedule
from dymu.integrations import hf_llava
from dymu.sources.stream import load_rgb, open_source

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = {"vanilla": None, "dymu+VTU": True, "dymu no-VTU": False}  # name -> vtu


@dataclass
class Row:
    model: str  # variant name (also the plot's label)
    batch: int
    tokens: list[int]  # visual tokens kept per image
    positions: int  # full prompt length N
    prefill_ms: float
    generate_ms: float
    flops: float  # prefill FLOPs per sequence (mean over the batch)
    pad_flops: float  # the same with the batch padded to its most kept tokens
    base: Row | None = None  # the vanilla row of this batch

    @property
    def speedup(self) -> float:
        return self.base.prefill_ms / self.prefill_ms if self.base else 1.0

    @property
    def bound(self) -> float:
        return self.base.flops / self.flops if self.base else 1.0

    @property
    def pad_bound(self) -> float:
        return self.base.flops / self.pad_flops if self.base else 1.0

    @property
    def ratio(self) -> float:
        return self.speedup / self.bound


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--family",
        choices=["llava", "qwen2_5_vl"],
        default="llava",
        help="llava: LLaVA-1.5 shapes (this script); qwen2_5_vl: Qwen2.5-VL shapes "
        "(scripts/bench_vlm_qwen.py, which lists its own options)",
    )
    p.add_argument("--shape", choices=list(SHAPES), default=None, help="default: 7b on cuda")
    p.add_argument("--small", action="store_true", help="--shape small (the CPU figures)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (what CI runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="bf16 on cuda, else fp32")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    reps_help = "timed reps (default: 10 at batch 1, 5 above; quick 1)"
    p.add_argument("--reps", type=int, default=None, help=reps_help)
    p.add_argument("--warmup", type=int, default=0, help="untimed reps after the check pass")
    p.add_argument("--new-tokens", type=int, default=None, help="default 32 on cuda, else 4")
    keep_help = "visual tokens kept per image, mean over the photos (default 89; quick 16)"
    p.add_argument("--keep", type=int, default=None, help=keep_help)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--data", type=Path, default=ROOT / "examples" / "images.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="save a bar chart here (needs matplotlib)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if args.shape is None:
        args.shape = "quick" if args.quick else "small" if args.small or not cuda else "7b"
    args.dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    if args.quick:
        args.reps = args.reps or 1
    args.new_tokens = args.new_tokens or (32 if cuda else 2 if args.quick else 4)
    if args.quick and args.batch_sizes == [1, 16]:
        args.batch_sizes = [1, 2]
    patches = (SHAPES[args.shape]["image"] // 14) ** 2
    args.keep = args.keep or (16 if args.shape == "quick" else 89)
    if not 0 < args.keep <= patches:
        p.error(f"--keep must be in 1..{patches}")
    return args


def _family(argv: list[str]) -> str:
    """``--family`` (``llava`` or ``qwen2_5_vl``), read before the family's own options."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--family", choices=["llava", "qwen2_5_vl"], default="llava")
    return p.parse_known_args(argv)[0].family


def calibrate(model: nn.Module, pixels: torch.Tensor, keep: int) -> dymu.Thresholds:
    """Thresholds keeping ``keep`` tokens per image on average over ``pixels``: the
    ``576 - keep`` merges spread over the blocks that run (up to the feature layer)."""
    probe = hf_llava.build_encoder(model)
    patches = probe.tower.num_tokens - probe.tower.num_prefix_tokens
    run, idle = probe.num_run, probe.tower.num_blocks - probe.num_run
    schedule = make_schedule(patches - keep, run) + [0] * idle
    enc = hf_llava.build_encoder(model, r_total=patches - keep, schedule=schedule)
    return dymu.find_thresholds(enc, [pixels[i : i + 4] for i in range(0, len(pixels), 4)])


def prefill_flops(
    model: nn.Module, enc: dymu.DyMUEncoder, out: EncoderOutput, n_full: int
) -> dict[str, tuple[float, float]]:
    """Prefill FLOPs per sequence of each variant: (mean over the batch, at the batch's
    padded length) (see the docstring)."""
    cfg = model.config
    dim, mlp_width, n0, patch = flops.vit_dims(enc.tower)
    prefix = enc.tower.num_prefix_tokens
    patches = n0 - prefix
    layers = cfg.vision_config.num_hidden_layers  # transformers runs them all
    lm = flops.lm_shape(cfg.text_config)
    dv, dt = cfg.vision_config.hidden_size, lm.hidden

    def image(counts: list[int]) -> float:
        return flops.vit_image(counts, n0, dim, mlp_width, patch)

    def projector(n: float) -> float:
        return 2 * n * (dv * dt + dt * dt)

    def text(kept: float, slots: float) -> float:  # projector and LM
        return projector(kept) + flops.lm(lm, n_full, slots, n_full)

    vanilla = image([n0] * layers) + text(patches, n_full)
    kept = out.lengths.tolist()
    vision = statistics.fmean(  # the tower packs its tokens: per image, no padding
        image([c + prefix for c in counts]) for counts in out.block_lengths.tolist()
    )
    n_text, most = n_full - patches, max(kept)
    return {
        "vanilla": (vanilla, vanilla),
        "dymu+VTU": (
            vision + statistics.fmean(text(k, n_text + k) for k in kept),
            vision + text(most, n_text + most),
        ),
        "dymu no-VTU": (
            vision + statistics.fmean(text(k, n_full) for k in kept),
            vision + text(most, n_full),
        ),
    }


def never_merge(thresholds: dymu.Thresholds) -> dymu.Thresholds:
    """The same schedule with thresholds no cosine exceeds: nothing merges."""
    ones = torch.ones_like(thresholds.thresholds)
    return dymu.Thresholds.from_values(ones, thresholds.r, dict(thresholds.metadata))


def bench_batch(
    models: dict[str, nn.Module],
    enc: dymu.DyMUEncoder,
    processor: LlavaProcessor,
    images: list,
    args: argparse.Namespace,
    unmerged: nn.Module,
) -> list[Row]:
    """Rows (vanilla first) for one batch of photos; ``unmerged`` is dymu+VTU patched with
    never-merge thresholds (the check pass's reference)."""
    bsz = len(images)
    inputs = processor(images=images, text=[PROMPT] * bsz, return_tensors="pt").to(args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(args.dtype)
    n_full = inputs["input_ids"].shape[1]
    pad = processor.tokenizer.pad_token_id
    gen_kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    gen_kwargs.update(do_sample=False, pad_token_id=pad)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def prefill(model: nn.Module) -> Callable[[], object]:
        return lambda: (model(**inputs, use_cache=True, logits_to_keep=1), sync())

    def generate(model: nn.Module) -> Callable[[], object]:
        return lambda: (model.generate(**inputs, **gen_kwargs), sync())

    with torch.inference_mode():
        out = enc(inputs["pixel_values"])
        logits = {k: prefill(m)()[0].logits[:, -1].float() for k, m in models.items()}
        checked = dict(output_logits=True, return_dict_in_generate=True)
        runs = {k: m.generate(**inputs, **gen_kwargs, **checked) for k, m in models.items()}
        for name, run in runs.items():
            if run.sequences.shape != (bsz, n_full + args.new_tokens):
                raise SystemExit(f"check failed: {name} generated {tuple(run.sequences.shape)}")
        same = unmerged.generate(**inputs, **gen_kwargs, **checked)
        what = f"b{bsz} dymu+VTU, nothing merged,"
        check_same_generation(runs["vanilla"], same, args.dtype, what)
        fns = {f"prefill {k}": prefill(m) for k, m in models.items()}
        fns.update({f"generate {k}": generate(m) for k, m in models.items()})
        ms = time_interleaved(fns, args.reps or (10 if bsz == 1 else 5), args.warmup)
    cos = torch.nn.functional.cosine_similarity
    for name in list(models)[1:]:
        sim = cos(logits["vanilla"], logits[name], dim=-1)
        print(f"  b{bsz} first-token logits, vanilla vs {name}: cosine mean {sim.mean():.4f}")
    costs = prefill_flops(models["vanilla"], enc, out, n_full)
    tokens = out.lengths.tolist()
    rows: list[Row] = []
    for name in models:
        rows.append(
            Row(name, bsz, tokens, n_full, ms[f"prefill {name}"], ms[f"generate {name}"],
                *costs[name], rows[0] if rows else None)
        )  # fmt: skip
    rows[0].tokens = [enc.tower.num_tokens - enc.tower.num_prefix_tokens] * bsz
    return rows


def print_table(rows: list[Row], new_tokens: int) -> None:
    header = (
        f"{'model':<12} {'batch':>5} {'visual tokens':>17} {'prefill ms':>11} {'speedup':>8} "
        f"{'bound':>6} {'pad bound':>9} {'ratio':>6} {'gen tok/s':>10} {'speedup':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        t = r.tokens
        seen = f"{statistics.fmean(t):.1f} ({min(t)}-{max(t)})" if len(set(t)) > 1 else str(t[0])
        tps = r.batch * new_tokens / r.generate_ms * 1e3
        gen = r.base.generate_ms / r.generate_ms if r.base else 1.0
        print(
            f"{r.model:<12} {r.batch:>5} {seen:>17} {r.prefill_ms:>11.1f} {r.speedup:>7.2f}x "
            f"{r.bound:>5.2f}x {r.pad_bound:>8.2f}x {r.ratio:>6.2f} {tps:>10.1f} {gen:>7.2f}x"
        )


def main() -> None:
    if "--family" in sys.argv[1:] or any(a.startswith("--family=") for a in sys.argv[1:]):
        family = _family(sys.argv[1:])
        if family == "qwen2_5_vl":  # Qwen2.5-VL shapes: its own script, the same table
            from bench_vlm_qwen import main as qwen_main

            return qwen_main(sys.argv[1:])
    args = parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    processor = build_processor(SHAPES[args.shape]["image"])
    model = build_model(args, processor.image_token_id)
    photos = [load_rgb(p) for p in open_source(str(args.data)).paths]
    pixels = processor.image_processor(photos, return_tensors="pt")["pixel_values"]
    pixels = pixels.to(args.device, args.dtype)
    with torch.inference_mode():
        thresholds = calibrate(model, pixels, args.keep)
        enc = hf_llava.build_encoder(model, thresholds)
        kept = enc(pixels).lengths
    median = photos[int(kept.argsort()[(len(kept) - 1) // 2])]  # batch 1: median kept count
    models = {}
    for name, vtu in VARIANTS.items():
        models[name] = model if vtu is None else shared_copy(model)
        if vtu is not None:
            hf_llava.apply(models[name], thresholds, vtu=vtu)
    unmerged = hf_llava.apply(shared_copy(model), never_merge(thresholds), vtu=True)
    v, t = model.config.vision_config, model.config.text_config
    params = sum(p.numel() for p in model.parameters())
    print(
        f"LLaVA ({args.shape}): CLIP {v.num_hidden_layers} x {v.hidden_size} at {v.image_size} "
        f"px / 14 ({(v.image_size // 14) ** 2} patches), Llama {t.num_hidden_layers} x "
        f"{t.hidden_size} (MLP {t.intermediate_size}, vocab {t.vocab_size}), {params / 1e6:.0f}M "
        f"params, {str(args.dtype).removeprefix('torch.')}, {args.device}; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"thresholds for {args.keep} kept tokens per image on {len(photos)} photos: kept "
        f"{kept.float().mean():.1f} (min {kept.min()}, max {kept.max()}); reps "
        f"{args.reps or '10 (batch 1) / 5'}, warmup {args.warmup}, {args.new_tokens} new "
        f"tokens (built in {time.perf_counter() - start:.0f} s)"
    )
    rows = []
    for bsz in args.batch_sizes:
        cycled = [photos[i % len(photos)] for i in range(bsz)]
        chosen = [median] if bsz == 1 else cycled
        rows += bench_batch(models, enc, processor, chosen, args, unmerged)
    print()
    print_table(rows, args.new_tokens)
    print(
        f"\nprompt: N = {rows[0].positions} positions; speedup and bound are vanilla / dymu "
        f"prefill (time to first token); gen tok/s = batch x {args.new_tokens} / generate time"
    )
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.plot:
        plot([r for r in rows if r.base is not None], args.plot)


if __name__ == "__main__":
    main()
