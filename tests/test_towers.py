"""Every tower family against its unmodified model: open_clip SigLIP (timm trunk), a timm
register ViT, and transformers CLIP, SigLIP, SigLIP2, ViT and DINOv2 (plain, and with
registers and SwiGLU), all tiny and random."""

from __future__ import annotations

import math

import pytest
import torch
import towers
from conftest import photo
from naive import SiglipNaive, naive_run

import dymu
from dymu.sources.stream import stack_inputs

KINDS = list(towers.BUILDERS)
# the bundled photos have different aspect ratios: SigLIP2 gives them different patch grids
NAMES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass", "coins"]
NAMES += ["hubble_deep_field", "retina", "gravel", "moon"]


@pytest.fixture(scope="module")
def images():
    return [photo(n) for n in NAMES]


class Case:
    """One tower: the unmodified model, a calibrated encoder on it and the photos' inputs."""

    def __init__(self, kind: str, images) -> None:
        self.kind = kind
        self.model = towers.build(kind)
        self.encoder = dymu.build_encoder(self.model)
        self.items = [self.encoder.preprocess(img) for img in images]
        batches = [stack_inputs(self.items[i : i + 4]) for i in range(0, len(self.items), 4)]
        self.thresholds = dymu.find_thresholds(self.encoder, batches)
        self.encoder.set_thresholds(self.thresholds)

    def inputs(self, indices) -> torch.Tensor | dict:
        return stack_inputs([self.items[i] for i in indices])

    def real_lengths(self, inputs) -> list[int]:
        """Tokens each image brings in (prefix tokens included)."""
        if isinstance(inputs, dict):
            return inputs["pixel_attention_mask"].sum(1).tolist()
        return [self.encoder.tower.num_tokens] * inputs.shape[0]

    def vanilla(self, inputs):
        """(final block outputs before the final norm, or after it for timm; pooled) from the
        unmodified model's own forward."""
        m = self.model
        if self.kind in ("open_clip SigLIP", "timm reg4"):
            trunk = m.trunk if hasattr(m, "trunk") else m
            return trunk.forward_features(inputs), m(inputs)
        kwargs = inputs if isinstance(inputs, dict) else {"pixel_values": inputs}
        out = m(**kwargs, output_hidden_states=True)
        return out.hidden_states[-1], out.pooler_output

    def comparable(self, tokens: torch.Tensor) -> torch.Tensor:
        """Our tokens in the form ``vanilla`` gives them (timm's forward_features is normed)."""
        if self.kind in ("open_clip SigLIP", "timm reg4"):
            trunk = self.model.trunk if hasattr(self.model, "trunk") else self.model
            return trunk.norm(tokens)
        return tokens


@pytest.fixture(scope="module", params=KINDS)
def case(request, images):
    return Case(request.param, images)


def test_nothing_merged_equals_the_unmodified_tower(case):
    plain = dymu.build_encoder(case.model, r_total=0)
    inputs = case.inputs(range(8))
    with torch.no_grad():
        out = plain(inputs)
        tokens, pooled = case.vanilla(inputs)
    lengths = case.real_lengths(inputs)
    assert out.lengths.tolist() == lengths
    for i, n in enumerate(lengths):  # SigLIP2: only each image's real patches are tokens
        assert torch.allclose(case.comparable(out.tokens[i, :n]), tokens[i, :n], atol=1e-5)
        assert out.groups[i, :n].tolist() == list(range(n))
    assert torch.allclose(out.pooled, pooled, atol=1e-5)


def test_thresholds_that_never_merge_equal_the_unmodified_tower(case):
    enc = dymu.build_encoder(case.model)
    never = dymu.Thresholds.from_values(torch.ones(towers.DEPTH), torch.tensor(enc.r))
    enc.set_thresholds(never)
    inputs = case.inputs(range(4))
    with torch.no_grad():
        out, (tokens, pooled) = enc(inputs), case.vanilla(inputs)
    n = min(case.real_lengths(inputs))
    assert torch.allclose(case.comparable(out.tokens[:, :n]), tokens[:, :n], atol=1e-5)
    assert torch.allclose(out.pooled, pooled, atol=1e-5)


def test_calibration_gives_dynamic_lengths_and_sizes_add_up(case):
    inputs = case.inputs(range(len(NAMES)))
    with torch.no_grad():
        out = case.encoder(inputs)
    assert case.thresholds.count.tolist() == [3] * towers.DEPTH  # 12 photos, batches of 4
    lengths = out.lengths.tolist()
    assert len(set(lengths)) > 2, lengths  # the photos keep different numbers of tokens
    real = case.real_lengths(inputs)
    assert torch.allclose(out.sizes.sum(1), torch.tensor(real, dtype=torch.float32))
    for b, n in enumerate(lengths):
        assert (out.sizes[b, n:] == 0).all()
        groups = out.groups[b, : real[b]]
        assert torch.equal(torch.bincount(groups, minlength=n).float(), out.sizes[b, :n])
        assert (out.groups[b, real[b] :] == -1).all()  # padded SigLIP2 patches only


def test_batch_invariance(case):
    together_in = case.inputs(range(8))
    with torch.no_grad():
        together = case.encoder(together_in)
        alone = [case.encoder(case.inputs([i])) for i in range(8)]
    assert together.lengths.tolist() == [int(o.lengths[0]) for o in alone]
    for i, o in enumerate(alone):
        assert torch.allclose(together.to_list()[i], o.to_list()[0], atol=1e-5)
        assert torch.allclose(together.pooled[i], o.pooled[0], atol=1e-5)
        assert torch.equal(together.groups[i, : o.groups.shape[1]], o.groups[0])


def naive_hf_map(head, tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """transformers' SigLIP head on one image's merged tokens, head by head, with log(size)."""
    attn = head.attention
    dim, heads = attn.embed_dim, attn.num_heads
    wq, wk, wv = attn.in_proj_weight.split(dim)
    bq, bk, bv = attn.in_proj_bias.split(dim)
    q = head.probe[0, 0] @ wq.T + bq
    k, v = tokens @ wk.T + bk, tokens @ wv.T + bv
    step = dim // heads
    parts = []
    for h in range(heads):
        cols = slice(h * step, (h + 1) * step)
        logits = k[:, cols] @ q[cols] / math.sqrt(step) + sizes.log()
        parts.append(torch.softmax(logits, 0) @ v[:, cols])
    out = attn.out_proj(torch.cat(parts))
    return out + head.mlp(head.layernorm(out))


def naive_timm_map(pool, tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """timm's AttentionPoolLatent on one image's merged tokens, head by head, with log(size)."""
    q = pool.q(pool.latent[0])[0]
    k, v = pool.kv(tokens).chunk(2, dim=-1)
    heads, step = pool.num_heads, pool.head_dim
    parts = []
    for h in range(heads):
        cols = slice(h * step, (h + 1) * step)
        logits = k[:, cols] @ q[cols] * pool.scale + sizes.log()
        parts.append(torch.softmax(logits, 0) @ v[:, cols])
    out = pool.proj(torch.cat(parts))
    return out + pool.mlp(pool.norm(out))


@pytest.mark.parametrize("kind", ["hf SigLIP", "open_clip SigLIP"])
def test_siglip_pool_with_merging_equals_a_naive_attention_pool(images, kind):
    case = Case(kind, images)
    with torch.no_grad():
        batch = case.encoder(case.inputs(range(8)))  # a padded batch: lengths differ
        alone = case.encoder(case.inputs([3]))
        assert len(set(batch.lengths.tolist())) > 1
        for out, i, j in [(batch, b, b) for b in range(8)] + [(alone, 0, 3)]:
            n = int(out.lengths[i])
            tokens, sizes = out.tokens[i, :n], out.sizes[i, :n]
            if kind == "hf SigLIP":
                core = case.model
                expected = naive_hf_map(core.head, core.post_layernorm(tokens), sizes)
            else:
                trunk = case.model.trunk
                expected = naive_timm_map(trunk.attn_pool, trunk.norm(tokens), sizes)
            assert (sizes > 1).any()  # merged tokens really are weighted
            assert torch.allclose(out.pooled[i], expected, atol=1e-5), (i, j)


def test_prefix_tokens_never_merge_or_move_and_caps_count_mergeable_tokens(images):
    """A class token and 4 registers: with r far above what can merge, every block merges
    exactly (n - 5) // 2 tokens per image and the 5 prefix tokens stay alone in slots 0-4."""
    model = towers.build("timm reg4")
    enc = dymu.build_encoder(model, schedule=[100] * towers.DEPTH)
    x = torch.stack([enc.preprocess(img) for img in images[:4]])
    with torch.no_grad():
        out, values, used = enc.calibrate(x)
    expected, n = [], 69  # 64 patches + 5 prefix tokens
    for _ in range(towers.DEPTH):
        n -= (n - 5) // 2
        expected.append(n)
    assert out.block_lengths.tolist() == [expected] * 4  # [37, 21, 13, 9]
    assert out.groups[:, :5].tolist() == [list(range(5))] * 4
    assert (out.groups[:, 5:] >= 5).all() and (out.sizes[:, :5] == 1).all()
    # at inference a threshold of -1 merges every mergeable A token: prefix tokens still stay
    enc.set_thresholds(dymu.Thresholds.from_values(-torch.ones(towers.DEPTH), torch.tensor(enc.r)))
    with torch.no_grad():
        out = enc(x)
        again = enc(x[:1])
    assert out.groups[:, :5].tolist() == [list(range(5))] * 4
    assert (out.groups[:, 5:] >= 5).all() and (out.sizes[:, :5] == 1).all()
    assert torch.allclose(out.pooled[0], again.pooled[0], atol=1e-5)


def test_model_instances_resolve_to_their_towers():
    import open_clip
    from conftest import TINY, TINY_LM
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        ViTConfig,
        ViTForImageClassification,
    )

    clip = open_clip.create_model(TINY, pretrained=None)
    assert dymu.build_encoder(clip).tower.module is clip.visual
    vision = CLIPVisionConfig(image_size=32, **towers.hf_shape())
    vlm = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TINY_LM), image_token_id=63)
    )
    assert dymu.build_encoder(vlm).tower.module is vlm.model.vision_tower
    classifier = ViTForImageClassification(ViTConfig(image_size=32, **towers.hf_shape()))
    assert dymu.build_encoder(classifier).tower.module is classifier.vit
    with pytest.raises(dymu.DyMUError, match="found no vision tower dymu can read in .*Linear"):
        dymu.build_encoder(torch.nn.Linear(2, 2))
    with pytest.raises(dymu.DyMUError, match="brings its own weights"):
        dymu.build_encoder(clip, pretrained="openai")


def test_siglip_names_resolve_without_a_class_token():
    spec = dymu.resolve_name("ViT-SO400M-14-SigLIP-384-tome-192out")
    assert (spec.num_blocks, spec.num_patches, spec.r_total, spec.num_prefix_tokens) == (
        27,
        729,
        537,
        0,
    )
    spec = dymu.resolve_name("ViT-SO400M-16-SigLIP2-384-tome")
    assert (spec.num_patches, spec.r_total) == (576, 384)
    enc = dymu.build_encoder(f"{towers.SIGLIP_NAME}-tome-24out")
    assert enc.r == dymu.make_schedule(40, 4) and enc.tower.num_prefix_tokens == 0
    with pytest.raises(dymu.DyMUError, match="keeps 999 tokens but ViT-B-16-SigLIP has 196"):
        dymu.resolve_name("ViT-B-16-SigLIP-tome-999out")


def test_siglip_calibration_and_inference_match_the_naive_reference(images):
    """No prefix tokens: the batch rule's cap, no cap at inference, and every image reordered
    at every merging block, against the loop version in ``naive.py``."""
    model = towers.build("hf SigLIP")
    enc = dymu.build_encoder(model)
    x = torch.stack([enc.preprocess(img) for img in images])
    batches = [x[:4], x[4:8], x[8:]]
    th = dymu.find_thresholds(enc, batches)
    sums = torch.zeros(towers.DEPTH, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            sums += torch.tensor(naive_run(SiglipNaive(model), batch, enc.r, None)[3])
    assert th.count.tolist() == [3] * towers.DEPTH
    assert torch.allclose(th.thresholds.double(), sums / 3, atol=1e-5)
    enc.set_thresholds(th)
    with torch.no_grad():
        out = enc(x)
        xs, sizes, groups, _ = naive_run(SiglipNaive(model), x, enc.r, th.thresholds.tolist())
    assert out.lengths.tolist() == [t.shape[0] for t in xs]
    for b, tokens in enumerate(out.to_list()):
        assert torch.allclose(tokens, xs[b], atol=1e-4)
        assert out.sizes[b, : len(sizes[b])].tolist() == sizes[b]
        assert out.groups[b].tolist() == groups[b]


def test_one_tower_read_by_two_libraries_has_one_identity():
    """open_clip's ViT-B-16 and transformers' CLIP of the same shape and patch weights are
    the same tower to a thresholds file (llava-hf's tower is OpenAI's CLIP converted)."""
    import open_clip
    from transformers import CLIPVisionConfig, CLIPVisionModel

    visual = open_clip.create_model("ViT-B-16", pretrained=None).visual
    config = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        patch_size=16,
    )
    hf = CLIPVisionModel(config)
    with torch.no_grad():
        hf.embeddings.patch_embedding.weight.copy_(visual.conv1.weight.half().float())
    a, b = dymu.build_encoder(visual).identity, dymu.build_encoder(hf).identity
    assert a.architecture == b.architecture and a.same_weights(b)
