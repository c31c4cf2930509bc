"""Benchmark threshold finding: throughput against a plain open_clip forward, and flat memory.

Two measurements, for one model with random (seeded) weights (``--pretrained none``):

1. Throughput. Images/s of threshold finding (:func:`dymu.calibration.job.run_calibration`, what
   ``dymu-find-thresholds`` runs) against a plain open_clip forward
   (``enc.tower.module(pixels)`` under ``torch.inference_mode``) over the same stream: the
   same source, ``ImageStream`` + ``iterate_batches`` with the same batch size and workers.
   Both clocks start when the stream starts (calibration: at ``on_start``, once its data and
   model are ready; its setup time is shown apart) and stop when the last batch is done.
   Runs alternate (plain/calibration, then calibration/plain, ...) after one untimed warmup
   batch of each; the medians are compared. Target: calibration >= 0.9x plain images/s.
2. Memory. Peak RSS (``VmHWM``) of the main process of a calibration run over N images and
   over 4N images, each in a fresh subprocess (this script with ``--child``). Target: the 4N
   run's peak within 10% of the N run's. Building the model (the whole CLIP model, text tower
   included) can set the process peak before the first batch, which would hide growth
   during the stream; so the peak is also reset at ``on_start`` (``/proc/self/clear_refs``)
   and the stream's own peak is shown and checked against the same target (``loop peak``).
   ``at start`` is the RSS when the stream starts, ``worker`` the largest peak RSS of a
   DataLoader worker (pages shared with the main process included).

The data are synthetic JPEGs (~336 px), written once to a temporary folder: the bundled
photos (``examples/images/``) cycled with small random crops, flips, brightness changes and
noise, so every file is distinct. They are read through JSON lists (``images_<n>.json``).

Run from the repository root (about 2-3 minutes with the defaults on 2 CPU cores)::

    python scripts/bench_calibration.py
    python scripts/bench_calibration.py --images 32 --runs 2 --batch-size 4 --num-workers 2
    python scripts/bench_calibration.py --quick   # a smoke run: what CI runs
    python scripts/bench_calibration.py --device cuda --dtype fp16 --batch-size 64 --skip-memory
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance
from support.rss import children_peak_rss_mib, peak_rss_mib, reset_peak_rss, rss_mib

import dymu
from dymu.calibration.job import DTYPES, CalibrationConfig, run_calibration
from dymu.sources.stream import ImageStream, iterate_batches, load_rgb, open_source

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "examples" / "images"
THROUGHPUT_TARGET = 0.9  # calibration images/s / plain images/s, at least
MEMORY_TARGET = 1.10  # peak RSS over 4N images / over N images, at most


# ---------------------------------------------------------------------------------------
# data


def synthesize(folder: Path, count: int, size: int = 336, seed: int = 0) -> list[str]:
    """Write ``count`` distinct JPEGs made from the bundled photos; their names, in order."""
    rng = random.Random(seed)
    photos = [load_rgb(p) for p in sorted(PHOTOS.glob("*.jpg"))]
    if not photos:
        raise SystemExit(f"no photos in {PHOTOS}")
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        img = photos[i % len(photos)]
        w, h = img.size
        scale = rng.uniform(0.8, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = img.crop((left, top, left + cw, top + ch))
        ratio = size / max(img.size)
        img = img.resize((round(img.width * ratio), round(img.height * ratio)), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
        arr = np.asarray(img, dtype=np.float32)
        noise = np.random.default_rng(seed * 100003 + i).normal(0.0, 4.0, arr.shape)
        img = Image.fromarray((arr + noise).clip(0, 255).astype(np.uint8))
        name = f"img_{i:05d}.jpg"
        img.save(folder / name, quality=90)
        names.append(name)
    return names


def write_list(folder: Path, names: list[str]) -> Path:
    path = folder / f"images_{len(names)}.json"
    path.write_text(json.dumps([{"image": f"images/{n}"} for n in names]))
    return path


# ---------------------------------------------------------------------------------------
# throughput


def calibration_config(args: argparse.Namespace, data: Path, out: Path) -> CalibrationConfig:
    return CalibrationConfig(
        data=str(data),
        model=args.model,
        pretrained="none",
        out=str(out),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        checkpoint_every=0,
        inference_sample=0,  # time the calibration pass alone
        device=args.device,
        dtype=args.dtype,
    )


def time_plain(enc: dymu.DyMUEncoder, data: Path, args: argparse.Namespace) -> tuple[float, int]:
    """Seconds and images of a plain open_clip forward over the stream."""
    source = open_source(str(data))
    stream = ImageStream(source, enc.preprocess)
    images = 0
    param = next(enc.parameters())
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in iterate_batches(stream, args.batch_size, args.num_workers):
            if batch.pixels is not None:
                enc.tower.module(batch.pixels.to(param.device, param.dtype))
                images += batch.size
    synchronize(args)
    return time.perf_counter() - start, images


def synchronize(args: argparse.Namespace) -> None:
    """Wait for the GPU's queued work, so a clock read after it covers it."""
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calibration(
    data: Path, out: Path, args: argparse.Namespace
) -> tuple[float, int, float, float]:
    """Seconds (from ``on_start``), images, setup seconds and mean tokens of one run."""
    marks: dict[str, float] = {}
    called = time.perf_counter()
    result = run_calibration(
        calibration_config(args, data, out),
        on_start=lambda total: marks.setdefault("start", time.perf_counter()),
    )
    seconds = time.perf_counter() - marks["start"]
    return seconds, result.tokens.images, marks["start"] - called, result.tokens.mean


def bench_throughput(args: argparse.Namespace, data: Path, work: Path) -> tuple[float, float]:
    enc = dymu.build_encoder(
        args.model, pretrained=None, device=args.device, dtype=DTYPES[args.dtype]
    )
    # untimed warmup: first-call costs of both paths (kernels, allocator)
    warm = torch.stack([enc.preprocess(load_rgb(p)) for p in sorted(PHOTOS.glob("*.jpg"))])
    warm = warm[torch.arange(args.batch_size) % len(warm)].to(args.device, DTYPES[args.dtype])
    with torch.inference_mode():
        enc.tower.module(warm)
        enc.calibrate(warm)
    plain: list[float] = []
    calib: list[float] = []
    print(f"throughput: {args.runs} run(s) each, alternating; images/s (seconds)")
    header = f"  {'run':>4} {'order':<18} {'plain':>16} {'calibration':>16} {'setup s':>8}"
    print(header)
    for run in range(args.runs):
        order = ["plain", "calibration"] if run % 2 == 0 else ["calibration", "plain"]
        cells: dict[str, str] = {}
        setup = 0.0
        for kind in order:
            if kind == "plain":
                seconds, images = time_plain(enc, data, args)
                plain.append(images / seconds)
            else:
                out = work / f"thresholds_{run}.safetensors"
                seconds, images, setup, tokens = time_calibration(data, out, args)
                calib.append(images / seconds)
            if images != args.images:
                raise SystemExit(f"{kind} saw {images} images, expected {args.images}")
            cells[kind] = f"{images / seconds:7.2f} ({seconds:5.1f})"
        print(
            f"  {run + 1:>4} {'/'.join(order):<18} {cells['plain']:>16} "
            f"{cells['calibration']:>16} {setup:>8.1f}"
        )
    plain_med, calib_med = statistics.median(plain), statistics.median(calib)
    print(f"  {'med':>4} {'':<18} {plain_med:>16.2f} {calib_med:>16.2f}")
    print(f"  final tokens per image (calibration, mean): {tokens:.1f}")
    return plain_med, calib_med


# ---------------------------------------------------------------------------------------
# memory


def child(args: argparse.Namespace) -> None:
    """One calibration run in this (fresh) process; prints its memory readings as JSON."""
    readings: dict[str, float] = {}
    trace: list[float] = []

    def on_start(total: int | None) -> None:
        readings["start_rss"] = rss_mib()
        readings["setup_peak"] = peak_rss_mib()
        readings["reset"] = reset_peak_rss()
        readings["start"] = time.perf_counter()

    def on_batch(batch, tokens) -> None:
        trace.append(rss_mib())

    result = run_calibration(
        calibration_config(args, args.data, args.out), on_batch=on_batch, on_start=on_start
    )
    seconds = time.perf_counter() - readings["start"]
    loop_peak = peak_rss_mib() if readings["reset"] else None
    worker = children_peak_rss_mib()
    quarters = [trace[max(0, round(len(trace) * q) - 1)] for q in (0.25, 0.5, 0.75, 1.0)]
    print(
        json.dumps(
            {
                "images": result.tokens.images,
                "seconds": seconds,
                "start_rss": readings["start_rss"],
                "setup_peak": readings["setup_peak"],
                "peak": max(peak_rss_mib(), readings["setup_peak"]),
                "loop_peak": loop_peak,
                "worker_peak": worker,
                "rss_quarters": quarters,
            }
        )
    )


def run_child(args: argparse.Namespace, data: Path, out: Path) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--num-workers",
        str(args.num_workers),
        "--data",
        str(data),
        "--out",
        str(out),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child run over {data} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memory(
    args: argparse.Namespace, lists: dict[int, Path], work: Path
) -> tuple[float, float | None]:
    """Peak ratios 4N / N: whole process, and the stream alone (None if not measurable)."""
    print("memory: RSS of the main process, one fresh subprocess per run (MiB)")
    print(
        f"  {'images':>6} {'setup pk':>8} {'at start':>8} {'peak':>6} {'loop pk':>7} "
        f"{'worker':>6} {'img/s':>6}  RSS after 25/50/75/100% of batches"
    )
    runs = []
    for n in (args.images, 4 * args.images):
        r = run_child(args, lists[n], work / f"memory_{n}.safetensors")
        if r["images"] != n:
            raise SystemExit(f"memory run saw {r['images']} images, expected {n}")
        runs.append(r)
        quarters = " ".join(f"{v:.0f}" for v in r["rss_quarters"])
        loop = f"{r['loop_peak']:.0f}" if r["loop_peak"] is not None else "n/a"
        print(
            f"  {n:>6} {r['setup_peak']:>8.0f} {r['start_rss']:>8.0f} {r['peak']:>6.0f} "
            f"{loop:>7} {r['worker_peak']:>6.0f} {n / r['seconds']:>6.2f}  {quarters}"
        )
    small, large = runs
    loop_ratio = None
    if small["loop_peak"] is not None and large["loop_peak"] is not None:
        loop_ratio = large["loop_peak"] / small["loop_peak"]
    return large["peak"] / small["peak"], loop_ratio


# ---------------------------------------------------------------------------------------


QUICK = dict(images=8, runs=1, batch_size=4)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16-tome-100out")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument(
        "--images", type=int, default=96, help="N: images per throughput run and memory run 1x"
    )
    parser.add_argument("--runs", type=int, default=3, help="throughput runs of each kind")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu, cuda (default: cpu)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="model precision")
    parser.add_argument("--quick", action="store_true", help=f"smoke run (what CI runs): {QUICK}")
    if parser.parse_known_args()[0].quick:  # quick sizes as defaults; explicit flags still win
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    if not args.child and (args.images < 1 or args.runs < 1 or args.batch_size < 1):
        parser.error("--images, --runs and --batch-size must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="dymu-bench-calib-"))
    try:
        names = synthesize(work / "images", 4 * args.images)
        lists = {n: write_list(work, names[:n]) for n in (args.images, 4 * args.images)}
        print(
            f"{args.model}, pretrained none; batch {args.batch_size}, "
            f"{args.num_workers} worker(s); {args.device}, {args.dtype}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
        )
        print(f"data: {len(names)} synthetic JPEGs in {work} (N = {args.images})")
        print(f"setup {time.perf_counter() - start:.1f} s\n")
        lines = []
        if not args.skip_throughput:
            plain, calib = bench_throughput(args, lists[args.images], work)
            ratio = calib / plain
            verdict = "PASS" if ratio >= THROUGHPUT_TARGET else "MISS"
            lines.append(
                f"throughput  calibration {calib:.2f} img/s / plain {plain:.2f} img/s = "
                f"{ratio:.2f}x  (target >= {THROUGHPUT_TARGET:.2f}x)  {verdict}"
            )
            print()
        if not args.skip_memory:
            ratio, loop_ratio = bench_memory(args, lists, work)
            verdict = "PASS" if ratio <= MEMORY_TARGET else "MISS"
            lines.append(
                f"memory      peak RSS {4 * args.images} / {args.images} images = "
                f"{ratio:.3f}  (target <= {MEMORY_TARGET:.2f})  {verdict}"
            )
            if loop_ratio is not None:
                verdict = "PASS" if loop_ratio <= MEMORY_TARGET else "MISS"
                lines.append(
                    f"memory      loop peak RSS {4 * args.images} / {args.images} images = "
                    f"{loop_ratio:.3f}  (target <= {MEMORY_TARGET:.2f})  {verdict}"
                )
            print()
        for line in lines:
            print(line)
        print(f"\ntotal {time.perf_counter() - start:.0f} s")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
