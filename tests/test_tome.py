"""``dymu.apply_tome`` on timm ViTs against ToMe spelled out with loops (``naive_tome.py``):
a class-token ViT, a DeiT with its distillation token, a register ViT and a ViT without
prefix tokens; schedules, exact restore, thresholds mode and traced groups."""

from __future__ import annotations

import pytest
import torch
import towers
from conftest import checkerboard, noise, photo
from naive_tome import naive_tome, timm_parts
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import dymu
from dymu import DyMUError, Thresholds
from dymu.encoder.visualize import tome_picture
from dymu.engine.schedule import tome_schedule

VIT = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=10)
NAMES = ["astronaut", "coffee", "chelsea", "rocket", "brick", "grass"]


def build(kind: str, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    if kind == "cls":
        return VisionTransformer(**VIT).eval()
    if kind == "deit":
        return VisionTransformerDistilled(**VIT).eval()
    if kind == "reg4":
        return towers.timm_reg4().eval()
    return VisionTransformer(**VIT, class_token=False, global_pool="avg").eval()


@pytest.fixture(scope="module")
def pixels():
    from open_clip import image_transform

    transform = image_transform(64, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    return torch.stack([transform(photo(n)) for n in NAMES])


def naive_forward(model: VisionTransformer, pixels: torch.Tensor, r: list[int], prop_attn=True):
    """Naive ToMe per image: final normed tokens, logits, lengths after each block, slots."""
    feats, logits, lengths, slots = [], [], [], []
    prefix = model.num_prefix_tokens
    parts = [timm_parts(b) for b in model.blocks]
    for image in pixels:
        x = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))[0]
        heads = model.blocks[0].attn.num_heads
        x, sizes, block_lengths, slot = naive_tome(x, parts, r, heads, prefix, prop_attn)
        x = model.norm(x)
        if model.global_pool == "avg":  # the mean over the original patches
            pooled = sum(s * t for s, t in zip(sizes[prefix:], x[prefix:], strict=True))
            logit = model.head(model.fc_norm(pooled / sum(sizes[prefix:])))
        else:  # token pooling (DeiT: class and distillation heads) is timm's own
            logit = model.forward_head(x[None])[0]
        feats.append(x)
        logits.append(logit)
        lengths.append(block_lengths)
        slots.append(slot)
    return torch.stack(feats), torch.stack(logits), lengths, slots


SCHEDULES = [8, [0, 12, 0, 20], (10, -1.0), [3]]


@pytest.mark.parametrize("kind", ["cls", "deit", "reg4", "none"])
@pytest.mark.parametrize("r", SCHEDULES, ids=["r8", "blocks1and3", "decreasing", "first"])
def test_fixed_r_equals_tome_spelled_out(kind, r, pixels):
    model = build(kind)
    r_list = tome_schedule(r, 4)
    with torch.no_grad():
        want_feats, want_logits, want_lengths, want_slots = naive_forward(model, pixels, r_list)
        dymu.apply_tome(model, r=r, trace_source=True)
        feats = model.forward_features(pixels)
        state = model.dymu_tome
        lengths = torch.stack(state.block_lengths, 1).tolist()
        groups = state.groups.tolist()
        logits = model(pixels)
    torch.testing.assert_close(feats, want_feats, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    assert lengths == want_lengths and groups == want_slots


@pytest.mark.parametrize("kind", ["cls", "none"])
def test_fused_fixed_r_equals_tome_spelled_out(kind, pixels):
    """``fuse=True``: every merge is one compiled step (``dymu.engine.fused``), ToMe still."""
    model = build(kind)
    r_list = tome_schedule((10, -1.0), 4)
    with torch.no_grad():
        want_feats, want_logits, want_lengths, want_slots = naive_forward(model, pixels, r_list)
        dymu.apply_tome(model, r=(10, -1.0), trace_source=True, fuse=True)
        feats = model.forward_features(pixels)
        state = model.dymu_tome
        lengths = torch.stack(state.block_lengths, 1).tolist()
    torch.testing.assert_close(feats, want_feats, atol=1e-5, rtol=1e-5)
    assert lengths == want_lengths and state.groups.tolist() == want_slots
    # removed and applied again (a benchmark switching r), it compiles nothing new
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    dymu.remove_tome(model)
    dymu.apply_tome(model, r=(10, -1.0), trace_source=True, fuse=True)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(pixels), feats)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("kind", ["cls", "deit", "reg4", "none"])
def test_token_counts_follow_the_schedule_with_caps(kind, pixels):
    model = build(kind)
    dymu.apply_tome(model, r=[30, 30, 5, 0])
    with torch.no_grad():
        model(pixels[:2])
    n, prefix, want = 64 + model.num_prefix_tokens, model.num_prefix_tokens, []
    for r in [30, 30, 5, 0]:
        n -= min(r, (n - prefix) // 2)  # ToMe's cap counts the mergeable tokens
        want.append(n)
    got = [lengths.tolist() for lengths in model.dymu_tome.block_lengths]
    assert got == [[v, v] for v in want]


def test_prop_attn_off_drops_only_the_size_bias(pixels):
    model = build("cls")
    with torch.no_grad():
        _, want, _, _ = naive_forward(model, pixels, [12] * 4, prop_attn=False)
        dymu.apply_tome(model, r=12)
        with_bias = model(pixels)
        dymu.apply_tome(model, r=12, prop_attn=False)
        without = model(pixels)
    assert not torch.allclose(with_bias, without, atol=1e-4)
    torch.testing.assert_close(without, want, atol=1e-5, rtol=1e-5)


def test_schedules_are_tomes():
    assert tome_schedule(8, 4) == [8, 8, 8, 8]
    assert tome_schedule([0, 0, 4], 5) == [0, 0, 4, 0, 0]
    # (r, inflection): a line from int(r * (1 - inflection)) to 2r minus it, truncated
    assert tome_schedule((8, -1.0), 5) == [16, 12, 8, 4, 0]
    assert tome_schedule((8, 0.5), 3) == [4, 8, 12]
    for bad in ([1, 2, 3, 4, 5], -1, [1, -1], (8, 2.0), "8"):
        with pytest.raises(DyMUError):
            tome_schedule(bad, 4)


def test_remove_restores_exactly_and_apply_is_idempotent(pixels):
    model = build("reg4")
    calls = []

    def wrapper(x, *args, **kwargs):  # someone else's instance wrapper on a block
        calls.append(1)
        return type(model.blocks[1]).forward(model.blocks[1], x, *args, **kwargs)

    model.blocks[1].forward = wrapper
    patched = [model, model.blocks[1], *model.blocks, model.attn_pool or model]
    before = [dict(m.__dict__) for m in patched]
    with torch.no_grad():
        vanilla = model(pixels)
        dymu.apply_tome(model, r=8)
        dymu.apply_tome(model, r=[0, 0, 0, 8])  # replaces the first patch, keeps the wrapper
        late = model(pixels)
        assert calls, "the wrapper still runs where nothing has merged yet"
        assert model.dymu_tome.r == [0, 0, 0, 8]
        dymu.remove_tome(model)
        dymu.remove_tome(model)  # a no-op now
        restored = model(pixels)
    assert not torch.allclose(late, vanilla)
    assert torch.equal(restored, vanilla)
    for m, saved in zip(patched, before, strict=True):
        assert m.__dict__.keys() == saved.keys()
        assert all(m.__dict__[k] is v for k, v in saved.items())


def calibrate(model, pixels, r_total=30) -> Thresholds:
    encoder = dymu.build_encoder(model, r_total=r_total)
    return dymu.find_thresholds(encoder, [pixels[:3], pixels[3:]])


@pytest.mark.parametrize("kind", ["cls", "none"])
def test_thresholds_mode_is_batch_invariant_and_matches_the_encoder(kind, pixels):
    model = build(kind)
    thresholds = calibrate(model, pixels)
    encoder = dymu.build_encoder(model, r_total=30)
    encoder.set_thresholds(thresholds)
    with torch.no_grad():
        want = encoder(pixels)
        dymu.apply_tome(model, thresholds=thresholds)
        logits = model(pixels)
        lengths = model.dymu_tome.lengths.clone()
        alone, alone_lengths = [], []
        for i in range(len(pixels)):
            alone.append(model(pixels[i : i + 1]))
            alone_lengths.append(int(model.dymu_tome.lengths[0]))
    assert len(set(lengths.tolist())) > 1, "images keep different numbers of tokens"
    assert lengths.tolist() == want.lengths.tolist()
    torch.testing.assert_close(logits, want.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(alone), logits, atol=1e-5, rtol=1e-5)
    assert alone_lengths == lengths.tolist()


def test_thresholds_mode_keeps_fewer_tokens_for_a_simple_image(pixels):
    model = build("cls")
    thresholds = calibrate(model, pixels)
    dymu.apply_tome(model, thresholds=thresholds)
    from open_clip import image_transform

    transform = image_transform(64, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    batch = torch.stack([transform(checkerboard()), transform(noise())])
    with torch.no_grad():
        model(batch)
    simple, busy = model.dymu_tome.lengths.tolist()
    assert simple < busy


def test_thresholds_of_another_tower_are_refused(pixels):
    thresholds = calibrate(build("cls", seed=0), pixels)
    with pytest.raises(DyMUError, match="made for"):
        dymu.apply_tome(build("cls", seed=1), thresholds=thresholds)
    with pytest.raises(DyMUError, match="blocks"):
        dymu.apply_tome(build("reg4"), thresholds=Thresholds.from_values([0.5] * 3, [1] * 3))


def test_traced_groups_agree_with_sizes_and_draw(pixels):
    model = build("reg4")
    dymu.apply_tome(model, r=10, trace_source=True)
    with torch.no_grad():
        model(pixels[:2])
    state = model.dymu_tome
    for groups, sizes in zip(state.groups, state.sizes, strict=True):
        torch.testing.assert_close(torch.bincount(groups).float(), sizes)
    sheet = tome_picture(model, pixels[:2], index=1)
    assert sheet.size == (2 * 64 + 8, 64 + 20)
    dymu.apply_tome(model, r=10)  # no trace: a clear error, not a picture of nothing
    with torch.no_grad():
        model(pixels[:1])
    with pytest.raises(DyMUError, match="trace_source"):
        tome_picture(model, pixels[:1])


def test_blocks_out_of_order_and_masks_are_refused(pixels):
    model = build("cls")
    dymu.apply_tome(model, r=8)
    x = model._pos_embed(model.patch_embed(pixels[:1]))
    with torch.no_grad(), pytest.raises(DyMUError, match="in order"):
        model.blocks[2](x[:, :30])
    with torch.no_grad(), pytest.raises(DyMUError, match="mask"):
        model.forward_features(pixels[:1], attn_mask=torch.zeros(65, 65))
