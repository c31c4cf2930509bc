"""Every GPU figure the project reports, in one command and one table (issue 19, point 6).

Five sections and two run only when named, each timed by its sibling script's own functions
(random, seeded weights built from configs; nothing downloaded), vanilla and dymu
interleaved in one run, medians:

* **encoder** (``bench_encoder.bench_model``): ViT-L-14-336-tome-72out and
  ViT-SO400M-14-SigLIP-384-tome-192out at batch 1, 8 and 64, thresholds calibrated on the
  bundled photos; the vanilla tower against dymu (``attention="auto"``, merges compiled:
  ``dymu.engine.fused``), ms per forward, and the FLOP bound at the measured per-block token
  counts; the eager merge's time is measured beside it (``detail.ways`` in the JSON).
* **calibration** (``bench_calibration.bench_throughput``): threshold finding against a plain
  forward over the same stream of synthetic JPEGs (ViT-L-14-336-tome-72out, batch 64), img/s.
* **tome** (``bench_tome.bench``): ``dymu.apply_tome`` against the unpatched timm ViT-B/16 and
  ViT-L/16 at r 8 and 16, batch 256, img/s; beside them facebookresearch/ToMe's own timm patch
  on the same weights where the ``tome`` package is importable (else ``-``).
* **vlm** (``bench_vlm_budgets.run_row``): llava-1.5-7b's language model (bf16) with the
  DyMU-low budget's kept tokens per image (then mid and high while time allows), batch 1 and
  16: prefill (time to first token) vanilla against dymu+VTU beside the FLOP bound, and
  greedy generate tokens/s over 32 new tokens.
* **qwen** (``bench_vlm_qwen.bench_batch``): the whole Qwen2.5-VL-7B-shaped model (bf16,
  tower included) at a 1024x1024 photo (1369 LLM tokens), thresholds for the DyMU-low share
  of units (``--qwen-budgets``), batch 1 and 16: prefill and generate as for the VLM rows.
* **vlm-compiled**, only when named in ``--sections``: the vlm prefill row at the first
  budget and batch size with the decoder compiled for both (``bench_vlm_budgets.py
  --compile``: inductor, dynamic shapes), as a server runs a model; at batch 1 both are
  bound by kernel launches in eager mode, which compiling cuts. Four variants of the 7B
  decoder compile first (minutes; not measured yet).
* **qwen-compiled**, only when named: the qwen rows at the first budget and batch size with
  both language models compiled (``bench_vlm_qwen.py --compile``; the towers eager).

Targets (issues 19, 20 and 21, on one H100 or H200): encoder at batch 64 >= 1.3x (ViT-L)
and >= 1.2x (SO400M), batch 8 >= 1.0x, batch 1 >= 0.9x; calibration >= 0.9x; ToMe r 16 at
least ToMe's own speedup, r 8 on ViT-L >= 1.1x; VLM low budget: prefill >= 1.5x at batch 1
and >= 2.5x at batch 16, generate >= 1.0x and >= 1.2x; Qwen2.5-VL low budget: prefill >= 2x
and generate >= 1.0x at batch 1 and 16. ``met`` says whether each row reaches it.

Prints one table headed by the device, torch version and dtypes (fp16 for the encoder,
calibration and ToMe, bf16 for the VLM on CUDA; fp32 on CPU), writes it as JSON (``--json``)
and a bar chart of speedup beside FLOP bound (``--plot``, needs matplotlib). A failing section
or model is an ``error`` row and the rest still run; past ``--time-limit`` seconds what is left
is a ``skipped: time limit`` row (a unit starts only if one like the last still fits).
Stopped by Ctrl-C or SIGTERM (``timeout``, a scheduler), it still prints and writes the rows
of the units that finished; the JSON is also rewritten after every section. The sibling
scripts' own output goes to stderr.

Estimated run time on one H100 with the defaults: about 4-5 minutes (encoder ~70 s,
calibration ~40 s, ToMe ~25 s, VLM ~60 s, from the sibling scripts' timings on an H200;
Qwen ~60 s, estimated, never run on a GPU), inside the 360 s default limit. Compiling the
merge steps (encoder, ToMe and VLM rows) adds an estimated minute on a fresh machine.

Run from the repository root on a GPU machine::

    python scripts/bench_gpu.py
    python scripts/bench_gpu.py --sections encoder vlm --json gpu.json --plot gpu.png
    python scripts/bench_gpu.py --sections vlm-compiled qwen-compiled --json gpu-c.json --plot ""
    python scripts/bench_gpu.py --quick   # tiny shapes on CPU, one rep: what CI runs
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

import bench_calibration  # noqa: E402
import bench_encoder  # noqa: E402
import bench_tome  # noqa: E402
import bench_vlm_budgets  # noqa: E402
import bench_vlm_qwen  # noqa: E402
from bench_overhead import ENCODER, quick_tower  # noqa: E402
from support.compiled import compile_in_place  # noqa: E402
from support.gpu_table import (  # noqa: E402
    Clock,
    Row,
    device_info,
    guarded,
    print_table,
    write_outputs,
)

import dymu  # noqa: E402
import dymu.integrations.hf_qwen_vl  # noqa: E402

SECTIONS = ["encoder", "calibration", "tome", "vlm", "qwen"]
OPT_IN = ["vlm-compiled", "qwen-compiled"]  # only when named: compiling a 7B LM takes minutes
VIT_L, SO400M = "ViT-L-14-336-tome-72out", "ViT-SO400M-14-SigLIP-384-tome-192out"
TINY_TOWER = ENCODER[True]  # bench_overhead's 4-block tower at 64 px
SECTION_REPS = {"encoder": (3, 10), "tome": (3, 10), "vlm": (1, 5), "qwen": (1, 5)}  # on a GPU
VLM_TARGETS = {(1, "prefill"): 1.5, (1, "generate"): 1.0, (16, "prefill"): 2.5,
               (16, "generate"): 1.2}  # fmt: skip
QUICK = dict(
    device="cpu", encoder_models=[TINY_TOWER], encoder_batches=[1, 8], calib_model=TINY_TOWER,
    calib_images=8, calib_batch=4, calib_runs=1, tome_models=["timm:tiny"], tome_batch=4,
    vlm_budgets=["low"], vlm_batches=[1, 2], new_tokens=2, reps=1, warmup=0,
)  # fmt: skip


def run_units(
    clock: Clock, section: str, items: list, fn: Callable[[object], list[Row]]
) -> list[Row]:
    """``fn(item)`` for each item while the time limit allows one more like the last."""
    rows, last = [], 0.0
    for item in items:
        if not clock.allows(last):
            rows.append(Row(section, str(item), note=clock.why_not()))
            continue
        start = time.perf_counter()
        try:
            rows += guarded(section, str(item), lambda item=item: fn(item))
        except KeyboardInterrupt:  # keep the units done; nothing more starts
            clock.interrupted = True
            rows.append(Row(section, str(item), note="interrupted"))
            continue
        last = time.perf_counter() - start
        print(f"[bench_gpu] {section} {item}: {last:.0f} s", file=sys.stderr)
    return rows


def reps(args: argparse.Namespace, section: str) -> tuple[int, int]:
    """(warmup, reps): the flags where given, else the section's GPU default."""
    warmup, count = SECTION_REPS[section]
    return (warmup if args.warmup is None else args.warmup), (args.reps or count)


def encoder_target(model: str, batch: int) -> float | None:
    if batch >= 64:
        return 1.2 if "SO400M" in model else 1.3
    return {8: 1.0, 1: 0.9}.get(batch)


def encoder_section(args: argparse.Namespace, clock: Clock) -> list[Row]:
    warmup, count = reps(args, "encoder")
    ns = argparse.Namespace(
        device=args.device, dtype=args.dtype, data=bench_encoder.ROOT / "examples" / "images.json",
        b1_image=None, batch_sizes=args.encoder_batches, attention=["auto"], fuse="both",
    )  # fmt: skip

    def unit(name: str) -> list[Row]:
        return [
            Row("encoder", name, r.batch, f"{r.final_tokens:.0f} tokens", r.vanilla_ms, r.dymu_ms,
                "ms", r.bound, encoder_target(name, r.batch), detail=asdict(r))
            for r in bench_encoder.bench_model(name, ns, count, warmup)
        ]  # fmt: skip

    return run_units(clock, "encoder", args.encoder_models, unit)


def calibration_section(args: argparse.Namespace, clock: Clock) -> list[Row]:
    ns = argparse.Namespace(
        model=args.calib_model, batch_size=args.calib_batch, num_workers=args.num_workers,
        device=args.device, dtype=args.dtype, images=args.calib_images, runs=args.calib_runs,
        threads=args.threads,
    )  # fmt: skip

    def unit(name: str) -> list[Row]:
        work = Path(tempfile.mkdtemp(prefix="dymu-bench-gpu-"))
        try:
            data = bench_calibration.write_list(
                work, bench_calibration.synthesize(work / "images", ns.images)
            )
            plain, calib = bench_calibration.bench_throughput(ns, data, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        target = bench_calibration.THROUGHPUT_TARGET
        return [Row("calibration", name, ns.batch_size, f"{ns.images} images", plain, calib,
                    "img/s", None, target)]  # fmt: skip

    return run_units(clock, "calibration", [args.calib_model], unit)


def tome_section(args: argparse.Namespace, clock: Clock) -> list[Row]:
    warmup, count = reps(args, "tome")
    dtype = bench_encoder.DTYPES[args.dtype]

    def unit(name: str) -> list[Row]:
        rows = []
        for r in bench_tome.bench(name, [args.tome_batch], args.tome_r, count, warmup,
                                  args.device, dtype, own=True):  # fmt: skip
            own = None if r.theirs_ms is None else r.batch / r.theirs_ms * 1e3
            target = 1.1 if r.r == 8 and "large" in name else None
            if r.r == 16 and r.theirs_ms is not None:  # at least ToMe's own speedup
                target = r.vanilla_ms / r.theirs_ms
            rows.append(
                Row("tome", name, r.batch, f"r {r.r}", r.batch / r.vanilla_ms * 1e3,
                    r.batch / r.tome_ms * 1e3, "img/s", r.bound, target, own, detail=asdict(r))
            )  # fmt: skip
        return rows

    return run_units(clock, "tome", args.tome_models, unit)


def vlm_section(args: argparse.Namespace, clock: Clock, compile_lm: bool = False) -> list[Row]:
    warmup, count = reps(args, "vlm")
    cuda = args.device.startswith("cuda")
    shape = "quick" if args.quick else "7b" if cuda else "small"
    ns = argparse.Namespace(
        shape=shape, device=args.device, dtype=args.vlm_dtype, seed=0, reps=count,
        warmup=max(warmup, 2 * compile_lm), compile=compile_lm,
        new_tokens=0 if compile_lm else args.new_tokens or (32 if cuda else 4),
    )  # fmt: skip
    lm = dymu.apply_vtu(bench_vlm_budgets.build_lm(ns))
    if compile_lm:
        compile_in_place(lm.model)
    gen = torch.Generator().manual_seed(ns.seed)
    label = "llava-1.5-7b LM" if shape == "7b" else f"llava-1.5 LM ({shape})"
    section = "vlm-compiled" if compile_lm else "vlm"
    label += ", compiled" if compile_lm else ""

    def unit(budget: str) -> list[Row]:
        rows = []
        for bsz in args.vlm_batches[:1] if compile_lm else args.vlm_batches:
            r = bench_vlm_budgets.run_row(ns, lm, budget, bsz, gen)
            low = budget == "low"
            rows += [
                Row(section, label, bsz, f"{budget} prefill", r["vanilla_ms"], r["vtu_ms"],
                    "ms", r["bound"], VLM_TARGETS.get((bsz, "prefill")) if low else None,
                    detail=r),
                Row(section, label, bsz, f"{budget} generate", r["vanilla_tps"], r["vtu_tps"],
                    "tok/s", None, VLM_TARGETS.get((bsz, "generate")) if low else None),
            ][: 1 if compile_lm else 2]  # compiled: prefill only  # fmt: skip
        return rows

    budgets = args.vlm_budgets[:1] if compile_lm else args.vlm_budgets
    return run_units(clock, section, budgets, unit)


def qwen_section(args: argparse.Namespace, clock: Clock, compile_lm: bool = False) -> list[Row]:
    warmup, count = reps(args, "qwen")
    cuda = args.device.startswith("cuda")
    ns = bench_vlm_qwen.parse_args(["--device", args.device, "--dtype", args.vlm_dtype])
    ns.shape = "quick" if args.quick else "7b" if cuda else "small"
    ns.reps, ns.warmup, ns.new_tokens = count, warmup, args.new_tokens or ns.new_tokens
    ns.warmup = max(ns.warmup, 2 * compile_lm)  # the compiles happen in untimed reps
    model = bench_vlm_qwen.build_model(ns)
    images, batches = bench_vlm_qwen.photo_inputs(ns)
    label = "Qwen2.5-VL-7B" if ns.shape == "7b" else f"Qwen2.5-VL ({ns.shape})"
    section = "qwen-compiled" if compile_lm else "qwen"
    label += ", LMs compiled" if compile_lm else ""

    def unit(budget: str) -> list[Row]:
        with torch.inference_mode():
            found = bench_vlm_qwen.calibrate(model, batches, bench_vlm_qwen.BUDGETS[budget])
        name = f"dymu+VTU {budget}"
        vanilla = bench_vlm_qwen.shared_copy(model) if compile_lm else model
        models = {"vanilla": vanilla, name: dymu.apply(bench_vlm_qwen.shared_copy(model), found)}
        encoders = {name: dymu.integrations.hf_qwen_vl.build_encoder(model, found)}
        for each in models.values() if compile_lm else ():
            compile_in_place(each.model.language_model)
        rows = []
        for bsz in args.vlm_batches[:1] if compile_lm else args.vlm_batches:
            chosen = [images[i % len(images)] for i in range(bsz)]
            base, ours = bench_vlm_qwen.bench_batch(models, encoders, chosen, ns)
            low = budget == "low" and bsz in (1, 16)  # the targets
            rows += [
                Row(section, label, bsz, f"{budget} prefill", base["prefill"], ours["prefill"],
                    "ms", base["flops"] / ours["flops"], 2.0 if low else None, detail=ours),
                Row(section, label, bsz, f"{budget} generate",
                    bsz * ns.new_tokens / base["generate"] * 1e3,
                    bsz * ns.new_tokens / ours["generate"] * 1e3, "tok/s", None,
                    1.0 if low else None),
            ]  # fmt: skip
        return rows

    budgets = args.qwen_budgets[:1] if compile_lm else args.qwen_budgets
    return run_units(clock, section, budgets, unit)


RUNNERS = {
    "encoder": encoder_section,
    "calibration": calibration_section,
    "tome": tome_section,
    "vlm": vlm_section,
    "qwen": qwen_section,
    "vlm-compiled": lambda args, clock: vlm_section(args, clock, compile_lm=True),
    "qwen-compiled": lambda args, clock: qwen_section(args, clock, compile_lm=True),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--quick", action="store_true", help=f"tiny shapes on CPU, one rep (CI): {QUICK}")
    add("--device", default=None, help="cuda (default where available) or cpu")
    dtypes = list(bench_encoder.DTYPES)
    add("--dtype", choices=dtypes, help="encoder, calibration, ToMe (fp16 on cuda, else fp32)")
    add("--vlm-dtype", choices=dtypes, help="VLM precision (default bf16 on cuda, else fp32)")
    sections_help = f"which to run, in order (also: {', '.join(OPT_IN)}, only when named)"
    add("--sections", nargs="+", choices=SECTIONS + OPT_IN, default=SECTIONS, help=sections_help)
    add("--encoder-models", nargs="+", default=[VIT_L, SO400M], help="dymu encoder names")
    add("--encoder-batches", nargs="+", type=int, default=[1, 8, 64], help="encoder batch sizes")
    add("--calib-model", default=VIT_L, help="the calibration section's encoder")
    add("--calib-images", type=int, default=256, help="images per calibration/plain run")
    add("--calib-batch", type=int, default=64, help="calibration batch size")
    add("--calib-runs", type=int, default=3, help="alternating runs of each; medians")
    add("--num-workers", type=int, default=None, help="calibration loader workers (cuda: 12)")
    add("--tome-models", nargs="+", default=["timm:vit_base_patch16_224",
        "timm:vit_large_patch16_224"], help="bench_tome model names")  # fmt: skip
    add("--tome-batch", type=int, default=256, help="ToMe batch size")
    add("--tome-r", nargs="+", type=int, default=[8, 16], help="ToMe r per block")
    budgets = list(bench_vlm_budgets.BUDGETS)
    add("--vlm-budgets", nargs="+", choices=budgets, default=budgets, help="later ones if time")
    add("--vlm-batches", nargs="+", type=int, default=[1, 16], help="VLM and Qwen batch sizes")
    qwen = list(bench_vlm_qwen.BUDGETS)
    add("--qwen-budgets", nargs="+", choices=qwen, default=["low"], help="Qwen2.5-VL budgets")
    add("--new-tokens", type=int, default=None, help="generated tokens (32 on cuda, else 4)")
    add("--reps", type=int, default=None, help="timed reps (default: encoder/ToMe 10, VLM 5)")
    add("--warmup", type=int, default=None, help="untimed reps (default: encoder/ToMe 3, VLM 1)")
    add("--time-limit", type=float, default=360.0, help="seconds; later parts are skipped")
    add("--json", default="bench_gpu.json", help="write the rows here ('' or --quick: none)")
    add("--plot", default="bench_gpu.png", help="bar chart here ('' or --quick: none)")
    add("--threads", type=int, default=None, help="torch.set_num_threads")
    if p.parse_known_args()[0].quick:  # quick sizes as defaults; explicit flags still win
        p.set_defaults(**QUICK, json=None, plot=None)
    args = p.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    args.vlm_dtype = args.vlm_dtype or ("bf16" if cuda else "fp32")
    args.num_workers = args.num_workers or (min(12, os.cpu_count() or 1) if cuda else 1)
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    args = parse_args()
    clock = Clock(args.time_limit)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = device_info(args.device, args.dtype, args.vlm_dtype)
    rows: list[Row] = []
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` or a scheduler: keep what was measured
    try:
        with quick_tower():  # the tiny tower's name resolves in every mode
            for section in args.sections:
                if not clock.allows():
                    rows.append(Row(section, "-", note=clock.why_not()))
                    continue
                rows += guarded(section, "-", lambda section=section: RUNNERS[section](args, clock))
                with contextlib.redirect_stdout(sys.stderr):  # the JSON so far, after each section
                    write_outputs(rows, info, clock.elapsed(), args.json, None, bench_encoder.plot)
    except KeyboardInterrupt:  # outside a unit (a section's setup)
        clock.interrupted = True
        rows.append(Row("-", "-", note="interrupted"))
    print_table(rows, info, clock.elapsed())
    write_outputs(rows, info, clock.elapsed(), args.json, args.plot, bench_encoder.plot)
    if clock.interrupted:
        sys.exit(1)


if __name__ == "__main__":
    main()
