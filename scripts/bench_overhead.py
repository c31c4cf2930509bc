"""Count kernel-launching ATen ops and blocking host syncs per forward, vanilla beside dymu.

A GPU at these sizes is bound by launches and syncs, not FLOPs (issue 19), so this
counts both on the CPU, where a GPU would see the same numbers: the ops a forward dispatches do
not depend on the device, and the reads and uploads counted here are those that would block a
GPU's host (with ``--device cuda`` they are counted on the device itself).

Four parts (two by default), built from configs with random (seeded) weights, nothing downloaded:

* **encoder**: the open_clip tower ``ViT-B-16`` (``--quick``: a tiny 4-block tower at 64 px),
  thresholds calibrated on the bundled photos (``examples/images.json``) for the name's budget
  (``-tome-100out``), at each ``--batch-sizes``. Rows: ``vanilla`` (the tower's own forward,
  ``enc.tower.module(pixels)``), ``dymu`` (threshold merging), ``fixed-r`` (ToMe: the same
  schedule, every image merging exactly ``r`` per block) and ``no-merge`` (dymu's block loop
  with ``r_total=0``). Batch 1 uses the photo whose kept token count is the median; larger
  batches take the photos in order, cycled.
* **vlm**: one prefill ``model(**inputs, use_cache=True, logits_to_keep=1)`` of
  ``bench_vlm``'s LLaVA-1.5-shaped model (``--small`` shape; ``--quick``: its ``quick`` shape),
  ``vanilla`` beside ``dymu+VTU`` (``hf_llava.apply(model, thresholds, vtu=True)``) and
  ``dymu no-VTU`` (``vtu=False``), thresholds as ``bench_vlm`` calibrates them.
* **qwen** (asked for with ``--parts qwen``): one prefill of ``bench_vlm_qwen``'s
  Qwen2.5-VL-shaped model (``small``; ``--quick``: ``quick``), tower included, ``vanilla``
  beside ``dymu+VTU`` at the DyMU-low budget. No budget is set for it yet: the rows say where
  it stands.
* **lm** (asked for with ``--parts lm``): one prefill of ``bench_vlm_budgets``' LLaVA-1.5
  language model (``small``; ``--quick``: ``quick``) at the DyMU-low budget, ``vanilla``
  beside ``dymu+VTU``, eager and with the decoder compiled (``vanilla compiled``,
  ``VTU compiled``: inductor, dynamic shapes, as ``bench_vlm_budgets.py --compile`` runs
  it). A compiled row counts the launches in the code inductor makes for the call
  (``inductor_launches.compiled_call_launches``, on a CPU its C++ kernels standing in for a
  GPU's Triton ones; ``x vanilla`` is against vanilla compiled) and not its host reads
  (``-``).

Images of different lengths attend the way ``attention="auto"`` takes on a GPU (one padded
SDPA call, ``dymu.engine.attention``), also on a CPU run, where ``auto`` loops per image, and
images are padded and packed by torch's jagged kernels, as on a GPU. The encoder rows show
threshold merging both ways: ``dymu`` merges eagerly (a CPU's default) and ``dymu fused``
runs the compiled merge step (``dymu.engine.fused``, a GPU's default), and so do
``fixed-r`` and ``fixed-r fused``; the VLM and Qwen rows merge as on a GPU, compiled.
Every variant runs one uncounted forward first (lazy set-up), then one counted forward, under
``torch.inference_mode``; what counts as an op, a host read and an upload is said in
``scripts/support/op_counter.py``.

Budgets (``syncs`` = reads + uploads): issue 19, encoder: ops at most 3.0x vanilla at every
batch size; syncs at most 1 per forward for threshold merging, 0 for fixed-r and no-merge.
Issue 20, VLM prefill (``dymu+VTU``, stated for the ``--small`` shape): ops at most 1.8x
vanilla, at most 8 syncs. The table is followed by where the syncs happen
(``file:line x count``, the innermost frame outside torch) and, with ``--top N``, the ops dymu
adds most.

Run from the repository root::

    python scripts/bench_overhead.py                      # ViT-B-16, --small VLM, batch 1 and 8
    python scripts/bench_overhead.py --quick              # tiny shapes: what CI runs
    python scripts/bench_overhead.py --top 15 --json overhead.json
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

from bench_encoder import DTYPES  # noqa: E402

import dymu  # noqa: E402
import dymu.engine.packing  # noqa: E402
import dymu.integrations.hf_qwen_vl  # noqa: E402
from dymu.engine.attention import auto_way  # noqa: E402
from dymu.sources.stream import load_rgb, open_source  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
from support.inductor_launches import compiled_call_launches  # noqa: E402
from support.op_counter import count_forward  # noqa: E402
from support.overhead_table import Row, make_row, print_sites, print_table, print_top  # noqa: E402

ENCODER = {False: "ViT-B-16-tome-100out", True: "ViT-T-8-overhead-tome-16out"}
QUICK_TOWER = {  # an open_clip config: 64 px, 8 px patches (64 patches), 4 blocks of width 64
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}
ENCODER_OPS_BUDGET = 3.0
ENCODER_SYNCS_BUDGET = {"dymu": 1, "dymu fused": 1, "fixed-r": 0, "fixed-r fused": 0, "no-merge": 0}
VLM_OPS_BUDGET = 1.8
VLM_SYNCS_BUDGET = 8
BUDGETED_VLM = "dymu+VTU"


@contextmanager
def quick_tower() -> Iterator[None]:
    """``QUICK_TOWER`` registered with open_clip as ``ViT-T-8-overhead`` meanwhile."""
    import open_clip

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ViT-T-8-overhead.json"
        path.write_text(json.dumps(QUICK_TOWER))
        open_clip.add_model_config(path)
        yield


@contextmanager
def gpu_padding(args: argparse.Namespace) -> Iterator[None]:
    """Pads and packs images as on a GPU (torch's jagged kernels, one op each) also on a
    CPU run, which indexes past a few images."""
    before = dymu.engine.packing._CPU_JAGGED_MAX
    if args.device == "cpu":
        dymu.engine.packing._CPU_JAGGED_MAX = sys.maxsize
    try:
        yield
    finally:
        dymu.engine.packing._CPU_JAGGED_MAX = before


def median_index(lengths: torch.Tensor) -> int:
    """The index of the median of ``lengths`` (the lower one for an even count)."""
    return int(lengths.argsort()[(len(lengths) - 1) // 2])


def pick(items: list, bsz: int, median: int) -> list:
    """Batch 1: the median item; larger batches: the items in order, cycled."""
    return [items[median]] if bsz == 1 else [items[i % len(items)] for i in range(bsz)]


def encoder_rows(args: argparse.Namespace) -> list[Row]:
    """Vanilla tower, threshold merging, fixed-r and no-merge at every batch size."""
    name = ENCODER[args.quick]
    dtype = DTYPES[args.dtype]
    enc = dymu.build_encoder(name, pretrained=None, device=args.device, dtype=dtype)
    photos = list(open_source(str(args.data)).paths)
    pixels = torch.stack([enc.preprocess(load_rgb(p)) for p in photos]).to(args.device, dtype)
    with torch.inference_mode():
        enc.set_thresholds(dymu.find_thresholds(enc, list(pixels.split(4))))
        kept = torch.cat([enc(p[None]).lengths for p in pixels]).cpu()
    variants = encoder_variants(enc, gpu_way(args))
    rows = []
    for bsz in args.batch_sizes:
        batch = pixels[pick(list(range(len(pixels))), bsz, median_index(kept))]
        vanilla = count_forward(lambda batch=batch: enc.tower.module(batch), enc.tower, batch)
        rows.append(make_row("encoder", name, "vanilla", bsz, vanilla, vanilla.ops, None, None))
        for variant, model in variants.items():
            count = count_forward(lambda model=model, batch=batch: model(batch), model, batch)
            syncs = ENCODER_SYNCS_BUDGET[variant]
            rows.append(make_row("encoder", name, variant, bsz, count, vanilla.ops,
                                 ENCODER_OPS_BUDGET, syncs))  # fmt: skip
    return rows


def encoder_variants(enc: dymu.DyMUEncoder, attention: str) -> dict[str, dymu.DyMUEncoder]:
    """``enc`` (calibrated) and the encoders on its tower it is compared with: threshold
    merging eager and compiled, fixed r (its schedule) eager and compiled, no merging; all
    attending the ``attention`` way."""
    fused = dymu.DyMUEncoder(enc.tower, enc.r, enc.thresholds, name=enc.name).eval()
    fixed_fused = dymu.DyMUEncoder(enc.tower, enc.r, fixed_r=True).eval()
    fused.fuse = fixed_fused.fuse = True
    variants = {
        "dymu": enc,
        "dymu fused": fused,
        "fixed-r": dymu.DyMUEncoder(enc.tower, enc.r, fixed_r=True).eval(),
        "fixed-r fused": fixed_fused,
        "no-merge": dymu.DyMUEncoder(enc.tower, [0] * enc.tower.num_blocks).eval(),
    }
    for model in variants.values():
        model.attention = attention
    return variants


def gpu_way(args: argparse.Namespace) -> str:
    """How images of different lengths attend in the counted forwards: what ``auto`` takes on
    a GPU (one padded call), also on a CPU run, whose ``auto`` loops per image."""
    return auto_way("cuda") if args.device == "cpu" else "auto"


def gpu_fuse(args: argparse.Namespace) -> bool | None:
    """Whether the VLM's merges run the compiled step in the counted forwards: as by default
    on a GPU (``None`` there), also on a CPU run, whose default merges eagerly."""
    return True if args.device == "cpu" else None


def prefill(model: torch.nn.Module, inputs: dict) -> Callable[[], object]:
    """What ``generate()`` runs before its first token."""
    return lambda: model(**inputs, use_cache=True, logits_to_keep=1)


def vlm_rows(args: argparse.Namespace) -> list[Row]:
    """One prefill of vanilla, dymu+VTU and dymu no-VTU at every batch size."""
    import bench_vlm  # transformers is imported only when this part runs
    from support import llava_shapes

    from dymu.integrations import hf_llava

    shape = "quick" if args.quick else "small"
    image = llava_shapes.SHAPES[shape]["image"]
    settings = SimpleNamespace(shape=shape, device=args.device, dtype=DTYPES[args.dtype], seed=0)
    processor = llava_shapes.build_processor(image)
    model = llava_shapes.build_model(settings, processor.image_token_id)
    photos = [load_rgb(p) for p in open_source(str(args.data)).paths]
    pixels = processor.image_processor(photos, return_tensors="pt")["pixel_values"]
    pixels = pixels.to(args.device, settings.dtype)
    keep = 16 if args.quick else 89  # bench_vlm's defaults
    with torch.inference_mode():
        thresholds = bench_vlm.calibrate(model, pixels, keep)
        kept = hf_llava.build_encoder(model, thresholds)(pixels).lengths.cpu()
    models = {"vanilla": model}
    for variant, vtu in (("dymu+VTU", True), ("dymu no-VTU", False)):
        models[variant] = hf_llava.apply(llava_shapes.shared_copy(model), thresholds, vtu=vtu)
        encoder = hf_llava.encoder_of(models[variant])
        encoder.attention, encoder.fuse = gpu_way(args), gpu_fuse(args)
    label = f"llava-{shape}"
    rows = []
    for bsz in args.batch_sizes:
        images = pick(photos, bsz, median_index(kept))
        text = [llava_shapes.PROMPT] * bsz
        inputs = processor(images=images, text=text, return_tensors="pt").to(args.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(settings.dtype)
        roots = list(inputs.values())
        counts = {v: count_forward(prefill(m, inputs), m, *roots) for v, m in models.items()}
        base = counts["vanilla"].ops
        for variant, count in counts.items():
            budgeted = variant == BUDGETED_VLM
            rows.append(
                make_row("vlm", label, variant, bsz, count, base,
                         VLM_OPS_BUDGET if budgeted else None,
                         VLM_SYNCS_BUDGET if budgeted else None)
            )  # fmt: skip
    return rows


def qwen_rows(args: argparse.Namespace) -> list[Row]:
    """One prefill of the Qwen2.5-VL-shaped model, vanilla and dymu+VTU (low budget)."""
    import bench_vlm_qwen

    shape = "quick" if args.quick else "small"
    ns = bench_vlm_qwen.parse_args(["--device", args.device, "--dtype", args.dtype])
    ns.shape, ns.data = shape, args.data
    model = bench_vlm_qwen.build_model(ns)
    images, batches = bench_vlm_qwen.photo_inputs(ns)
    with torch.inference_mode():
        found = bench_vlm_qwen.calibrate(model, batches, bench_vlm_qwen.BUDGETS["low"])
    models = {"vanilla": model, "dymu+VTU": dymu.apply(bench_vlm_qwen.shared_copy(model), found)}
    encoder = dymu.integrations.hf_qwen_vl.encoder_of(models["dymu+VTU"])
    encoder.attention, encoder.fuse = gpu_way(args), gpu_fuse(args)
    rows = []
    for bsz in args.batch_sizes:
        inputs = bench_vlm_qwen.model_inputs(pick(images, bsz, 0), args.device)
        roots = [t for t in inputs.values() if torch.is_tensor(t)]
        counts = {v: count_forward(prefill(m, inputs), m, *roots) for v, m in models.items()}
        base = counts["vanilla"].ops
        rows += [make_row("qwen", f"qwen2.5-vl-{shape}", v, bsz, c, base, None, None)
                 for v, c in counts.items()]  # fmt: skip
    return rows


def lm_rows(args: argparse.Namespace) -> list[Row]:
    """One prefill of the LLaVA-1.5 language model at the low budget, vanilla and VTU,
    eager (counted) and compiled (inductor's launches)."""
    import bench_vlm_budgets as budgets

    shape = "quick" if args.quick else "small"
    settings = SimpleNamespace(shape=shape, device=args.device, dtype=args.dtype, seed=0)
    lm = dymu.apply_vtu(budgets.build_lm(settings))
    gen = torch.Generator().manual_seed(0)
    label, rows = f"llava-{shape} LM", []
    for bsz in args.batch_sizes:
        mapping = budgets.mapping_for(budgets.draw_kept("low", bsz, gen)).to(args.device)
        embeds = torch.randn(*mapping.shape, lm.config.hidden_size, generator=gen)
        embeds = embeds.to(args.device, lm.dtype)
        kw = dict(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        calls = {
            "vanilla": functools.partial(lm, **kw),
            "dymu+VTU": functools.partial(lm, **kw, vtu_mapping=mapping),
        }
        with torch.inference_mode():
            eager = {v: count_forward(call, lm, embeds, mapping) for v, call in calls.items()}
            launches = {v: compiled_call_launches(lm.model, call)[0] for v, call in calls.items()}
        for variant, count in eager.items():
            rows.append(make_row("lm", label, variant, bsz, count, eager["vanilla"].ops,
                                 None, None))  # fmt: skip
        for variant, n in launches.items():
            name = "VTU compiled" if variant == "dymu+VTU" else "vanilla compiled"
            rows.append(Row("lm", label, name, bsz, n, -1, -1, launches["vanilla"]))
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="fp16 on cuda, else fp32")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 1 8")
    parts = ["encoder", "vlm", "qwen", "lm"]
    p.add_argument("--parts", nargs="+", choices=parts, default=["encoder", "vlm"])
    p.add_argument("--quick", action="store_true", help="tiny shapes, batch 1 and 2 (CI)")
    p.add_argument("--top", type=int, default=0, help="list the N ops dymu adds most")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--data", type=Path, default=ROOT / "examples" / "images.json")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args()
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 8])
    return args


def main() -> None:
    args = parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = []
    with quick_tower(), gpu_padding(args):
        if "encoder" in args.parts:
            rows += encoder_rows(args)
        if "vlm" in args.parts:
            rows += vlm_rows(args)
        if "qwen" in args.parts:
            rows += qwen_rows(args)
        if "lm" in args.parts:
            rows += lm_rows(args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, {device}, {args.dtype}; per forward (VLM: one prefill)")
    print_table(rows)
    print(
        f"\nsyncs = host reads + uploads. budgets: encoder ops {ENCODER_OPS_BUDGET}x vanilla, "
        f"syncs {ENCODER_SYNCS_BUDGET} (issue 19); VLM {BUDGETED_VLM} ops {VLM_OPS_BUDGET}x, "
        f"{VLM_SYNCS_BUDGET} syncs (issue 20, stated for --small)"
    )
    print_sites(rows)
    print_top(rows, args.top)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
