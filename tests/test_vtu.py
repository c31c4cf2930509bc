"""Virtual token unmerging against the unpatched model and a naive full-length computation."""

import sys

import pytest
import torch
from conftest import TINY_LM, cache_of
from naive_vtu import naive_logits
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from dymu.lm.vtu import apply_vtu, is_vtu_applied, remove_vtu

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def build(family: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    config_cls, model_cls = FAMILIES[family]
    return model_cls(config_cls(**TINY_LM, attn_implementation=attn)).eval()


def random_mapping(gen: torch.Generator, length: int, text: int, patches: int, groups: int):
    """Text tokens keep their own slot; ``patches`` positions after ``text`` share ``groups``."""
    group = torch.randperm(groups, generator=gen).repeat(patches // groups + 1)[:patches]
    group = group[torch.randperm(patches, generator=gen)]
    tail = length - text - patches
    return torch.cat([torch.arange(text), text + group, text + groups + torch.arange(tail)])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_identity_mapping_is_bit_for_bit(family):
    model = build(family)
    embeds = torch.randn(2, 12, 32)
    with torch.no_grad():
        plain = model(inputs_embeds=embeds).logits
        apply_vtu(model)
        patched = model(inputs_embeds=embeds, vtu_mapping=torch.arange(12).expand(2, 12)).logits
        unmapped = model(inputs_embeds=embeds).logits
    assert torch.equal(plain, patched) and torch.equal(plain, unmapped)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_vtu_equals_naive_full_length_computation(family, attn, padding):
    model = build(family, attn)
    gen = torch.Generator().manual_seed(1)
    n = 20
    mapping = torch.stack([random_mapping(gen, n, 3, 12, 4), random_mapping(gen, n, 2, 14, 7)])
    attention_mask = torch.ones(2, n, dtype=torch.long)
    if padding == "left":
        attention_mask[1, :3] = 0
    elif padding == "right":
        attention_mask[1, -3:] = 0
    slots = torch.randn(2, int(mapping.max()) + 1, 32)
    embeds = torch.stack([slots[b][mapping[b]] for b in range(2)])  # repeated inside groups
    with torch.no_grad():
        expected = naive_logits(model.model, model.lm_head, embeds, mapping, attention_mask)
        apply_vtu(model)
        got = model(inputs_embeds=embeds, attention_mask=attention_mask, vtu_mapping=mapping).logits
    valid = attention_mask.bool()
    assert got.shape == (2, n, 64)
    assert torch.allclose(got[valid], expected[valid], atol=1e-5)
    plain = build(family, attn)(inputs_embeds=embeds, attention_mask=attention_mask).logits
    assert not torch.allclose(got[valid], plain[valid], atol=1e-3)  # VTU really differs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generate_matches_naive_step_by_step(family):
    model = build(family)
    gen = torch.Generator().manual_seed(2)
    n, steps = 18, 4
    mapping = random_mapping(gen, n, 3, 12, 5)[None]
    slots = torch.randn(1, int(mapping.max()) + 1, 32)
    embeds = slots[0][mapping[0]][None]
    tokens = []
    with torch.no_grad():
        seq, seq_map = embeds, mapping
        for _ in range(steps):
            mask = torch.ones(1, seq.shape[1], dtype=torch.long)
            nxt = int(naive_logits(model.model, model.lm_head, seq, seq_map, mask)[0, -1].argmax())
            tokens.append(nxt)
            new = model.model.embed_tokens(torch.tensor([[nxt]]))
            seq = torch.cat([seq, new], 1)
            seq_map = torch.cat([seq_map, seq_map.max()[None, None] + 1], 1)
        apply_vtu(model)
        out = model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(1, n, dtype=torch.long),
            vtu_mapping=mapping,
            max_new_tokens=steps,
            do_sample=False,
        )
    assert out[0, -steps:].tolist() == tokens


def test_generate_asks_the_patched_model_for_last_position_logits_only():
    """generate() passes logits_to_keep only to forwards whose signature names it."""
    import inspect

    model = build("llama")
    apply_vtu(model)
    apply_vtu(model)  # idempotent: one vtu_mapping in the signature
    names = list(inspect.signature(model.forward).parameters)
    assert "logits_to_keep" in names and names.count("vtu_mapping") == 1
    head_lengths = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: head_lengths.append(out.shape[1]))
    mapping = torch.tensor([[0, 1, 1, 2, 2, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        model.generate(
            inputs_embeds=torch.randn(1, 10, 32),
            attention_mask=torch.ones(1, 10, dtype=torch.long),
            vtu_mapping=mapping,
            max_new_tokens=3,
            do_sample=False,
        )
    hook.remove()
    assert head_lengths == [1, 1, 1]  # the prefill too: not all 10 prompt positions


def test_apply_is_idempotent_and_remove_restores():
    model = build("llama")
    embeds = torch.randn(1, 10, 32)
    mapping = torch.tensor([[0, 1, 1, 2, 2, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        plain = model(inputs_embeds=embeds).logits
        apply_vtu(apply_vtu(model))
        assert is_vtu_applied(model)
        merged = model(inputs_embeds=embeds, vtu_mapping=mapping).logits
        remove_vtu(model)
        assert not is_vtu_applied(model)
        again = model(inputs_embeds=embeds, vtu_mapping=mapping).logits
        remove_vtu(model)  # a second remove is harmless
    assert torch.equal(again, plain) and not torch.allclose(merged, plain)
    assert not model.model._forward_pre_hooks and not model.model.layers[0]._forward_pre_hooks
    assert "forward" not in model.model.layers[0].self_attn.__dict__
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_writes_every_full_position_into_the_cache(family):
    """After a VTU prefill the cache holds N full-length keys, equal to an independent
    computation: layer 0's key projection of the group mean, rotated at each full position."""
    model = build(family)
    mapping = torch.tensor([[0, 1, 1, 2, 2, 2, 3, 4, 5, 6]])
    embeds = torch.randn(1, 10, 32)
    with torch.no_grad():
        apply_vtu(model)
        cache = cache_of(model(inputs_embeds=embeds, vtu_mapping=mapping, use_cache=True))
        assert cache is not None and cache.get_seq_length() == 10
        keys = cache.layers[0].keys  # (1, kv_heads, 10, head_dim)
        assert keys.shape[-2] == 10
        attn = model.model.layers[0].self_attn
        family_module = sys.modules[type(attn).__module__]
        hidden = model.model.layers[0].input_layernorm(embeds[0, 3:6].mean(0))  # group 2
        raw = attn.k_proj(hidden).view(1, -1, 1, attn.head_dim)  # (1, kv_heads, 1, head_dim)
        cos, sin = model.model.rotary_emb(embeds, position_ids=torch.arange(10)[None])
        for pos in (3, 4, 5):
            _, want = family_module.apply_rotary_pos_emb(
                raw, raw, cos[:, pos : pos + 1], sin[:, pos : pos + 1]
            )
            assert torch.allclose(keys[:, :, pos : pos + 1], want, atol=1e-5), pos


def test_generate_runs_the_prefill_merged_and_decodes_from_the_cache():
    """The prefill's attention sees the 7 slots, each decoding step one new token."""
    model = build("llama")
    apply_vtu(model)
    lengths = []
    hook = model.model.layers[0].self_attn.register_forward_hook(
        lambda m, a, kw, out: lengths.append(out[0].shape[1]), with_kwargs=True
    )
    with torch.no_grad():
        out = model.generate(
            inputs_embeds=torch.randn(1, 10, 32),
            attention_mask=torch.ones(1, 10, dtype=torch.long),
            vtu_mapping=torch.tensor([[0, 1, 1, 2, 2, 2, 3, 4, 5, 6]]),
            max_new_tokens=3,
            do_sample=False,
            return_dict_in_generate=True,
        )
    hook.remove()
    assert lengths == [7, 1, 1]
    assert cache_of(out).get_seq_length() == 10 + 2


def test_a_mapping_that_does_not_cover_the_prompt_is_refused_at_prefill():
    from dymu.errors import DyMUError

    model = build("llama")
    apply_vtu(model)
    with torch.no_grad(), pytest.raises(DyMUError, match="covers 9 positions .* has 10"):
        model(inputs_embeds=torch.randn(1, 10, 32), vtu_mapping=torch.arange(9)[None])


def test_an_attention_without_a_known_cache_argument_is_refused():
    from dymu.errors import DyMUError

    model = build("llama")
    attn = model.model.layers[0].self_attn

    class Odd(type(attn)):
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, kv=None):
            raise AssertionError("never called")

    Odd.__module__ = type(attn).__module__  # the family module, with its rotary function
    attn.__class__ = Odd
    with pytest.raises(DyMUError, match="KV cache"):
        apply_vtu(model)
    assert "forward" not in model.model.layers[1].self_attn.__dict__  # nothing half-patched


def skewed_batch(gen: torch.Generator, n: int = 40):
    """Three left-padded samples keeping 37, 8 and 23 slots of 40 positions."""
    mapping = torch.stack(
        [
            random_mapping(gen, n, 2, 36, 33),  # nearly nothing merged
            random_mapping(gen, n, 2, 36, 4),  # nearly everything merged
            random_mapping(gen, n, 2, 36, 19),
        ]
    )
    mask = torch.ones(3, n, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :2] = 0
    return mapping, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_skewed_left_padded_batch_equals_naive(family):
    """Samples with very different slot counts, left padded: each sample equals the naive
    full-length computation, whatever the others keep."""
    model = build(family)
    mapping, mask = skewed_batch(torch.Generator().manual_seed(5))
    slots = torch.randn(3, int(mapping.max()) + 1, 32)
    embeds = torch.stack([slots[b][mapping[b]] for b in range(3)])
    with torch.no_grad():
        expected = naive_logits(model.model, model.lm_head, embeds, mapping, mask)
        apply_vtu(model)
        got = model(inputs_embeds=embeds, attention_mask=mask, vtu_mapping=mapping).logits
    valid = mask.bool()
    assert torch.allclose(got[valid], expected[valid], atol=1e-5)


def test_norms_and_mlps_see_the_packed_slots_only():
    """Norms, projections and MLPs run on sum(M_i) rows, not on B x max(M_i)."""
    model = build("llama")
    mapping, mask = skewed_batch(torch.Generator().manual_seed(6))
    kept = [len(set(row.tolist())) for row in mapping]
    rows = []
    model.model.layers[1].mlp.register_forward_hook(
        lambda m, a, out: rows.append(a[0].reshape(-1, a[0].shape[-1]).shape[0])
    )
    apply_vtu(model)
    with torch.no_grad():
        model(inputs_embeds=torch.randn(3, 40, 32), attention_mask=mask, vtu_mapping=mapping)
    assert kept == [37, 8, 23]
    assert rows == [sum(kept)]  # 68 rows, where padding to the longest would give 3 x 37


def test_hidden_states_come_back_at_full_positions():
    """output_hidden_states gives every layer's states per sample at the N full positions
    (each position its slot's state), like last_hidden_state, not the packed slots."""
    model = build("llama")
    mapping, mask = skewed_batch(torch.Generator().manual_seed(7))
    embeds = torch.randn(3, 40, 32)
    apply_vtu(model)
    with torch.no_grad():
        out = model.model(
            inputs_embeds=embeds, attention_mask=mask, vtu_mapping=mapping,
            output_hidden_states=True,
        )  # fmt: skip
    assert all(h.shape == (3, 40, 32) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    for b in range(3):  # positions of one slot hold one state
        first = {}
        for n, slot in enumerate(mapping[b].tolist()):
            first.setdefault(slot, n)
            assert torch.equal(out.hidden_states[2][b, n], out.hidden_states[2][b, first[slot]])


def test_the_plan_follows_its_layers_across_devices():
    """A model split over devices (accelerate's hooks call .to on what a layer receives):
    the plan moves with its tensors."""
    from dymu.lm.slots import SlotPlan

    plan = SlotPlan.build(torch.tensor([[0, 0, 1, 2], [0, 1, 1, 1]]))
    moved = plan.to("meta")
    assert moved.rows.device.type == "meta" and moved.mapping.device.type == "meta"
    assert moved.scale.device.type == "meta"
    assert moved.total == plan.total == 5 and plan.rows.device.type == "cpu"
    # each slot's mean, worked by hand: sample 0 slots {0, 1}, {2}, {3}; sample 1 {0}, {1, 2, 3}
    x = torch.arange(8.0).view(2, 4, 1)
    assert plan.pack(x).flatten().tolist() == [0.5, 2.0, 3.0, 4.0, 6.0]
    assert plan.unpack(plan.pack(x)).flatten().tolist() == [0.5, 0.5, 2, 3, 4, 6, 6, 6]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rope_rotated_on_the_slots_is_the_familys_rope(family, monkeypatch):
    """The family's rotate_half runs on the packed slots (its apply_rotary_pos_emb is not
    called in a VTU prefill): the same logits, bit for bit, as the family's rotary function
    called at the full positions."""
    import dymu.lm.vtu_attention as vtu_attention

    model = build(family)
    family_module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    assert vtu_attention.rotates_halves(family_module.__name__)
    mapping, mask = skewed_batch(torch.Generator().manual_seed(8))
    embeds = torch.randn(3, 40, 32)
    apply_vtu(model)
    calls = []
    rope = family_module.apply_rotary_pos_emb
    monkeypatch.setattr(
        family_module, "apply_rotary_pos_emb", lambda *a, **k: calls.append(1) or rope(*a, **k)
    )
    with torch.no_grad():
        on_slots = model(inputs_embeds=embeds, attention_mask=mask, vtu_mapping=mapping).logits
        assert calls == []
        for layer in model.model.layers:  # as for a family whose rotation is another
            layer.self_attn.__dict__[vtu_attention.ROTATES_HALVES] = False
        at_positions = model(inputs_embeds=embeds, attention_mask=mask, vtu_mapping=mapping)
    assert len(calls) == len(model.model.layers)
    assert torch.equal(on_slots, at_positions.logits)


def test_a_rotary_function_of_another_form_is_called_as_it_is():
    """Only a family whose RoPE is x * cos + rotate_half(x) * sin gets the slot rotation:
    an interleaved (GPT-J style) rotation, a family without rotate_half or a rotary
    function of another signature keep their own, called at full positions."""
    import types

    from dymu.lm.vtu_attention import rotates_halves

    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)

    def halves(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def turn(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)

        return q * cos + turn(q) * sin, k * cos + turn(k) * sin

    def sectioned(q, k, cos, sin, mrope_section):
        raise AssertionError("never called with the probe's arguments")

    cases = {
        "halves": (halves, rotate_half, True),
        "interleaved": (interleaved, rotate_half, False),
        "no_rotate_half": (halves, None, False),
        "sectioned": (sectioned, rotate_half, False),
    }
    for name, (rope, rotate, expected) in cases.items():
        module = types.ModuleType(f"dymu_test_rope_{name}")
        module.apply_rotary_pos_emb = rope
        if rotate is not None:
            module.rotate_half = rotate
        sys.modules[module.__name__] = module
        try:
            assert rotates_halves(module.__name__) is expected, name
        finally:
            del sys.modules[module.__name__]
