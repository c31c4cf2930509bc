"""``dymu-encode``: encode images and print how many tokens each keeps."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from ..errors import DyMUError, MissingThresholds
from .common import (
    Stop,
    add_image_limits,
    add_model_config,
    add_tower_choice,
    new_parser,
    positive,
    register_configs,
    tower_choice,
)

PROG = "dymu-encode"
EXAMPLES = f"""\
examples:
  {PROG} photo.jpg scan.png --thresholds ViT-L-14-336-tome.safetensors
  {PROG} images/*.jpg --model ViT-B-16-tome-100out --thresholds t.safetensors --show pictures/
  {PROG} photo.jpg --hf-model ./llava-1.5-7b-hf --thresholds llava-1.5-7b-hf-tome.safetensors

A bad image is reported and the others are still encoded; the exit code is 1 if any failed.
Token counts include prefix tokens (class token, registers). They are what inference keeps;
the count printed during calibration is the batch rule's, which differs (see the README)."""


def encode_parser() -> argparse.ArgumentParser:
    p = new_parser(
        PROG,
        "Encode images with a DyMU encoder and print how many tokens each keeps.",
        EXAMPLES,
    )
    p.add_argument("images", nargs="+", help="image files")
    add_tower_choice(p, "what the thresholds file was made with, else openai")
    p.add_argument(
        "--thresholds",
        default=None,
        help="thresholds file (default: looked up by model name in the shipped folder and "
        "$DYMU_THRESHOLDS; required with --hf-model)",
    )
    p.add_argument(
        "--r-total",
        type=positive(0),
        default=None,
        help="the schedule's tokens removed per image (default: from the name or the file); "
        "0 encodes without merging and needs no thresholds",
    )
    p.add_argument(
        "--per-block", action="store_true", help="print the token count after every block"
    )
    p.add_argument(
        "--show",
        metavar="DIR",
        default=None,
        help="also write DIR/<image>.dymu.png: the input beside its merged groups, each "
        "painted in its mean colour (images with the same file name get their folder's too)",
    )
    add_image_limits(p, "refuse", "cuda")
    add_model_config(p)
    return p


def encode(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..outputs import check_folder

    register_configs(args.model_config)
    device = resolve_device(args.device)
    pictures = None
    if args.show:
        check_folder(Path(args.show), "--show")
        pictures = picture_names(args.images, Path(args.show))
    encoder = _load(args, device)
    failed = []
    lengths = []
    width = max(len(p) for p in args.images)
    for path in args.images:
        try:
            line, length = _encode_one(encoder, path, args, pictures)
        except DyMUError as exc:
            failed.append(path)
            print(f"{PROG}: {exc}", file=sys.stderr)
            continue
        lengths.append(length)
        print(f"{path:<{width}}  {line}")
    _summary(encoder, lengths)
    if failed:
        raise Stop(f"{len(failed)} of {len(args.images)} images failed (first: {failed[0]})", 1)
    return 0


def _load(args: argparse.Namespace, device: str):
    from ..factory import load_encoder
    from ..thresholds import Thresholds

    model, pretrained = tower_choice(args)
    thresholds = Thresholds.load(args.thresholds) if args.thresholds else None
    if pretrained is None and args.hf_model is None:
        pretrained = thresholds.metadata.get("pretrained", "openai") if thresholds else "openai"
    overrides = {} if args.r_total is None else {"r_total": args.r_total}
    try:
        return load_encoder(model, pretrained, thresholds=thresholds, device=device, **overrides)
    except MissingThresholds as exc:
        raise DyMUError(
            exc.advice("pass --thresholds FILE", "--r-total 0 encodes without merging")
        ) from None


def _encode_one(encoder, path: str, args: argparse.Namespace, pictures) -> tuple[str, int]:
    """One image: its line of output (the picture written, if asked) and its token count."""
    import torch

    from ..data import load_rgb, stack_inputs

    inputs = stack_inputs([encoder.preprocess(load_rgb(path, args.max_pixels))])
    with torch.inference_mode():
        out = encoder(inputs)
    length = int(out.lengths[0])
    line = f"{length:>4} tokens"
    if args.per_block:
        line += "  per block: " + " ".join(str(v) for v in out.block_lengths[0].tolist())
    if pictures is not None:
        line += "  -> " + str(_show(pictures[path], path, inputs, out, encoder))
    return line, length


def _summary(encoder, lengths: list[int]) -> None:
    """With several images: their mean, beside what the thresholds file measured."""
    if len(lengths) < 2:
        return
    line = f"mean {sum(lengths) / len(lengths):.1f} tokens over {len(lengths)} images"
    meta = encoder.thresholds.metadata if encoder.thresholds is not None else {}
    if "inference_tokens_mean" in meta:
        line += (
            f" (the thresholds file kept {meta['inference_tokens_mean']} on average over "
            f"{meta['inference_images']} of its calibration images"
        )
        if "calibration_tokens_mean" in meta:
            line += f"; its batch rule kept {meta['calibration_tokens_mean']} while calibrating"
        line += ")"
    print(line)


def picture_names(images: list[str], folder: Path) -> dict[str, Path]:
    """Where each image's picture goes: ``<stem>.dymu.png``; images sharing a file name get
    their folders in it (``a/cat.jpg`` -> ``a-cat.dymu.png``), and any name still shared a
    number, so no picture overwrites another."""
    stems = Counter(Path(p).stem for p in dict.fromkeys(images))
    names: dict[str, str] = {}
    for path in dict.fromkeys(images):
        stem = Path(path).stem
        if stems[stem] > 1:
            parts = Path(path).resolve().with_suffix("").parts
            stem = "-".join(parts[-2:]) if len(parts) > 1 else stem
        names[path] = stem
    used: set[str] = set()
    out = {}
    for path, stem in names.items():
        name, number = stem, 1
        while name in used:
            number += 1
            name = f"{stem}-{number}"
        used.add(name)
        out[path] = folder / f"{name}.dymu.png"
    return out


def _show(target: Path, path: str, inputs, out, encoder) -> Path:
    """Write the merge picture of one image."""
    from ..visualize import merge_picture

    rows, cols = encoder.tower.patch_grid(inputs, 0)
    caption = f"{Path(path).name}: {int(out.lengths[0])} tokens from {rows * cols} patches"
    try:
        merge_picture(encoder, inputs, out, caption).save(target)
    except OSError as exc:
        raise DyMUError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target
