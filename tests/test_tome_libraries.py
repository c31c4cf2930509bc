"""``dymu.apply_tome`` where ToMe ports break: every tower family (timm, open_clip,
transformers), transformers' attention implementations, hidden states, attention maps,
``pipeline``, ``torch.compile``, half precision and accelerate's ``device_map`` hooks."""

from __future__ import annotations

import tempfile
from pathlib import Path

import open_clip
import pytest
import torch
import towers
from conftest import TINY
from naive_tome import Parts, hf_vit_parts, naive_tome, open_clip_parts, timm_parts
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import dymu
from dymu import DyMUError, Thresholds

VIT = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=10)
EXAMPLES = sorted((Path(__file__).parents[1] / "examples" / "images").glob("*.jpg"))


def hf_classifier(attn: str = "sdpa"):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=64, num_labels=5, **towers.hf_shape())
    config._attn_implementation = attn
    return ViTForImageClassification(config)


FAMILIES = {
    "timm ViT": lambda: VisionTransformer(**VIT),
    "timm DeiT": lambda: VisionTransformerDistilled(**VIT),
    "timm reg4": towers.timm_reg4,
    "open_clip ViT": lambda: open_clip.create_model(TINY, pretrained=None).visual,
    "open_clip SigLIP": towers.open_clip_siglip,
    "hf ViTModel": towers.hf_vit,
    "hf ViTForImageClassification": hf_classifier,
    "hf CLIPVisionModel": towers.hf_clip,
    "hf SiglipVisionModel": towers.hf_siglip,
    "hf Dinov2Model": towers.hf_dinov2,
}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def outputs(model, pixels) -> dict[str, torch.Tensor]:
    """Everything the model returns, by name."""
    if not hasattr(model, "config"):
        out = model(pixels)
        return {"out": out} if torch.is_tensor(out) else dict(enumerate(out))
    out = model(pixel_values=pixels)
    return {k: v for k, v in out.items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 64)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_r0_and_never_merging_thresholds_equal_the_unpatched_model(family, pixels):
    model = build(family)
    with torch.no_grad():
        want = outputs(model, pixels)
        dymu.apply_tome(model, r=0)
        same = outputs(model, pixels)
        # thresholds no cosine reaches: every block runs dymu's step, nothing merges
        blocks = dymu.build_encoder(model).tower.num_blocks
        never = Thresholds.from_values([0.99999] * blocks, [1] * blocks)
        dymu.apply_tome(model, thresholds=never)
        stepped = outputs(model, pixels)
        dymu.remove_tome(model)
    assert not hasattr(model, "dymu_tome")
    for key, value in want.items():
        torch.testing.assert_close(same[key], value, atol=1e-6, rtol=1e-6)
        if family.endswith("SigLIP") or family == "hf SiglipVisionModel":
            if value.dim() == 3:  # no prefix tokens: every merging block reorders (DESIGN 3)
                continue
        torch.testing.assert_close(stepped[key], value, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fixed_r_patch_agrees_with_the_fixed_r_encoder(family, pixels):
    model = build(family)
    encoder = dymu.build_encoder(model, schedule=[6, 6, 6, 6], fixed_r=True)
    with torch.no_grad():
        want = encoder(pixels)
        dymu.apply_tome(model, r=6)
        got = outputs(model, pixels)
    lengths = torch.stack(model.dymu_tome.block_lengths, 1)
    assert torch.equal(lengths, want.block_lengths)
    if want.pooled is not None and not isinstance(model, VisionTransformerDistilled):
        pooled = [v for v in got.values() if v.shape == want.pooled.shape]
        assert any(torch.allclose(v, want.pooled, atol=1e-5, rtol=1e-5) for v in pooled)


def hf_pre_norm_parts(layer, attn: str, norms=("layer_norm1", "layer_norm2"), out="out_proj"):
    """transformers CLIP, SigLIP (``self_attn``) and DINOv2 (``attention``, layer scale)."""
    attention = getattr(layer, attn)
    norm1, norm2 = (getattr(layer, n) for n in norms)
    scale1 = getattr(layer, "layer_scale1", torch.nn.Identity())
    scale2 = getattr(layer, "layer_scale2", torch.nn.Identity())

    def qkv(x):
        h = norm1(x)
        return attention.q_proj(h), attention.k_proj(h), attention.v_proj(h)

    return Parts(
        qkv=qkv,
        out=lambda o: scale1(getattr(attention, out)(o)),
        mlp=lambda x: scale2(layer.mlp(norm2(x))),
    )


def tome_by_hand(family: str, model, image: torch.Tensor, r: list[int]) -> dict:
    """One image through ``family`` with ToMe spelled out (naive_tome.py); the outputs the
    patched model returns, by name, computed from the library's own modules."""
    x = image[None]
    if family == "hf CLIPVisionModel":
        x = model.pre_layrnorm(model.embeddings(x))[0]
        parts = [hf_pre_norm_parts(layer, "self_attn") for layer in model.encoder.layers]
        x, *_ = naive_tome(x, parts, r, 4, 1)
        return {"last_hidden_state": x, "pooler_output": model.post_layernorm(x[0])}
    if family == "hf SiglipVisionModel":
        parts = [hf_pre_norm_parts(layer, "self_attn") for layer in model.encoder.layers]
        x, sizes, *_ = naive_tome(model.embeddings(x)[0], parts, r, 4, 0)
        x = model.post_layernorm(x)
        head = model.head  # attention pooling: log(size) added to the probe's logits
        bias = torch.tensor(sizes).log()[None, :]
        pooled = head.attention(head.probe[0], x, x, attn_mask=bias)[0]
        pooled = pooled + head.mlp(head.layernorm(pooled))
        return {"last_hidden_state": x, "pooler_output": pooled[0]}
    if family == "hf Dinov2Model":
        norms, out = ("norm1", "norm2"), "o_proj"
        parts = [hf_pre_norm_parts(layer, "attention", norms, out) for layer in model.encoder.layer]
        x, *_ = naive_tome(model.embeddings(x)[0], parts, r, 4, 1)
        x = model.layernorm(x)
        return {"last_hidden_state": x, "pooler_output": x[0]}
    assert family == "open_clip SigLIP"
    trunk = model.trunk
    x = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(x)))[0]
    x, sizes, *_ = naive_tome(x, [timm_parts(b) for b in trunk.blocks], r, 4, 0)
    bias = torch.tensor(sizes).log()[None, None, None, :]
    pooled = trunk.attn_pool(trunk.norm(x)[None], attn_mask=bias)
    return {"out": model.head(trunk.head(trunk.fc_norm(pooled)))[0]}


@pytest.mark.parametrize(
    "family", ["hf CLIPVisionModel", "hf SiglipVisionModel", "hf Dinov2Model", "open_clip SigLIP"]
)
def test_fixed_r_equals_tome_spelled_out_on_more_libraries(family, pixels):
    """The patched model against the loop-written ToMe (not against dymu's own encoder)."""
    model = build(family)
    r = [8, 4, 12, 0]
    with torch.no_grad():
        want = [tome_by_hand(family, model, image, r) for image in pixels]
        dymu.apply_tome(model, r=r)
        got = outputs(model, pixels)
    assert set(got) == set(want[0])
    for key, value in got.items():
        torch.testing.assert_close(value, torch.stack([w[key] for w in want]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_vit_equals_tome_spelled_out(attn, pixels):
    model = hf_classifier(attn).eval()
    vit = model.vit
    r = [8, 4, 12, 0]
    with torch.no_grad():
        want = []
        for image in pixels:
            x = vit.embeddings(image[None])[0]
            x, *_ = naive_tome(x, [hf_vit_parts(layer) for layer in vit.layers], r, 4, 1)
            want.append(model.classifier(vit.layernorm(x)[0]))
        dymu.apply_tome(model, r=r)
        out = model(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(out.logits, torch.stack(want), atol=1e-5, rtol=1e-5)
    # hidden states come at merged length: the embeddings, then each block's output
    assert [h.shape[1] for h in out.hidden_states] == [65, 57, 53, 41, 41]


def test_open_clip_tower_equals_tome_spelled_out(pixels):
    visual = build("open_clip ViT")
    blocks = visual.transformer.resblocks
    with torch.no_grad():
        want = []
        for image in pixels:
            x = visual._embeds(image[None])[0]
            heads = blocks[0].attn.num_heads
            x, *_ = naive_tome(x, [open_clip_parts(b) for b in blocks], [10] * 4, heads, 1)
            want.append(visual.ln_post(x[0]) @ visual.proj)
        dymu.apply_tome(visual, r=10)
        got = visual(pixels)
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)


def test_attention_maps_are_refused_in_one_line(pixels):
    model = hf_classifier("eager").eval()
    dymu.apply_tome(model, r=8)
    with pytest.raises(DyMUError, match="attention maps") as info:
        model(pixel_values=pixels, output_attentions=True)
    assert "\n" not in str(info.value)
    model.config.output_attentions = True
    with pytest.raises(DyMUError, match="attention maps"):
        model(pixel_values=pixels)
    dymu.remove_tome(model)
    assert len(model(pixel_values=pixels).attentions) == 4  # the unpatched model's own maps


def test_image_classification_pipeline_on_the_bundled_photos():
    from PIL import Image
    from transformers import ViTImageProcessor, pipeline

    model = hf_classifier().eval()
    processor = ViTImageProcessor(size={"height": 64, "width": 64})
    dymu.apply_tome(model, r=8)
    classify = pipeline("image-classification", model=model, image_processor=processor)
    files = [str(p) for p in EXAMPLES[:3]]
    by_path = classify(files, top_k=5)
    by_image = classify([Image.open(p).convert("RGB") for p in files], top_k=5)
    assert int(model.dymu_tome.lengths[0]) == 65 - 4 * 8  # the pipeline ran the patched model
    with torch.no_grad():
        inputs = processor([Image.open(p).convert("RGB") for p in files], return_tensors="pt")
        probs = model(**inputs).logits.softmax(-1)
    for row, found, again in zip(probs, by_path, by_image, strict=True):
        want = {model.config.id2label[i]: float(p) for i, p in enumerate(row)}
        assert {d["label"]: pytest.approx(want[d["label"]], abs=1e-5) for d in found} == {
            d["label"]: d["score"] for d in found
        }
        assert found == again


def test_torch_compile_of_a_patched_vit_gives_the_same_logits(pixels):
    model = build("timm ViT")
    dymu.apply_tome(model, r=8)
    with torch.no_grad():
        eager = model(pixels)
        compiled = torch.compile(model)(pixels)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["timm ViT", "hf ViTForImageClassification"])
def test_half_precision_runs_and_stays_close(family, dtype, pixels):
    model = build(family)
    dymu.apply_tome(model, r=6)
    with torch.no_grad():
        full = next(iter(outputs(model, pixels).values()))
        model.to(dtype)
        half = next(iter(outputs(model, pixels.to(dtype)).values()))
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert torch.equal(model.dymu_tome.lengths, torch.full((3,), 65 - 24))
    cosine = torch.nn.functional.cosine_similarity(half.float(), full, dim=-1)
    assert cosine.min() > 0.98


def test_accelerate_device_map_hooks_survive_and_nothing_moves(pixels):
    from accelerate import dispatch_model

    model = hf_classifier().eval()
    with torch.no_grad():
        dymu.apply_tome(model, r=8)
        want = model(pixel_values=pixels).logits
        dymu.remove_tome(model)
    layers = {f"vit.layers.{i}": "disk" if i % 2 else "cpu" for i in range(4)}
    device_map = {"vit.embeddings": "cpu", **layers, "vit.layernorm": "cpu", "classifier": "cpu"}
    with tempfile.TemporaryDirectory() as folder:
        dispatch_model(model, device_map=device_map, offload_dir=folder)
        layer = model.vit.layers[1]
        hooked = dict(layer.__dict__)
        assert "_hf_hook" in hooked and layer.attention.q_proj.weight.device.type == "meta"
        calls = []
        hook = layer._hf_hook
        pre_forward = hook.pre_forward
        hook.pre_forward = lambda *a, **k: calls.append(1) or pre_forward(*a, **k)
        with torch.no_grad():
            dymu.apply_tome(model, r=8)
            got = model(pixel_values=pixels).logits
        assert calls, "accelerate's hook still runs around the patched block"
        assert layer.attention.q_proj.weight.device.type == "meta"  # offloaded, not moved
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        dymu.remove_tome(model)
        assert all(layer.__dict__[k] is v for k, v in hooked.items())
        assert layer.__dict__.keys() == hooked.keys()


def test_towers_that_cannot_take_sizes_are_refused():
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    model = Siglip2VisionModel(Siglip2VisionConfig(num_patches=64, **towers.hf_shape()))
    with pytest.raises(DyMUError, match="Siglip2VisionModel"):
        dymu.apply_tome(model, r=4)
    with pytest.raises(DyMUError, match="found no vision tower"):
        dymu.apply_tome(torch.nn.Linear(2, 2), r=4)


def test_thresholds_for_a_saved_classifier_come_from_the_command_line(tmp_path, photo_dir):
    from PIL import Image

    from dymu.cli import find_thresholds_main

    model = hf_classifier().eval()
    model.save_pretrained(tmp_path / "vit")
    out = tmp_path / "vit.safetensors"
    args = ["--data", photo_dir / "images.json", "--hf-model", tmp_path / "vit"]
    args += ["--r-total", 24, "--batch-size", 4, "--num-workers", 0, "--out", out]
    assert find_thresholds_main([str(a) for a in args]) == 0
    dymu.apply_tome(model, thresholds=out)
    encoder = dymu.load_encoder(model, thresholds=out)
    items = [encoder.preprocess(Image.open(p).convert("RGB")) for p in EXAMPLES]
    with torch.no_grad():
        model(pixel_values=torch.stack(items))
    lengths = model.dymu_tome.lengths.tolist()
    assert len(set(lengths)) > 1 and max(lengths) <= 65
