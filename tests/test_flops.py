"""The FLOP counts behind every benchmark's FLOP bound (``scripts/support/flops.py``) against
torch's own counter, ``FlopCounterMode``, on the models they describe: a ViT tower vanilla
and merging, a Llama language model vanilla and under VTU, a Qwen2.5-VL vision tower vanilla
and merging, and a whole LLaVA prefill as ``bench_vlm.py`` counts it. Attention runs SDPA's
math backend (and open_clip's attention without its fused fast path), so that the counter
sees its products."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, TINY_LM, photo
from qwen_vlms import build, pixels
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

import dymu
from dymu import Thresholds
from dymu.integrations import hf_llava, hf_qwen_vl
from dymu.lm.vtu import apply_vtu

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
SCRIPT = SCRIPTS / "support" / "flops.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_flops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


flops = load_script()


def within_rotary(flop_count: float):
    """Some transformers versions make the rotary tables by a matrix product (inverse
    frequencies by positions: a few hundred FLOPs), which the counter sees and a bound
    leaves out."""
    return pytest.approx(flop_count, rel=1e-4)


def counted(fn) -> tuple[dict[str, int], object]:
    """FLOPs of ``fn()`` per aten op, as torch counts them, and what ``fn`` returned (the
    math backend rounds differently, so a merging encoder's counts are taken from this
    run)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel is not counted
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            with torch.no_grad():
                out = fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    per_op = counter.get_flop_counts()["Global"].items()
    return {str(op).split(".")[-1]: n for op, n in per_op}, out


def test_vit_counts_are_the_towers_products(monkeypatch):
    """Vanilla: every product of the open_clip tower. Merging (per-image attention, so each
    image attends at its own length): the products outside attention, and attention's own
    (counted inside each SDPA call), at the per-block token counts the encoder reports; the
    merge scores are the rest, which the count leaves out."""
    encoder = dymu.build_encoder(f"{TINY}-tome-24out")
    encoder.attention = "loop"
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    dim, mlp_width, n0, patch = flops.vit_dims(encoder.tower)
    blocks = encoder.tower.num_blocks
    visual = encoder.tower.visual
    projection = 2 * dim * visual.proj.shape[1]  # the pooled token's projection, per image

    vanilla, _ = counted(lambda: visual(x))
    want = flops.vit_image([n0] * blocks, n0, dim, mlp_width, patch) + projection
    assert sum(vanilla.values()) == 3 * want

    encoder.set_thresholds(dymu.find_thresholds(encoder, [x]))
    sdpa, attention = torch.nn.functional.scaled_dot_product_attention, []

    def counted_sdpa(*args, **kwargs):
        with FlopCounterMode(display=False) as inner:
            out = sdpa(*args, **kwargs)
        attention.append(inner.get_total_flops())
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted_sdpa)
    merging, out = counted(lambda: encoder(x))
    lengths = out.block_lengths.tolist()
    assert all(row[-1] < n0 for row in lengths)  # every image merged
    linear = sum(n for op, n in merging.items() if op in ("mm", "addmm", "convolution"))
    without = [flops.vit_image(row, n0, dim, mlp_width, patch, False) for row in lengths]
    assert linear == sum(without) + 3 * projection
    full = [flops.vit_image(row, n0, dim, mlp_width, patch) for row in lengths]
    assert sum(attention) == sum(full) - sum(without)


def test_lm_counts_are_the_models_products_vanilla_and_under_vtu():
    """The counter sees the whole N x N attention; the count keeps the causal half, so the
    other half is added here: ``layers x 2N^2 D`` per sequence."""
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_LM)
    model = LlamaForCausalLM(config).eval()
    shape = flops.lm_shape(config)
    n = 40
    masked_half = config.num_hidden_layers * 2 * n * n * config.hidden_size
    ids = torch.randint(1, 60, (2, n), generator=torch.Generator().manual_seed(0))

    vanilla, _ = counted(lambda: model(input_ids=ids, logits_to_keep=1))
    assert sum(vanilla.values()) == within_rotary(2 * (flops.lm(shape, n, n, n) + masked_half))

    embeds = model.model.embed_tokens(ids).detach()
    mapping = torch.stack([torch.arange(n) // 4, torch.arange(n) // 2])  # 10 and 20 slots
    apply_vtu(model)
    vtu, _ = counted(lambda: model(inputs_embeds=embeds, vtu_mapping=mapping, logits_to_keep=1))
    want = sum(flops.lm(shape, n, slots, n) + masked_half for slots in (10, 20))
    assert sum(vtu.values()) == within_rotary(want)


def test_qwen_tower_counts_are_the_towers_products():
    """Vanilla: every product, windows cut by the frame's edge included (a 3 x 5-unit frame
    in windows of 2 x 2 units). Merging: the products outside attention (the count shrinks
    windows by the frame's share of units rather than tracking each), at the encoder's
    per-block unit counts."""
    model = build("qwen2_5_vl")
    vision = model.config.vision_config
    grids = [(1, 6, 10), (1, 8, 8)]
    pix, grid = pixels(grids)
    vanilla, _ = counted(lambda: model.model.visual(pix, grid_thw=grid))
    assert sum(vanilla.values()) == sum(flops.qwen_tower(vision, g, None) for g in grids)

    encoder = hf_qwen_vl.build_encoder(model, r_total=2 * vision.depth)
    with torch.no_grad():
        _, values, used = encoder.calibrate({"pixel_values": pix, "image_grid_thw": grid})
    encoder.set_thresholds(
        Thresholds(values - 0.05, used.long(), torch.tensor(encoder.r), encoder.identity.metadata())
    )
    merging, out = counted(lambda: encoder(pix, grid))
    kept = out.block_lengths
    units = torch.tensor([g[1] * g[2] // 4 for g in grids])
    assert (kept[:, -1] < units).all()  # every frame merged
    linear = sum(n for op, n in merging.items() if op in ("mm", "addmm", "convolution"))
    want = sum(
        flops.qwen_tower(vision, g, k, attention=False)
        for g, k in zip(grids, kept.tolist(), strict=True)
    )
    assert linear == want


def test_llava_prefill_count_is_the_models_products(monkeypatch):
    """``bench_vlm.py``'s vanilla prefill (its tiny shape, a real photo through LLaVA's own
    processor): CLIP with every layer run, the projector, and the LM at N (plus the masked
    half of causal attention, which the counter sees)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    bench, shapes = (importlib.import_module(m) for m in ("bench_vlm", "support.llava_shapes"))
    args = SimpleNamespace(shape="quick", seed=0, device="cpu", dtype=torch.float32)
    processor = shapes.build_processor(shapes.SHAPES["quick"]["image"])
    model = shapes.build_model(args, image_token=processor.image_token_id)
    prompt = "USER : <image> Describe the image . ASSISTANT :"
    inputs = processor(images=[photo("coffee")], text=[prompt], return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    text = model.config.text_config
    masked_half = text.num_hidden_layers * 2 * n * n * text.hidden_size

    counts, _ = counted(lambda: model(**inputs, logits_to_keep=1))
    encoder = hf_llava.build_encoder(model)
    with torch.no_grad():
        out = encoder(inputs["pixel_values"])
    vanilla, _ = bench.prefill_flops(model, encoder, out, n)["vanilla"]
    assert sum(counts.values()) == within_rotary(vanilla + masked_half)
