"""Virtual token unmerging the slow way (DESIGN section 7): every layer's attention at full
length on the expanded hidden states, group means with Python loops. The reference the
patched LMs must agree with."""

import inspect

import torch
from transformers.masking_utils import create_causal_mask


def naive_group_mean(x: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (slots, C) with Python loops."""
    slots = int(mapping.max()) + 1
    out = torch.zeros(slots, x.shape[1])
    for s in range(slots):
        members = [i for i in range(len(mapping)) if int(mapping[i]) == s]
        if members:
            out[s] = sum(x[i] for i in members) / len(members)
    return out


def _causal_mask(config, embeds, attention_mask, position_ids):
    """transformers' own mask, called with the arguments this version names (no cache)."""
    params = inspect.signature(create_causal_mask).parameters
    extra = {"cache_position": position_ids[0]} if "cache_position" in params else {}
    cache = "cache" if "cache" in params else "past_key_values"
    embeds_name = "inputs_embeds" if "inputs_embeds" in params else "input_embeds"
    return create_causal_mask(
        config=config,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{embeds_name: embeds, cache: None},
        **extra,
    )


def naive_logits(
    base, lm_head, embeds, mapping, attention_mask, rope_positions=None, deepstack=None
):
    """Expand to full length, run the unpatched attention, average per group; loops only.

    ``base`` is the decoder (``model.model`` of a ``*ForCausalLM``), ``lm_head`` its head;
    ``rope_positions``: what its rotary embedding takes when not ``arange(N)`` (Qwen-VL's
    3D positions ``(3, B, N)``, as the model computed them). ``deepstack``: Qwen3-VL's
    ``(visual position mask (B, N0), rows per layer)``, added at those positions after the
    first layers (the group means of the additions, as hidden states are per group).
    """
    bsz, n, _ = embeds.shape
    slots = int(mapping.max()) + 1
    position_ids = torch.arange(n)[None]
    rope = position_ids if rope_positions is None else rope_positions
    pos = base.rotary_emb(embeds, position_ids=rope)
    mask = _causal_mask(base.config, embeds, attention_mask, position_ids)

    def per_sample_mean(x):  # (B, N, C) -> (B, slots, C)
        out = torch.zeros(bsz, slots, x.shape[-1])
        for b in range(bsz):
            m = naive_group_mean(x[b], mapping[b])
            out[b, : m.shape[0]] = m
        return out

    def expand(h):  # (B, slots, C) -> (B, N, C)
        return torch.stack([h[b][mapping[b]] for b in range(bsz)])

    h = per_sample_mean(embeds)
    for i, layer in enumerate(base.layers):
        attn, _ = layer.self_attn(
            expand(layer.input_layernorm(h)), position_embeddings=pos, attention_mask=mask
        )
        h = h + per_sample_mean(attn)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        if deepstack is not None and i < len(deepstack[1]):
            visual, rows = deepstack
            added = torch.zeros(bsz, n, h.shape[-1])
            at = [(b, p) for b in range(bsz) for p in range(visual.shape[1]) if visual[b, p]]
            for (b, p), row in zip(at, rows[i], strict=True):
                added[b, p] = row
            h = h + per_sample_mean(added)
    return lm_head(expand(base.norm(h)))
