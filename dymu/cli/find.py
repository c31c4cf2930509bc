"""``dymu-find-thresholds`` and its ``merge`` and ``convert`` subcommands."""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

from ..defaults import DTYPE_NAMES, INFERENCE_SAMPLE
from ..errors import DyMUError
from .common import (
    Options,
    Stop,
    add_device,
    add_max_pixels,
    add_model_config,
    add_tower_choice,
    interrupt_code,
    new_parser,
    positive,
    register_configs,
    schedule_type,
    tower_choice,
)

PROG = "dymu-find-thresholds"
USAGE = f"""{PROG} --data DATA [--model NAME | --hf-model PATH] [options]
       {PROG} merge PART [PART ...] --out FILE
       {PROG} convert CHECKPOINT --model NAME [--out FILE]"""
DESCRIPTION = """\
Find per-block DyMU merging thresholds on an image set (batch-level bipartite matching,
DToMe). The images stream through the vision tower once; the result is a safetensors file
for dymu.load_encoder(..., thresholds=FILE) or dymu-encode --thresholds FILE.

Bad images (missing, corrupt, too large) are skipped and listed in OUT.skipped.jsonl.
Progress is saved in OUT.partial every --checkpoint-every batches and whenever the run
stops (Ctrl-C, SIGTERM, an error): the same command with --resume continues from there.
A run holds OUT.lock while it goes; a second run on the same --out is refused.
Under torchrun the ranks split the batches and only rank 0 writes the result.

Subcommands:
  merge    add up results found on disjoint image sets (see '{prog} merge -h')
  convert  import a published DyMU reference checkpoint (see '{prog} convert -h')"""
EXAMPLES = f"""\
examples:
  # thresholds for CLIP ViT-L/14-336 (LLaVA-1.5's tower) from a JSON list of images
  {PROG} --data images.json --model ViT-L-14-336-tome --out ViT-L-14-336-tome.safetensors

  # 8 GPUs over webdataset shards, resumable after preemption
  torchrun --nproc-per-node 8 $(which {PROG}) --data 'shards/train-{{000..099}}.tar' \\
      --batch-size 64 --dtype bf16 --resume

  # the vision tower of a local transformers model (save_pretrained folder)
  {PROG} --data images/ --hf-model ./llava-1.5-7b-hf --r-total 400

  # Qwen2-VL / Qwen2.5-VL: images at the model's own dynamic resolution, whole 2x2 units
  # merged inside windows of 4x4 units; --r-total counts merges per window (of 16 units)
  {PROG} --data images/ --hf-model ./Qwen2.5-VL-7B-Instruct --r-total 12

  # a try on the bundled photos with random weights (no download)
  {PROG} --data examples/images.json --model ViT-B-16-tome-100out --pretrained none"""


def find_thresholds_parser() -> argparse.ArgumentParser:
    p = new_parser(PROG, DESCRIPTION.format(prog=PROG), EXAMPLES, USAGE)
    _add_image_options(p.add_argument_group("images"))
    _add_model_options(p.add_argument_group("model and merging"))
    _add_run_options(p.add_argument_group("running"))
    _add_output_options(p.add_argument_group("output and resuming"))
    return p


def _add_image_options(g: Options) -> None:
    g.add_argument(
        "--data",
        required=True,
        help='a JSON list of {"image": path}, a folder (recursive), webdataset shards '
        "('shards/train-{000..099}.tar', also pipe:CMD, http(s)://, s3://, gs:// URLs), or a "
        "Hugging Face dataset (hf:NAME[:SPLIT], a save_to_disk folder, parquet files)",
    )
    g.add_argument(
        "--image-root",
        default=None,
        help="folder the JSON's relative paths start from (default: the JSON's folder)",
    )
    g.add_argument(
        "--image-column",
        default=None,
        help="the image column of a Hugging Face dataset (default: its first Image column)",
    )
    g.add_argument(
        "--max-images",
        type=positive(1),
        default=None,
        help="stop after this many images (default: all)",
    )
    g.add_argument(
        "--shuffle-seed",
        type=int,
        default=None,
        help="shuffle the stream through a seeded 1000-image buffer (default: in order)",
    )
    add_max_pixels(g, "skip")
    g.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad image instead of skipping it (progress is kept)",
    )


def _add_model_options(g: Options) -> None:
    add_tower_choice(g)
    g.add_argument(
        "--r-total",
        type=positive(0),
        default=None,
        help="tokens removed per image on average, fewer than the patches (default: from the "
        "model name; with --hf-model two thirds of the patches; Qwen-VL: merges per window "
        "of 2x2 units, default two thirds of its units)",
    )
    g.add_argument(
        "--schedule",
        type=schedule_type,
        default=None,
        help="r per block: constant, linear, reverse-linear or a comma list "
        "(default: from the name)",
    )
    g.add_argument(
        "--dtype",
        default="fp32",
        choices=DTYPE_NAMES,
        help="model precision; statistics are accumulated in float64 regardless",
    )
    add_model_config(g)


def _add_run_options(g: Options) -> None:
    g.add_argument(
        "--batch-size",
        type=positive(1),
        default=32,
        help="images per calibration batch (the batch rule ranks pairs across it)",
    )
    g.add_argument(
        "--num-workers",
        type=positive(0),
        default=min(4, os.cpu_count() or 1),
        help="DataLoader workers decoding and preprocessing images (0: in this process)",
    )
    add_device(g, "cuda:LOCAL_RANK")


def _add_output_options(g: Options) -> None:
    g.add_argument(
        "--out",
        default=None,
        help="output file (default: <model>.safetensors, or <folder name>-tome.safetensors)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=positive(0),
        default=100,
        metavar="N",
        help="save progress to OUT.partial every N batches (0: only when the run stops)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT.partial (same command otherwise); without one, a notice and "
        "a fresh start, so a requeued job can always pass it",
    )
    g.add_argument(
        "--inference-sample",
        type=positive(0),
        default=INFERENCE_SAMPLE,
        metavar="N",
        help="after calibration, encode the first N images with the found thresholds and "
        "record their token counts (what inference keeps) in the file; 0: skip",
    )


def find_thresholds(args: argparse.Namespace) -> None:
    from ..calibration.config import CalibrationConfig

    register_configs(args.model_config)
    model, pretrained = tower_choice(args)
    cfg = CalibrationConfig(
        data=args.data,
        model=model,
        pretrained=pretrained or "openai",
        hf_model=args.hf_model,
        out=args.out,
        r_total=args.r_total,
        schedule=args.schedule,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        dtype=args.dtype,
        image_root=args.image_root,
        image_column=args.image_column,
        max_images=args.max_images,
        max_pixels=args.max_pixels,
        shuffle_seed=args.shuffle_seed,
        strict=args.strict,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        inference_sample=args.inference_sample,
    )
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = _calibrate(cfg, rank)
    except KeyboardInterrupt as exc:
        message, code = _interrupted(exc, cfg.out_path)
        raise Stop(message if rank == 0 else "", code) from None  # one line, not one a rank
    if rank == 0:
        _report(cfg, result)


def _calibrate(cfg, rank: int):
    """The run, with a progress bar on rank 0."""
    from tqdm import tqdm

    from ..calibration.job import run_calibration
    from ..encoder.factory import normalize_pretrained

    bar = None
    skipped = 0

    def on_start(total: int | None) -> None:
        nonlocal bar
        if not cfg.hf_model and normalize_pretrained(cfg.pretrained) is None and rank == 0:
            print("note: random weights (--pretrained none): thresholds only fit this seeded init")
        bar = tqdm(
            total=total, unit="img", desc="calibrating", dynamic_ncols=True, disable=rank != 0
        )

    def on_batch(batch, tokens) -> None:
        nonlocal skipped
        skipped += len(batch.skipped)
        bar.update(batch.size + len(batch.skipped))
        bar.set_postfix(tokens=f"{tokens.mean:.1f}", skipped=skipped)

    def on_sample(done: int, total: int) -> None:
        """The inference-sample pass gets a bar of its own (rank 0 only runs it)."""
        nonlocal bar
        if done == 0:
            bar.close()
            bar = tqdm(total=total, unit="img", desc="inference sample", dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        return run_calibration(cfg, on_batch, on_start, on_sample=on_sample)
    finally:
        if bar is not None:
            bar.close()


def _interrupted(exc: KeyboardInterrupt, out: Path) -> tuple[str, int]:
    """The one line an interrupted run ends with, naming what was kept."""
    why, code = interrupt_code(exc)
    kept = sorted(out.parent.glob(f"{out.name}.partial*"))
    kept = [p for p in kept if not p.name.endswith(".tmp")]
    if not kept:
        return f"{why} before the first batch was counted; nothing to resume", code
    where = str(kept[0]) if len(kept) == 1 else f"{out}.partial.rank*"
    return f"{why}; progress is in {where}: run the same command with --resume", code


def _report(cfg, result) -> None:
    th, tokens = result.thresholds, result.tokens
    print(f"{'block':>5} {'r':>4} {'threshold':>10} {'batches':>8}")
    rows = zip(th.r.tolist(), th.thresholds.tolist(), th.count.tolist(), strict=True)
    for i, (r, t, c) in enumerate(rows):
        print(f"{i:>5} {r:>4} {t:>10.4f} {c:>8}")
    print(
        f"tokens per image under the batch rule (calibration, prefix tokens included): mean "
        f"{tokens.mean:.1f}, min {tokens.low}, max {tokens.high}"
        + (f" (of {result.num_tokens})" if result.num_tokens else " (LLM tokens per frame)")
    )
    meta = th.metadata
    if "inference_images" in meta:
        print(
            f"tokens per image with these thresholds (inference, first "
            f"{meta['inference_images']} images): mean {meta['inference_tokens_mean']}, "
            f"std {meta['inference_tokens_std']}, min {meta['inference_tokens_min']}, max "
            f"{meta['inference_tokens_max']}"
        )
    if result.skipped:
        reasons = Counter(s["reason"].split(":")[0] for s in result.skipped)
        summary = ", ".join(f"{n} {why}" for why, n in reasons.most_common())
        print(
            f"skipped {len(result.skipped)} images ({summary}); "
            f"list in {cfg.out_path}.skipped.jsonl"
        )
    print(f"{meta['images']} images in {result.seconds:.1f}s; wrote {cfg.out_path}")


def merge_parser() -> argparse.ArgumentParser:
    p = new_parser(
        f"{PROG} merge",
        "Add up the sums and counts of threshold files found on disjoint image sets (same "
        "model, weights, schedule and batch size). Files that counted some of the same "
        "images (the same file twice, two runs over the same data) are refused.",
        f"example:\n  {PROG} merge part-a.safetensors part-b.safetensors --out all.safetensors",
    )
    p.add_argument("parts", nargs="+", help="threshold files to combine")
    p.add_argument("--out", required=True, help="output file (an existing one needs --force)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


def merge(args: argparse.Namespace) -> None:
    from ..calibration.coverage import merge_files
    from ..outputs import check_output

    out = Path(args.out)
    if out.exists() and not args.force:
        raise DyMUError(f"--out {out} exists: pass --force to overwrite it")
    check_output(out)
    total = merge_files(args.parts)
    total.save(args.out)
    images = total.metadata.get("images", "?")
    print(f"merged {len(args.parts)} files ({images} images); wrote {args.out}")


def convert_parser() -> argparse.ArgumentParser:
    p = new_parser(
        f"{PROG} convert",
        "Convert a published DyMU reference checkpoint (a .pth state dict with one "
        "'threshold' buffer per block) into a dymu thresholds file.",
        f"example:\n  {PROG} convert dymu_vit_l_336.pth --model ViT-L-14-336-tome",
    )
    p.add_argument("checkpoint", help="the reference .pth file")
    p.add_argument("--model", required=True, help="the dymu model name it was made for")
    p.add_argument("--pretrained", default="openai", help="the weights it was made with")
    p.add_argument("--out", default=None, help="output file (default: <model>.safetensors)")
    add_model_config(p)
    return p


def convert(args: argparse.Namespace) -> None:
    from .._version import __version__
    from ..encoder.names import resolve_name
    from ..engine.schedule import make_schedule
    from ..outputs import check_output
    from ..thresholds import Thresholds

    register_configs(args.model_config)
    out = args.out or f"{args.model}.safetensors"
    check_output(Path(out))
    spec = resolve_name(args.model)
    r = make_schedule(spec.r_total, spec.num_blocks, spec.schedule)
    meta = {
        "model": args.model,
        "pretrained": args.pretrained,
        "r_total": str(spec.r_total),
        "schedule": spec.schedule,
        "dymu_version": __version__,
    }
    th = Thresholds.from_reference_checkpoint(args.checkpoint, spec.num_blocks, r, meta)
    th.save(out)
    print(f"converted {spec.num_blocks} thresholds; wrote {out}")
