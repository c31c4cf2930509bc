"""``dymu-encode``: encode images and print how many tokens each keeps."""

from __future__ import annotations

import argparse
import logging
import os
import stat
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
log = logging.getLogger(__name__)
_BAR_FROM = 9  # images from which a progress bar shows
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
        "--batch-size",
        type=positive(1),
        default=16,
        help="images encoded together (the counts do not depend on it)",
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
    bar = _progress(len(args.images))
    with bar:
        for start in range(0, len(args.images), args.batch_size):
            paths = args.images[start : start + args.batch_size]
            for path, (text, length) in zip(
                paths, _encode_batch(encoder, paths, args, pictures), strict=True
            ):
                if length is None:
                    failed.append(path)
                    bar.write(f"{PROG}: {text}", file=sys.stderr)
                else:
                    lengths.append(length)
                    bar.write(f"{path:<{width}}  {text}", file=sys.stdout)
            bar.update(len(paths))
    _summary(encoder, lengths)
    if failed:
        raise Stop(f"{len(failed)} of {len(args.images)} images failed (first: {failed[0]})", 1)
    return 0


def _progress(total: int):
    """A progress bar on stderr, for more than a few images."""
    from tqdm import tqdm

    return tqdm(
        total=total, unit="image", desc="encoding", file=sys.stderr, disable=total < _BAR_FROM
    )


def _load(args: argparse.Namespace, device: str):
    from ..encoder.factory import load_encoder
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


def _encode_batch(
    encoder, paths: list[str], args: argparse.Namespace, pictures
) -> list[tuple[str, int | None]]:
    """Per image: its line of output and token count, or its error and None. The readable
    images are encoded as one batch (each image's count is what it gets alone)."""
    import torch

    from ..sources.stream import stack_inputs

    results: list[tuple[str, int | None]] = [("", None)] * len(paths)
    good, items = [], []
    for i, path in enumerate(paths):
        try:
            items.append(encoder.preprocess(_read(path, args.max_pixels)))
        except DyMUError as exc:
            results[i] = str(exc), None
            continue
        good.append(i)
    if not good:
        return results
    inputs = stack_inputs(items)
    try:
        with torch.inference_mode():
            out = encoder(inputs)
    except torch.OutOfMemoryError:
        if len(good) == 1:
            raise DyMUError(f"out of memory encoding {paths[good[0]]}") from None
        inputs = items = None  # let the failed batch's memory go before retrying
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("out of memory on a batch of %d images: encoding them one by one", len(good))
        for i in good:
            results[i] = _encode_batch(encoder, [paths[i]], args, pictures)[0]
        return results
    # the host's copy of the lengths; per-block counts read once per batch when asked for
    lengths = out.host_lengths if out.host_lengths is not None else out.lengths.tolist()
    per_block = out.block_lengths.tolist() if args.per_block else None
    for index, i in enumerate(good):
        length = lengths[index]
        line = f"{length:>4} tokens"
        if per_block is not None:
            line += "  per block: " + " ".join(map(str, per_block[index]))
        try:
            if pictures is not None:
                picture = _show(pictures[paths[i]], paths[i], inputs, out, encoder, index)
                line += f"  -> {picture}"
        except DyMUError as exc:
            results[i] = str(exc), None
            continue
        results[i] = line, length
    return results


def _read(path: str, max_pixels: int):
    """Decode one image file; what cannot be read as a file is refused with its reason."""
    from ..sources.stream import load_rgb

    reason = _unreadable(path)
    if reason is not None:
        raise DyMUError(f"cannot read image {path}: {reason}")
    return load_rgb(path, max_pixels)


def _unreadable(path: str) -> str | None:
    """Why ``path`` is no readable regular file (a directory, a device, a pipe, no
    permission, an I/O error), or None. Pipes are refused before opening (no waiting)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "missing file"
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISDIR(info.st_mode):
        return "it is a directory"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a device, pipe or socket)"
    try:
        with open(path, "rb") as fh:
            head = fh.read(1)
    except OSError as exc:
        return exc.strerror or str(exc)
    if head and info.st_size == 0:
        return "a special file that reports no size (e.g. under /proc)"
    return None


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


def _show(target: Path, path: str, inputs, out, encoder, index: int) -> Path:
    """Write the merge picture of image ``index`` of the batch."""
    from ..encoder.visualize import merge_picture

    rows, cols = encoder.tower.patch_grid(inputs, index)
    what = "2x2 units" if hasattr(encoder.tower, "unit") else "patches"  # Qwen-VL: units merge
    caption = f"{Path(path).name}: {int(out.lengths[index])} tokens from {rows * cols} {what}"
    try:
        merge_picture(encoder, inputs, out, caption, index).save(target)
    except OSError as exc:
        raise DyMUError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target
