"""Virtual token unmerging for transformers decoder LMs with rotary attention.

``apply_vtu(model)`` patches an instance (Llama, Mistral, Qwen2 and others whose attention
has ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and the module's ``apply_rotary_pos_emb``).
A forward call that passes ``vtu_mapping`` (``(B, N)``: full position -> merged slot) runs
with hidden states at merged length: right before the first layer every group is averaged
into its slot, norms and MLPs run on the slots, and each attention projects the slots,
gathers q/k/v to the N full positions (RoPE and the causal/padding mask at full positions,
the KV cache gets full-length keys/values), attends, and averages the output back per group
before its output projection. The model's final hidden states are gathered back to full
length, so logits, losses and ``generate()`` see N positions. Calls without a mapping, or
whose length differs from it (decoding steps), run the unpatched code.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from ..errors import DyMUError
from ..patching import call_prior, patch, unpatch

_STATE = "_dymu_vtu_handles"
_CACHE_ARG = "_dymu_vtu_cache_argument"
# The attention's KV-cache argument: ``cache`` since transformers 5.2x, ``past_key_values``
# in 5.0/5.1 (the model calls its attention with its own name), ``past_key_value`` before.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


def apply_vtu(model: nn.Module) -> nn.Module:
    """Patch ``model`` (a ``*ForCausalLM`` or its base model) in place; idempotent."""
    base = _decoder(model)
    if hasattr(base, _STATE):
        return model
    for layer in base.layers:
        _check_attention(layer.self_attn)
    for layer in base.layers:
        cache_argument = _cache_argument(layer.self_attn)
        patch(layer.self_attn, "forward", _vtu_attention_forward)
        layer.self_attn.__dict__[_CACHE_ARG] = cache_argument
    handles = [
        base.layers[0].register_forward_pre_hook(_compress_hook, with_kwargs=True),
        base.register_forward_hook(_expand_hook, with_kwargs=True),
    ]
    setattr(base, _STATE, handles)
    patch_forward_with_mapping(model)
    return model


def patch_forward_with_mapping(model: nn.Module) -> None:
    """Patch ``model.forward`` to take ``vtu_mapping`` and pass it on.

    ``generate()`` reads the forward's signature: it forwards only arguments the signature
    names, and asks for logits at the last position only (``logits_to_keep=1``) only when the
    signature names that. So the patch's signature is the forward's own plus ``vtu_mapping``
    (without ``logits_to_keep`` in it, a prefill computed logits for every prompt position).
    """
    before = inspect.signature(model.forward)

    def forward(self: nn.Module, *args, vtu_mapping: torch.Tensor | None = None, **kwargs):
        if vtu_mapping is not None:
            kwargs["vtu_mapping"] = vtu_mapping
        return call_prior(self, "forward", *args, **kwargs)

    forward.__signature__ = _with_mapping(before)
    patch(model, "forward", forward)


def _with_mapping(bound: inspect.Signature) -> inspect.Signature:
    """The unbound signature of a forward (``self`` first) with a keyword ``vtu_mapping``."""
    params = [p for p in bound.parameters.values() if p.name != "vtu_mapping"]
    mapping = inspect.Parameter("vtu_mapping", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    params.insert(at, mapping)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return bound.replace(parameters=[this, *params])


def remove_vtu(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_vtu`, putting back any forward set on the instances before (a no-op
    on an unpatched model)."""
    base = _decoder(model)
    if not hasattr(base, _STATE):
        return model
    for handle in getattr(base, _STATE):
        handle.remove()
    delattr(base, _STATE)
    for layer in base.layers:
        unpatch(layer.self_attn, "forward")
        layer.self_attn.__dict__.pop(_CACHE_ARG, None)
    unpatch(model, "forward")
    return model


def is_vtu_applied(model: nn.Module) -> bool:
    return hasattr(_decoder(model), _STATE)


def group_mean(x: torch.Tensor, mapping: torch.Tensor, slots: int) -> torch.Tensor:
    """Average ``x (B, N, C)`` into ``slots`` groups per sample given ``mapping (B, N)``.

    Accumulates in float32; slots no position maps to come out as zeros.
    """
    bsz, n, dim = x.shape
    flat = _flat_index(mapping, slots)
    acc = torch.zeros(bsz * slots, dim, device=x.device, dtype=torch.float32)
    acc.index_add_(0, flat, x.reshape(bsz * n, dim).float())
    counts = torch.zeros(bsz * slots, device=x.device, dtype=torch.float32)
    counts.index_add_(0, flat, torch.ones(bsz * n, device=x.device, dtype=torch.float32))
    return (acc / counts.clamp(min=1)[:, None]).view(bsz, slots, dim).to(x.dtype)


def expand_groups(x: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """``x (B, slots, ...)`` -> ``(B, N, ...)``: every position gets its slot's row."""
    bsz, slots = x.shape[:2]
    rows = x.reshape(bsz * slots, *x.shape[2:]).index_select(0, _flat_index(mapping, slots))
    return rows.view(bsz, mapping.shape[1], *x.shape[2:])


def _flat_index(mapping: torch.Tensor, slots: int) -> torch.Tensor:
    offsets = torch.arange(mapping.shape[0], device=mapping.device)[:, None] * slots
    return (mapping + offsets).reshape(-1)


def _decoder(model: nn.Module) -> nn.Module:
    """The module holding ``layers`` (``model.model`` for ``*ForCausalLM``)."""
    for candidate in (model, getattr(model, "model", None), getattr(model, "language_model", None)):
        if candidate is not None and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            return candidate
    inner = getattr(model, "model", None)
    if inner is not None and inner is not model:
        return _decoder(inner)
    raise DyMUError(f"{type(model).__name__} has no decoder layers to patch for VTU")


def _check_attention(attn: nn.Module) -> None:
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "config", "layer_idx")
    module = sys.modules[type(attn).__module__]
    if any(not hasattr(attn, n) for n in needed) or not hasattr(module, "apply_rotary_pos_emb"):
        raise DyMUError(
            f"VTU supports rotary attention with q/k/v/o projections (Llama, Mistral, Qwen2); "
            f"{type(attn).__name__} is not one"
        )
    _cache_argument(attn)


def _cache_argument(attn: nn.Module) -> str:
    """The name under which this transformers version passes the KV cache to ``attn``.

    VTU must write the prefill's full-length keys/values into the cache; an attention whose
    cache argument it does not know is refused rather than run with the cache dropped.
    """
    params = inspect.signature(type(attn).forward).parameters
    names = [n for n in CACHE_ARGUMENTS if n in params]
    if not names:
        raise DyMUError(
            f"VTU does not know how {type(attn).__name__}.forward takes its KV cache (none of "
            f"{', '.join(CACHE_ARGUMENTS)} in its signature); this transformers version is not "
            "supported by VTU"
        )
    return names[0]


def _pop_cache(attn: nn.Module, kwargs: dict):
    """Remove the KV cache from ``kwargs`` under any of its names; the one that is set."""
    found = [kwargs.pop(n) for n in CACHE_ARGUMENTS if n in kwargs]
    found = [c for c in found if c is not None]
    if len(found) > 1:
        raise DyMUError(f"{type(attn).__name__} was given its KV cache under two names")
    return found[0] if found else None


def _update_cache(attn: nn.Module, cache, key, value, cos_sin: tuple, kwargs: dict):
    """Write full-length keys/values into the cache as the replaced forward would.

    Mirrors transformers 5.2x (``cache.update(k, v, layer_idx, kwargs=kwargs)``) and 5.0/5.1
    (``past_key_values.update(k, v, layer_idx, {sin, cos, cache_position})``).
    """
    if attn.__dict__.get(_CACHE_ARG) == "cache":
        return cache.update(key, value, attn.layer_idx, kwargs=kwargs)
    cos, sin = cos_sin
    extra = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
    return cache.update(key, value, attn.layer_idx, extra)


def _attention_function(attn: nn.Module, family, registry):
    """The attention kernel the family's forward would use (``get_interface`` where the
    installed transformers has it, else its 5.0 rule: eager, or the registry's entry)."""
    impl = attn.config._attn_implementation
    if hasattr(registry, "get_interface"):
        return registry.get_interface(impl, family.eager_attention_forward)
    return family.eager_attention_forward if impl == "eager" else registry[impl]


def _is_prefill(hidden: torch.Tensor, kwargs: dict) -> bool:
    """A call over several positions with nothing cached yet (decoding steps have a cache)."""
    caches = [kwargs[n] for n in CACHE_ARGUMENTS if kwargs.get(n) is not None]
    return hidden.shape[1] > 1 and (not caches or caches[0].get_seq_length() == 0)


def _full_length_call(mapping: torch.Tensor | None, length: int) -> bool:
    return mapping is not None and mapping.shape[1] == length


def _compress_hook(module: nn.Module, args: tuple, kwargs: dict):
    hidden = args[0] if args else kwargs["hidden_states"]
    mapping = kwargs.get("vtu_mapping")
    if not _full_length_call(mapping, hidden.shape[1]):
        if mapping is not None and _is_prefill(hidden, kwargs):
            raise DyMUError(
                f"vtu_mapping covers {mapping.shape[1]} positions but the prompt has "
                f"{hidden.shape[1]}; give one mapping entry per prompt position"
            )
        return None
    merged = group_mean(hidden, mapping, int(mapping.max()) + 1)
    if args:
        return (merged, *args[1:]), kwargs
    return args, dict(kwargs, hidden_states=merged)


def _expand_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    mapping = kwargs.get("vtu_mapping")
    hidden = output.last_hidden_state
    inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None or not _full_length_call(mapping, inputs.shape[1]):
        return output
    output.last_hidden_state = expand_groups(hidden, mapping)
    return output


def _vtu_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    vtu_mapping: torch.Tensor | None = None,
    **kwargs,
):
    """The attention with virtual unmerging; other calls go to the forward it replaced.

    The KV cache arrives under the name this transformers version uses (``cache`` or
    ``past_key_values``) and is passed on under the name the replaced forward takes.
    """
    cos, sin = position_embeddings
    cache = _pop_cache(self, kwargs)
    if not _full_length_call(vtu_mapping, cos.shape[-2]):
        if cache is not None:
            kwargs[self.__dict__.get(_CACHE_ARG, "cache")] = cache
        return call_prior(
            self,
            "forward",
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            **kwargs,
        )
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    family = sys.modules[type(self).__module__]
    bsz, slots, _ = hidden_states.shape
    full = vtu_mapping.shape[1]

    def project(linear: nn.Module, norm: nn.Module | None = None) -> torch.Tensor:
        x = linear(hidden_states).view(bsz, slots, -1, self.head_dim)
        if norm is not None:
            x = norm(x)
        return expand_groups(x, vtu_mapping).transpose(1, 2)  # (B, heads, N, head_dim)

    query = project(self.q_proj, getattr(self, "q_norm", None))
    key = project(self.k_proj, getattr(self, "k_norm", None))
    value = project(self.v_proj)
    query, key = family.apply_rotary_pos_emb(query, key, cos, sin)
    if cache is not None:
        key, value = _update_cache(self, cache, key, value, (cos, sin), kwargs)
    interface = _attention_function(self, family, ALL_ATTENTION_FUNCTIONS)
    extra = {"sliding_window": self.sliding_window} if hasattr(self, "sliding_window") else {}
    out, weights = interface(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **extra,
        **kwargs,
    )
    out = group_mean(out.reshape(bsz, full, -1), vtu_mapping, slots)
    return self.o_proj(out), weights
