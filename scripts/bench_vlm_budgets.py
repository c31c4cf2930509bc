"""VTU at the token budgets the DyMU paper reports for LLaVA-1.5 (issue 20).

Real CLIP weights keep far fewer than 576 tokens per image but not the 2-to-530 spread that
random weights give, so this draws each image's kept count from the paper's budgets (normal,
seeded, clipped to 1..576): **low** 89 +- 27, **mid** 195 +- 47, **high** 394 +- 57. The
language model is bench_vlm's Llama (``support/llava_shapes.py``; ``--shape``: ``7b`` on
CUDA, ``small`` on CPU, ``quick`` for CI) with random weights; a prompt is N = 585 positions
(576 image positions between 5 text tokens before and 4 after), the image positions falling
into the drawn number of groups (contiguous runs: where groups lie does not change the
cost). Vanilla runs the full sequence; dymu+VTU the same ``inputs_embeds`` with the mapping,
the batch's slots packed. The vision tower is left out: the LM is about 90% of LLaVA-1.5's
prefill (bench_vlm.py measures the whole model).

Per budget and ``--batch-sizes`` (default 1 16 64 on CUDA, 1 16 on CPU), interleaved in one
run (medians): prefill = time to first token (``lm(inputs_embeds, vtu_mapping,
use_cache=True, logits_to_keep=1)``), its speedup and the FLOP bound (vanilla over VTU LM
FLOPs, ``support/flops.py``: projections and MLP at the M slots, attention at N, the head
once), and greedy ``generate()`` tokens/s over ``--new-tokens`` (prefill included).
Targets on a GPU (issue 20, low budget): prefill at least 1.5x at batch 1 and 2.5x at batch
16; generate at least 1.0x and 1.2x.

``--compile`` compiles the decoder (``lm.model.compile(dynamic=True)``: inductor, shapes
symbolic, as a server compiles a model) for both: vanilla and VTU calls then run compiled
code, one graph break where VTU reads its slot count before the first layer. The warmup reps
(at least 2) and one untimed ``generate()`` each compile; the timed reps do not.
transformers' decoder compiles anew for each kind of call (the first batch size above 1,
prefill against decode, kwargs given or not): about 15 variants for the quick run's two
batch sizes with generation, 4 for one batch size's prefills (``--new-tokens 0``: no
generation).

Run from the repository root::

    python scripts/bench_vlm_budgets.py --threads 2                  # CPU, small shape
    python scripts/bench_vlm_budgets.py --device cuda --new-tokens 32  # 7b shape, bf16
    python scripts/bench_vlm_budgets.py --device cuda --compile --budgets low  # compiled
    python scripts/bench_vlm_budgets.py --quick                      # smoke run (CI)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

from bench_encoder import DTYPES  # noqa: E402
from bench_vtu import interleave, timed  # noqa: E402
from support import flops  # noqa: E402
from support.compiled import compile_in_place  # noqa: E402
from support.llava_shapes import SHAPES, VOCAB  # noqa: E402

import dymu  # noqa: E402

BUDGETS = {"low": (89, 27), "mid": (195, 47), "high": (394, 57)}
PATCHES, BEFORE, AFTER = 576, 5, 4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default=None, help="7b on cuda, else small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="bf16 on cuda, else fp32")
    p.add_argument("--budgets", nargs="+", choices=list(BUDGETS), default=list(BUDGETS))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    tokens_help = "32 on cuda, else 4; 0: prefill only"
    p.add_argument("--new-tokens", type=int, default=None, help=tokens_help)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="quick shape, batch 1 and 2, 1 rep")
    compile_help = "compile the decoder (inductor, dynamic shapes) for vanilla and VTU alike"
    p.add_argument("--compile", action="store_true", help=compile_help)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.shape = "quick" if args.quick else args.shape or ("7b" if cuda else "small")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    default_batches = [1, 2] if args.quick else [1, 16, 64] if cuda else [1, 16]
    args.batch_sizes = args.batch_sizes or default_batches
    if args.new_tokens is None:
        args.new_tokens = 32 if cuda else 4
    if args.quick:
        args.reps, args.warmup, args.budgets = 1, 0, ["low"]
    if args.compile:
        args.warmup = max(args.warmup, 2)  # the compiles happen in untimed reps
    return args


def build_lm(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(**SHAPES[args.shape]["text"], vocab_size=VOCAB, attn_implementation="sdpa")
    with torch.device(args.device):  # built in place: a 7B model is not made on the host first
        lm = LlamaForCausalLM._from_config(config, dtype=DTYPES[args.dtype]).eval()
    lm.generation_config.pad_token_id = 0
    return lm


def draw_kept(budget: str, count: int, gen: torch.Generator) -> list[int]:
    mean, std = BUDGETS[budget]
    kept = torch.randn(count, generator=gen) * std + mean
    return kept.round().clamp(1, PATCHES).long().tolist()


def mapping_for(kept: list[int]) -> torch.Tensor:
    """(B, N): text positions their own slots, image positions ``kept[b]`` contiguous runs."""
    rows = []
    for k in kept:
        image = BEFORE + torch.arange(PATCHES) * k // PATCHES
        after = BEFORE + k + torch.arange(AFTER)
        rows.append(torch.cat([torch.arange(BEFORE), image, after]))
    return torch.stack(rows)


def lm_flops(lm: torch.nn.Module, n_lin: int) -> float:
    n = BEFORE + PATCHES + AFTER
    return flops.lm(flops.lm_shape(lm.config), n, n_lin, n)


def run_row(args, lm, budget: str, bsz: int, gen: torch.Generator) -> dict:
    kept = draw_kept(budget, bsz, gen)
    mapping = mapping_for(kept).to(args.device)
    n = mapping.shape[1]
    embeds = torch.randn(bsz, n, lm.config.hidden_size, generator=gen).to(args.device, lm.dtype)
    mask = torch.ones(bsz, n, dtype=torch.long, device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def prefill(vtu: bool):
        extra = {"vtu_mapping": mapping} if vtu else {}
        kw = dict(inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **extra)
        return lambda: (lm(**kw), sync())

    def generate(vtu: bool):
        extra = {"vtu_mapping": mapping} if vtu else {}
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        kw.update(inputs_embeds=embeds, attention_mask=mask, **extra)
        return lambda: (lm.generate(**kw), sync())

    with torch.inference_mode():
        runs = {"vanilla": prefill(False), "vtu": prefill(True)}
        first = interleave(runs, args.reps, args.warmup)
        reps = max(1, args.reps // 2)
        runs = {"vanilla": generate(False), "vtu": generate(True)} if args.new_tokens else {}
        if getattr(args, "compile", False):  # decoding's shapes compile once, untimed
            for run in runs.values():
                run()
        gen_ms = {k: statistics.median(timed(f) for _ in range(reps)) for k, f in runs.items()}
        gen_ms = gen_ms or {"vanilla": math.nan, "vtu": math.nan}
    slots = [BEFORE + k + AFTER for k in kept]
    bound = lm_flops(lm, n) / statistics.fmean(lm_flops(lm, m) for m in slots)
    tps = {k: bsz * args.new_tokens / (ms / 1e3) for k, ms in gen_ms.items()}
    return dict(
        budget=budget, batch=bsz, kept=statistics.fmean(kept), low=min(kept), high=max(kept),
        vanilla_ms=first["vanilla"], vtu_ms=first["vtu"], bound=bound,
        speedup=first["vanilla"] / first["vtu"], vanilla_tps=tps["vanilla"], vtu_tps=tps["vtu"],
    )  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    lm = dymu.apply_vtu(build_lm(args))
    if args.compile:
        compile_in_place(lm.model)
    gen = torch.Generator().manual_seed(args.seed)
    print(
        f"Llama ({args.shape}) {lm.config.num_hidden_layers} x {lm.config.hidden_size}, "
        f"{'compiled, ' if args.compile else ''}"
        f"{args.dtype}, {args.device}; torch {torch.__version__}; N = {BEFORE + PATCHES + AFTER}"
        f" positions, {args.new_tokens} new tokens, {args.reps} reps"
    )
    head = f"{'budget':<7} {'batch':>5} {'kept (min-max)':>16} {'vanilla ms':>11} {'VTU ms':>9}"
    print(head + f" {'speedup':>8} {'bound':>6} {'ratio':>6} {'gen tok/s':>10} {'speedup':>8}")
    for budget in args.budgets:
        for bsz in args.batch_sizes:
            r = run_row(args, lm, budget, bsz, gen)
            kept = f"{r['kept']:.0f} ({r['low']}-{r['high']})"
            print(
                f"{budget:<7} {bsz:>5} {kept:>16} {r['vanilla_ms']:>11.1f} {r['vtu_ms']:>9.1f}"
                f" {r['speedup']:>7.2f}x {r['bound']:>5.2f}x {r['speedup'] / r['bound']:>6.2f}"
                + (f" {r['vtu_tps']:>10.1f} {r['vtu_tps'] / r['vanilla_tps']:>7.2f}x"
                   if args.new_tokens else f" {'-':>10} {'-':>8}")
            )


if __name__ == "__main__":
    main()
