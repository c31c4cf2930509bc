"""Console scripts: ``dymu-find-thresholds`` and ``dymu-encode``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from .calibrate import find_thresholds
from .data import iterate_batches, load_rgb, read_image_list
from .errors import DyMUError
from .factory import build_encoder, load_encoder
from .schedule import SCHEDULES
from .thresholds import Thresholds

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


def _device(name: str | None) -> str:
    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _schedule(value: str) -> str | list[int]:
    if value in SCHEDULES:
        return value
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not one of {', '.join(SCHEDULES)} or a comma-separated list of ints"
        ) from None


def find_thresholds_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dymu-find-thresholds",
        description=(
            "Find per-block DyMU merging thresholds on an image set (batch-level bipartite "
            "matching, DToMe). Streams the images through the vision tower once and writes "
            "a safetensors file that `dymu.load_encoder(..., thresholds=FILE)` uses."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help='JSON list of {"image": "path"} entries')
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="dymu model name: <open_clip model>-tome[-<K>out][-linear|-reverse-linear]",
    )
    p.add_argument(
        "--pretrained",
        default="openai",
        help="open_clip weights tag, a checkpoint path, or 'none' for random weights",
    )
    p.add_argument("--out", default=None, help="output file (default: <model>.safetensors)")
    p.add_argument(
        "--r-total",
        type=int,
        default=None,
        help="tokens removed per image on average (default: from the model name)",
    )
    p.add_argument(
        "--schedule",
        type=_schedule,
        default=None,
        help=f"r per block: {', '.join(SCHEDULES)} or a comma list (default: from name)",
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
        help="DataLoader workers decoding images",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument(
        "--image-root",
        default=None,
        help="folder the JSON's relative paths start from (default: the JSON's folder)",
    )
    return p


def _find_thresholds(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise DyMUError("--batch-size must be at least 1")
    paths = read_image_list(args.data, args.image_root)
    device = _device(args.device)
    encoder = build_encoder(args.model, args.pretrained, device=device)
    weights = encoder.pretrained
    if weights == "none":
        print("note: random weights (--pretrained none): thresholds only fit this seeded init")
    out = Path(args.out or f"{args.model}.safetensors")
    batches = iterate_batches(paths, encoder.preprocess, args.batch_size, args.num_workers)
    lengths: list[torch.Tensor] = []
    bar = tqdm(total=len(paths), unit="img", desc="calibrating", dynamic_ncols=True)

    def on_batch(output) -> None:
        lengths.append(output.lengths.cpu())
        bar.update(output.lengths.numel())
        bar.set_postfix(tokens=f"{torch.cat(lengths).float().mean():.1f}")

    start = time.perf_counter()
    with bar:
        result = find_thresholds(
            encoder, batches, r_total=args.r_total, schedule=args.schedule, on_batch=on_batch
        )
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    counts = torch.cat(lengths).float()
    print(f"{'block':>5} {'r':>4} {'threshold':>10} {'batches':>8}")
    for i, (r, t, c) in enumerate(
        zip(result.r.tolist(), result.thresholds.tolist(), result.count.tolist(), strict=True)
    ):
        print(f"{i:>5} {r:>4} {t:>10.4f} {c:>8}")
    print(
        f"tokens per image during calibration (class token included): mean {counts.mean():.1f}, "
        f"min {counts.min():.0f}, max {counts.max():.0f} (of {encoder.tower.num_tokens})"
    )
    print(f"{len(paths)} images in {seconds:.1f}s; wrote {out}")


def find_thresholds_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dymu-find-thresholds``."""
    return _run("dymu-find-thresholds", _find_thresholds, find_thresholds_parser(), argv)


def encode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dymu-encode",
        description="Encode images with a DyMU encoder and print how many tokens each keeps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", default=DEFAULT_MODEL, help="dymu model name")
    p.add_argument(
        "--thresholds", default=None, help="thresholds file (default: looked up by model name)"
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="weights tag, checkpoint path or 'none' "
        "(default: what the thresholds file was made with, else openai)",
    )
    p.add_argument(
        "--per-block", action="store_true", help="print the token count after every block"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    return p


def _encode(args: argparse.Namespace) -> None:
    pretrained = args.pretrained
    thresholds = Thresholds.load(args.thresholds) if args.thresholds else None
    if pretrained is None:
        pretrained = thresholds.metadata.get("pretrained", "openai") if thresholds else "openai"
    encoder = load_encoder(
        args.model, pretrained, thresholds=thresholds, device=_device(args.device)
    )
    width = max(len(p) for p in args.images)
    for path in args.images:
        pixels = encoder.preprocess(load_rgb(path))[None]
        with torch.inference_mode():
            out = encoder(pixels)
        line = f"{path:<{width}}  {int(out.lengths[0]):>4} tokens"
        if args.per_block:
            line += "  per block: " + " ".join(str(v) for v in out.block_lengths[0].tolist())
        print(line)


def encode_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dymu-encode``."""
    return _run("dymu-encode", _encode, encode_parser(), argv)
