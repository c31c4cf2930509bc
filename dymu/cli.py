"""Console scripts: ``dymu-find-thresholds`` (also ``merge``, ``convert``), ``dymu-encode``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .data import load_rgb, stack_inputs
from .errors import DyMUError
from .factory import load_encoder, normalize_pretrained
from .job import DTYPES, CalibrationConfig, run_calibration
from .names import resolve_name
from .schedule import SCHEDULES, make_schedule
from .thresholds import Thresholds
from .visualize import merge_picture

DEFAULT_MODEL = "ViT-L-14-336-tome"


def _run(
    prog: str,
    main: Callable[[argparse.Namespace], None],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{prog}: %(message)s")
    try:
        main(args)
    except DyMUError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def _schedule(value: str) -> str | list[int]:
    if value in SCHEDULES:
        return value
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not one of {', '.join(SCHEDULES)} or a comma-separated list of ints"
        ) from None


def _add_model_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-config",
        action="append",
        default=[],
        metavar="JSON",
        help="register an extra open_clip model config (a file or folder); repeatable",
    )


def _register_configs(paths: list[str]) -> None:
    import open_clip

    for path in paths:
        if not Path(path).exists():
            raise DyMUError(f"model config not found: {path}")
        open_clip.add_model_config(path)


def find_thresholds_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dymu-find-thresholds",
        description=(
            "Find per-block DyMU merging thresholds on an image set (batch-level bipartite "
            "matching, DToMe): the images stream through the vision tower once and the "
            "result is a safetensors file for dymu.load_encoder(..., thresholds=FILE). Bad "
            "images are skipped and listed in OUT.skipped.jsonl. Under torchrun the ranks "
            "split the batches and only rank 0 writes. Subcommands: "
            "'dymu-find-thresholds merge PART... --out FILE' adds partial results; "
            "'dymu-find-thresholds convert CHECKPOINT.pth --model NAME' imports published "
            "reference thresholds."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data",
        required=True,
        help='a JSON list of {"image": path}, a folder (recursive) or webdataset shards '
        "such as 'shards/train-{000..099}.tar'",
    )
    _add_tower_choice(p)
    p.add_argument(
        "--out",
        default=None,
        help="output file (default: <model>.safetensors, or <folder name>-tome.safetensors)",
    )
    p.add_argument(
        "--r-total",
        type=int,
        default=None,
        help="tokens removed per image on average (default: from the model name; with "
        "--hf-model two thirds of the patches)",
    )
    p.add_argument(
        "--schedule",
        type=_schedule,
        default=None,
        help=f"r per block: {', '.join(SCHEDULES)} or a comma list (default: from the name)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="images per calibration batch (the batch rule ranks pairs across it)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="DataLoader workers decoding and preprocessing images",
    )
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available)"
    )
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=sorted(DTYPES),
        help="model precision; statistics are accumulated in float64 regardless",
    )
    p.add_argument(
        "--image-root",
        default=None,
        help="folder the JSON's relative paths start from (default: the JSON's folder)",
    )
    p.add_argument("--max-images", type=int, default=None, help="stop after this many images")
    p.add_argument(
        "--shuffle-seed",
        type=int,
        default=None,
        help="shuffle the stream through a seeded 1000-image buffer (default: in order)",
    )
    p.add_argument(
        "--strict", action="store_true", help="stop at the first bad image instead of skipping"
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        metavar="N",
        help="save progress to OUT.partial every N batches (0: never)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from OUT.partial (same command otherwise)",
    )
    _add_model_config(p)
    return p


def _add_tower_choice(p: argparse.ArgumentParser, pretrained_default: str = "openai") -> None:
    p.add_argument(
        "--model",
        default=None,
        help="dymu model name: <open_clip model>-tome[-<K>out][-linear|-reverse-linear]; "
        "the open_clip model may be a CLIP or a SigLIP/SigLIP2 (timm) tower "
        f"(default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="open_clip weights tag, a checkpoint path, or 'none' for random weights "
        f"(default: {pretrained_default})",
    )
    p.add_argument(
        "--hf-model",
        metavar="PATH",
        default=None,
        help="a local transformers model folder (save_pretrained) instead of --model: a "
        "vision model (CLIP, SigLIP, SigLIP2, ViT) or a VLM, whose vision tower is used",
    )


def _tower_choice(args: argparse.Namespace) -> tuple[str, str | None]:
    """(model, pretrained) from --model/--pretrained or --hf-model, which exclude each other."""
    if args.hf_model is not None:
        if args.model is not None or args.pretrained is not None:
            raise DyMUError(
                "--hf-model brings its own tower and weights: drop --model/--pretrained"
            )
        return args.hf_model, None
    return args.model or DEFAULT_MODEL, args.pretrained


def _find_thresholds(args: argparse.Namespace) -> None:
    _register_configs(args.model_config)
    model, pretrained = _tower_choice(args)
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
        max_images=args.max_images,
        shuffle_seed=args.shuffle_seed,
        strict=args.strict,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    rank = int(os.environ.get("RANK", "0"))
    if not cfg.hf_model and normalize_pretrained(cfg.pretrained) is None and rank == 0:
        print("note: random weights (--pretrained none): thresholds only fit this seeded init")
    bar = None
    skipped = 0

    def on_start(total: int | None) -> None:
        nonlocal bar
        bar = tqdm(
            total=total, unit="img", desc="calibrating", dynamic_ncols=True, disable=rank != 0
        )

    def on_batch(batch, tokens) -> None:
        nonlocal skipped
        skipped += len(batch.skipped)
        bar.update(batch.size + len(batch.skipped))
        bar.set_postfix(tokens=f"{tokens.mean:.1f}", skipped=skipped)

    try:
        result = run_calibration(cfg, on_batch, on_start)
    except KeyboardInterrupt:
        raise DyMUError(
            f"interrupted; progress is in {cfg.out_path}.partial: run the same command "
            "with --resume to continue"
        ) from None
    finally:
        if bar is not None:
            bar.close()
    if rank != 0:
        return
    th, tokens = result.thresholds, result.tokens
    print(f"{'block':>5} {'r':>4} {'threshold':>10} {'batches':>8}")
    rows = zip(th.r.tolist(), th.thresholds.tolist(), th.count.tolist(), strict=True)
    for i, (r, t, c) in enumerate(rows):
        print(f"{i:>5} {r:>4} {t:>10.4f} {c:>8}")
    print(
        f"tokens per image during calibration (prefix tokens included): mean {tokens.mean:.1f}, "
        f"min {tokens.low}, max {tokens.high} (of {result.num_tokens})"
    )
    if result.skipped:
        reasons = Counter(s["reason"].split(":")[0] for s in result.skipped)
        summary = ", ".join(f"{n} {why}" for why, n in reasons.most_common())
        print(
            f"skipped {len(result.skipped)} images ({summary}); "
            f"list in {cfg.out_path}.skipped.jsonl"
        )
    print(f"{th.metadata['images']} images in {result.seconds:.1f}s; wrote {cfg.out_path}")


def merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dymu-find-thresholds merge",
        description="Add the sums and counts of threshold files found on disjoint image sets "
        "(they must share model, weights, schedule and batch size).",
    )
    p.add_argument("parts", nargs="+", help="threshold files to combine")
    p.add_argument("--out", required=True, help="output file")
    return p


def _merge(args: argparse.Namespace) -> None:
    parts = [Thresholds.load(p) for p in args.parts]
    total = parts[0]
    for part in parts[1:]:
        total = total.merge(part)
    total.save(args.out)
    images = total.metadata.get("images", "?")
    print(f"merged {len(parts)} files ({images} images); wrote {args.out}")


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dymu-find-thresholds convert",
        description="Convert a published DyMU reference checkpoint (a .pth state dict with one "
        "'threshold' buffer per block) into a dymu thresholds file.",
    )
    p.add_argument("checkpoint", help="the reference .pth file")
    p.add_argument("--model", required=True, help="the dymu model name it was made for")
    p.add_argument("--pretrained", default="openai", help="the weights it was made with")
    p.add_argument("--out", default=None, help="output file (default: <model>.safetensors)")
    _add_model_config(p)
    return p


def _convert(args: argparse.Namespace) -> None:
    _register_configs(args.model_config)
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
    out = args.out or f"{args.model}.safetensors"
    th.save(out)
    print(f"converted {spec.num_blocks} thresholds; wrote {out}")


def find_thresholds_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dymu-find-thresholds`` and its ``merge``/``convert`` subcommands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        return _run("dymu-find-thresholds merge", _merge, merge_parser(), argv[1:])
    if argv and argv[0] == "convert":
        return _run("dymu-find-thresholds convert", _convert, convert_parser(), argv[1:])
    return _run("dymu-find-thresholds", _find_thresholds, find_thresholds_parser(), argv)


def encode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dymu-encode",
        description="Encode images with a DyMU encoder and print how many tokens each keeps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("images", nargs="+", help="image files")
    _add_tower_choice(p, "what the thresholds file was made with, else openai")
    p.add_argument(
        "--thresholds",
        default=None,
        help="thresholds file (default: looked up by model name; required with --hf-model)",
    )
    p.add_argument(
        "--per-block", action="store_true", help="print the token count after every block"
    )
    p.add_argument(
        "--show",
        metavar="DIR",
        default=None,
        help="also write DIR/<image>.dymu.png: the input beside its merged groups, each "
        "painted in its mean colour",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    _add_model_config(p)
    return p


def _encode(args: argparse.Namespace) -> None:
    _register_configs(args.model_config)
    model, pretrained = _tower_choice(args)
    thresholds = Thresholds.load(args.thresholds) if args.thresholds else None
    if pretrained is None and args.hf_model is None:
        pretrained = thresholds.metadata.get("pretrained", "openai") if thresholds else "openai"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_encoder(model, pretrained, thresholds=thresholds, device=device)
    width = max(len(p) for p in args.images)
    for path in args.images:
        inputs = stack_inputs([encoder.preprocess(load_rgb(path))])
        with torch.inference_mode():
            out = encoder(inputs)
        line = f"{path:<{width}}  {int(out.lengths[0]):>4} tokens"
        if args.per_block:
            line += "  per block: " + " ".join(str(v) for v in out.block_lengths[0].tolist())
        if args.show:
            line += "  -> " + str(_show(Path(args.show), path, inputs, out, encoder))
        print(line)


def _show(folder: Path, path: str, inputs, out, encoder) -> Path:
    """Write the merge picture of one image; the name follows the image's."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{Path(path).stem}.dymu.png"
    rows, cols = encoder.tower.patch_grid(inputs, 0)
    caption = f"{Path(path).name}: {int(out.lengths[0])} tokens from {rows * cols} patches"
    merge_picture(encoder, inputs, out, caption).save(target)
    return target


def encode_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dymu-encode``."""
    return _run("dymu-encode", _encode, encode_parser(), argv)
