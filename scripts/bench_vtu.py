"""Benchmark virtual token unmerging (VTU, ``dymu.apply_vtu``) on a Llama-shaped decoder LM.

The scenario of the VTU issue: one image of ``--image-tokens`` (576) visual tokens that the
encoder merged into ``--merged`` (100) groups, framed by text (``--text-tokens`` 64, half
before and half after the image), so the LM sees N = 576 + 64 = 640 full positions but only
M = 100 + 64 merged slots. The model is a ``LlamaForCausalLM`` with random (seeded) weights:
``--layers`` 8, hidden ``--hidden`` 1024, MLP ``--intermediate`` (default 2816 = 2.75 x hidden,
Llama's ratio), heads of 64 (16 query heads, ``--kv-heads`` 16), vocab 32000, SDPA attention,
float32 on CPU.

The mapping (full position -> slot) gives every text token its own slot and puts the image
positions into ``--merged`` groups: ``--grouping random`` (default; a seeded random
assignment in which every group is used) or ``contiguous`` (runs of about equal length).
``inputs_embeds`` (1, N, hidden) repeat one random embedding per slot, i.e. every position of
a group carries the same embedding, as after the encoder's merging.

Prefill (``torch.inference_mode``, ``use_cache=False``) times, interleaved in one run (warmup
reps first, then the two alternating with the order flipped every rep; medians):

* ``full``: ``lm(inputs_embeds=embeds)``, the model at full length N (no mapping, so the
  patched instance runs the unpatched code);
* ``vtu``: ``lm(inputs_embeds=embeds, vtu_mapping=mapping)``: norms, projections and MLPs at M
  slots, attention at the N full positions, logits at N.

``bound`` = full FLOPs / VTU FLOPs (``support/flops.py``), counted per layer as q/k/v/o
projections ``2nD*D`` (q, o) and ``2nD*Dkv`` (k, v; Dkv = kv heads x head dim), Llama's
3-matrix MLP ``3 * 2nD*I`` and causal attention (scores + AV, half the square) ``2N^2*D``,
plus the lm_head ``2N*D*V``. Full uses n = N everywhere; VTU uses n = M for projections and
MLP but N for attention and the lm_head. Norms, RoPE, softmax, gathers and scatters are not
counted. ``ratio`` = speedup / bound; target >= 0.8.

Decode: after a prefill with ``use_cache=True`` (full and VTU each; the VTU cache holds
full-length keys/values), one next-token forward (one new embedding, input length 1) with
that cache; the cache is deep-copied before every rep (outside the timed region) so every
step starts from the prefill state. Both steps run the plain decoder and should take about
the same time.

``--onevision`` is the LLaVA-OneVision scenario on a Qwen2-shaped LM (Qwen2-0.5B's widths:
hidden 896, MLP 4864, 14 query / 2 kv heads, vocab 151936; ``--layers`` of its 24): one
729-token base view plus 4 crops of 729 arranged in a 2 x 2 grid (54 x 54 positions, a
newline token after each of the 54 rows, as OneVision packs them), each view merged on its
own into ``--merged`` groups (default 192, the ``-192out`` SigLIP schedule). Logits are kept
for the last position only (``logits_to_keep=1``, as ``generate()``'s prefill does), so the
bound counts the LM head once.

``--profile`` adds a ``torch.profiler`` table (self CPU time by op) of VTU and full prefills.

``--quick`` is a small smoke run (what CI runs).

Run from the repository root::

    python scripts/bench_vtu.py
    python scripts/bench_vtu.py --reps 5 --threads 2 --grouping contiguous --profile
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch
from support import flops

import dymu
from dymu.lm.vtu_attention import forward_cache_argument

TARGET = 0.8
ONEVISION = dict(
    lm="qwen2",
    hidden=896,
    intermediate=4864,
    heads=14,
    kv_heads=2,
    vocab=151936,
    layers=4,
    image_tokens=729,
    crops=4,
    merged=192,
    last_logits=True,
)
QUICK = dict(
    layers=2,
    hidden=256,
    vocab=1000,
    image_tokens=144,
    merged=36,
    text_tokens=16,
    reps=2,
    warmup=1,
    decode_reps=2,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm", choices=["llama", "qwen2"], default="llama")
    p.add_argument("--onevision", action="store_true", help=f"OneVision scenario: {ONEVISION}")
    p.add_argument("--crops", type=int, default=0, help="AnyRes crops (a square number) after")
    p.add_argument("--last-logits", action="store_true", help="logits for the last position")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=None, help="default: 2.75 x hidden")
    p.add_argument("--heads", type=int, default=None, help="default: hidden / 64")
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--image-tokens", type=int, default=576)
    p.add_argument("--merged", type=int, default=100, help="groups each view falls into")
    p.add_argument("--text-tokens", type=int, default=64, help="half before, half after")
    p.add_argument("--grouping", choices=["random", "contiguous"], default="random")
    p.add_argument("--reps", type=int, default=10, help="timed prefill reps of each")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--decode-reps", type=int, default=20, help="timed decode steps of each")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="torch.profiler table of prefills")
    p.add_argument("--quick", action="store_true", help=f"smoke run (what CI runs): {QUICK}")
    known = p.parse_known_args()[0]
    if known.onevision:  # scenario defaults; explicit flags still win
        p.set_defaults(**ONEVISION)
    if known.quick:  # quick sizes as defaults; explicit flags still win
        small_views = {"image_tokens": 16, "merged": 6} if known.onevision else {}
        p.set_defaults(**{**QUICK, **small_views})
    args = p.parse_args()
    if args.intermediate is None:
        args.intermediate = int(2.75 * args.hidden)
    if args.heads is None:
        args.heads = max(1, args.hidden // 64)
    if args.kv_heads is None:
        args.kv_heads = args.heads
    if not 0 < args.merged <= args.image_tokens:
        p.error("--merged must be in 1..--image-tokens")
    side, grid = round(args.image_tokens**0.5), round(args.crops**0.5)
    if args.crops and (side * side != args.image_tokens or grid * grid != args.crops):
        p.error("--crops needs a square number of crops and of --image-tokens")
    return args


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    import transformers

    family = {"llama": "Llama", "qwen2": "Qwen2"}[args.lm]
    config = getattr(transformers, f"{family}Config")(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=8192,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


def view_groups(args: argparse.Namespace, gen: torch.Generator) -> torch.Tensor:
    """One view's image tokens -> ``--merged`` groups (every group used)."""
    n_img, groups = args.image_tokens, args.merged
    if args.grouping == "contiguous":
        return torch.arange(n_img) * groups // n_img
    image = torch.randint(groups, (n_img,), generator=gen)
    image[torch.randperm(n_img, generator=gen)[:groups]] = torch.arange(groups)
    return image


def build_keys(args: argparse.Namespace, gen: torch.Generator) -> torch.Tensor:
    """(N,) per position: the merged token it holds (views numbered apart), -1 for text and
    newline positions. With ``--crops``: the base view, then the crops' grid row by row with
    a newline after each row (OneVision's packing of an unpadded 2 x 2 grid)."""
    text = torch.full((args.text_tokens // 2,), -1)
    parts = [text, view_groups(args, gen)]
    if args.crops:
        side, grid = round(args.image_tokens**0.5), round(args.crops**0.5)
        crops = torch.stack(
            [view_groups(args, gen) + (c + 1) * args.merged for c in range(args.crops)]
        )
        tiles = crops.view(grid, grid, side, side).permute(0, 2, 1, 3).reshape(grid * side, -1)
        parts.append(torch.cat([tiles, torch.full((grid * side, 1), -1)], 1).reshape(-1))
    parts.append(torch.full((args.text_tokens - args.text_tokens // 2,), -1))
    return torch.cat(parts)


def build_mapping(args: argparse.Namespace, gen: torch.Generator) -> torch.Tensor:
    """(1, N) full position -> slot, slots in order of first appearance (dymu.lm.layouts)."""
    from dymu.lm.layouts import slot_mapping

    return slot_mapping(build_keys(args, gen)[None])


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleave(fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, float]:
    """Medians (ms) of ``fns`` run alternately, order flipped every rep, after warmup reps."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(timed(fns[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def decode_step(lm: torch.nn.Module, cache, embed: torch.Tensor) -> Callable[[], float]:
    """A callable timing one next-token forward from a fresh copy of ``cache`` (passed as
    ``cache`` where the forward takes that name, as the newest transformers releases do)."""
    name = forward_cache_argument(lm.forward)

    def run() -> float:
        past = {name: copy.deepcopy(cache)}
        return timed(lambda: lm(inputs_embeds=embed, use_cache=True, **past))

    return run


def cache_of(output) -> object:
    """The KV cache of a model output: ``cache`` in the newest transformers releases (where
    ``past_key_values`` is its deprecated alias), ``past_key_values`` in older ones."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def interleave_decode(fns: dict[str, Callable[[], float]], reps: int, warmup: int):
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(fns[name]())
    return {name: statistics.median(ts) for name, ts in times.items()}


def profile(fns: dict[str, Callable[[], object]], rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, fn in fns.items():
        fn()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n--- profile: {name} prefill (self CPU time) ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def compare_logits(
    lm: torch.nn.Module, embeds: torch.Tensor, mapping: torch.Tensor, keep: dict, vocab: int
) -> int:
    """Print how close VTU's logits are to the full-length model's (``keep``: the forward's
    ``logits_to_keep``, if any); the positions kept."""
    full_logits = lm(inputs_embeds=embeds, use_cache=False, **keep).logits
    vtu_logits = lm(inputs_embeds=embeds, vtu_mapping=mapping, use_cache=False, **keep).logits
    kept = keep.get("logits_to_keep", mapping.shape[1])
    assert full_logits.shape == vtu_logits.shape == (1, kept, vocab)
    cos = torch.nn.functional.cosine_similarity(full_logits, vtu_logits, dim=-1)
    print(
        f"logits (1, {kept}, {vocab}) both; full vs vtu cosine: mean "
        f"{cos.mean():.4f}, min {cos.min():.4f}"
    )
    return kept


def print_results(
    args: argparse.Namespace,
    prefill: dict[str, float],
    decode: dict[str, float],
    n_full: int,
    n_slots: int,
    kept: int,
) -> None:
    """The prefill and decode table, with the FLOP bound and the target's verdict."""
    full_flops = flops.lm(args, n_full, n_full, n_full)
    vtu_flops = flops.lm(args, n_full, n_slots, n_full)
    bound = full_flops / vtu_flops
    speedup = prefill["full"] / prefill["vtu"]
    ratio = speedup / bound
    verdict = "PASS" if ratio >= TARGET else "MISS"
    print()
    print(f"{'':10}{'full ms':>10}{'vtu ms':>10}{'speedup':>9}{'bound':>8}{'ratio':>8}")
    print(
        f"{'prefill':10}{prefill['full']:10.1f}{prefill['vtu']:10.1f}{speedup:9.2f}"
        f"{bound:8.2f}{ratio:8.2f}  {verdict} (target >= {TARGET})"
    )
    print(
        f"{'decode':10}{decode['full']:10.1f}{decode['vtu']:10.1f}"
        f"{decode['full'] / decode['vtu']:9.2f}  (one step after a {n_full}-token prefill)"
    )
    print(
        f"FLOPs: full {full_flops / 1e9:.1f} G, vtu {vtu_flops / 1e9:.1f} G "
        f"(lm_head {2 * kept * args.hidden * args.vocab / 1e9:.1f} G in both); "
        f"full throughput {full_flops / prefill['full'] / 1e6:.0f} GFLOP/s, "
        f"vtu {vtu_flops / prefill['vtu'] / 1e6:.0f} GFLOP/s"
    )


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)

    t0 = time.perf_counter()
    lm = build_model(args)
    dymu.apply_vtu(lm)
    mapping = build_mapping(args, gen)
    n_full = mapping.shape[1]
    n_slots = int(mapping.max()) + 1
    slot_embeds = torch.randn(1, n_slots, args.hidden, generator=gen) * 0.02
    embeds = slot_embeds[:, mapping[0]]  # (1, N, D), repeated within each group
    next_embed = torch.randn(1, 1, args.hidden, generator=gen) * 0.02
    n_params = sum(p.numel() for p in lm.parameters())
    print(
        f"{args.lm}: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, "
        f"heads {args.heads}/{args.kv_heads} kv, vocab {args.vocab}, "
        f"{n_params / 1e6:.0f}M params, sdpa, float32; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads (built in {time.perf_counter() - t0:.1f} s)"
    )
    views = 1 + args.crops
    print(
        f"tokens: N = {n_full} full ({args.text_tokens} text, {views} x {args.image_tokens} "
        f"image{' + newlines' if args.crops else ''}), M = {n_slots} slots ({args.merged} "
        f"groups per view, {args.grouping}); reps {args.reps}, warmup {args.warmup}"
    )
    keep = {"logits_to_keep": 1} if args.last_logits else {}

    with torch.inference_mode():
        kept = compare_logits(lm, embeds, mapping, keep, args.vocab)

        prefill = interleave(
            {
                "full": lambda: lm(inputs_embeds=embeds, use_cache=False, **keep),
                "vtu": lambda: lm(
                    inputs_embeds=embeds, vtu_mapping=mapping, use_cache=False, **keep
                ),
            },
            args.reps,
            args.warmup,
        )

        full_cache = cache_of(lm(inputs_embeds=embeds, use_cache=True))
        vtu_cache = cache_of(lm(inputs_embeds=embeds, vtu_mapping=mapping, use_cache=True))
        assert full_cache.get_seq_length() == vtu_cache.get_seq_length() == n_full
        decode = interleave_decode(
            {
                "full": decode_step(lm, full_cache, next_embed),
                "vtu": decode_step(lm, vtu_cache, next_embed),
            },
            args.decode_reps,
            args.warmup,
        )

        if args.profile:
            profile(
                {
                    "vtu": lambda: lm(
                        inputs_embeds=embeds, vtu_mapping=mapping, use_cache=False, **keep
                    ),
                    "full": lambda: lm(inputs_embeds=embeds, use_cache=False, **keep),
                }
            )

    print_results(args, prefill, decode, n_full, n_slots, kept)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"total {time.perf_counter() - t0:.0f} s; load average (1/5/15 min) {load}")


if __name__ == "__main__":
    main()
