"""The attention of virtual token unmerging, and how it meets transformers' attention seams.

:func:`vtu_attention_forward` replaces a decoder attention's ``forward`` on the instance
(see :mod:`dymu.lm.vtu`). It follows the family's own pieces: its ``apply_rotary_pos_emb``
(or, where that is the rotation of halves, its ``rotate_half`` on the packed slots), the
attention kernel transformers' dispatch picks (``ALL_ATTENTION_FUNCTIONS``), the KV cache
under the argument name the installed version passes. It mirrors the forward of
``LlamaAttention`` in transformers 5.18-5.25 (Mistral and Qwen2 share it; ``q_norm``/
``k_norm`` where a family has them).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from ..errors import DyMUError
from ..patching import call_prior
from .slots import SlotPlan

CACHE_ARG = "_dymu_vtu_cache_argument"
ROTATES_HALVES = "_dymu_vtu_rotates_halves"  # set at apply: whether RoPE rotates on the slots
# The attention's KV-cache argument: ``cache`` since transformers 5.2x, ``past_key_values``
# in 5.0-5.1x (the model calls its attention with its own name), ``past_key_value`` before.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


def check_attention(attn: nn.Module) -> None:
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "config", "layer_idx")
    module = sys.modules[type(attn).__module__]
    if any(not hasattr(attn, n) for n in needed) or not hasattr(module, "apply_rotary_pos_emb"):
        raise DyMUError(
            f"VTU supports rotary attention with q/k/v/o projections (Llama, Mistral, Qwen2); "
            f"{type(attn).__name__} is not one"
        )
    cache_argument(attn)


def cache_argument(attn: nn.Module) -> str:
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


def forward_cache_argument(forward: Callable) -> str:
    """The name a model's ``forward`` takes the KV cache by: ``cache`` since transformers
    renamed ``past_key_values`` (which it deprecates, warning even when given None),
    ``past_key_values`` before."""
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


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
    if attn.__dict__.get(CACHE_ARG) == "cache":
        return cache.update(key, value, attn.layer_idx, kwargs=kwargs)
    cos, sin = cos_sin
    extra = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
    return cache.update(key, value, attn.layer_idx, extra)


@functools.cache
def rotates_halves(family_name: str) -> bool:
    """Whether the family's ``apply_rotary_pos_emb`` is ``x * cos + rotate_half(x) * sin``
    (Llama, Mistral, Qwen2, Qwen2/2.5/3-VL's text models), checked once on a random probe.

    Then RoPE commutes with the gather to full positions except for ``cos``/``sin``:
    ``rotate_half`` runs on the ``S`` packed slots and only two products and a sum run at
    the ``B x N`` positions (:func:`_rotated_at_positions`). A family whose rotary function
    is anything else gets it called as it is, at full positions.
    """
    family = sys.modules[family_name]
    rotate = getattr(family, "rotate_half", None)
    if rotate is None:
        return False
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    cos, sin = (torch.randn(2, 5, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    try:
        got = family.apply_rotary_pos_emb(q, k, cos, sin)
    except Exception:  # another signature: call it as the family does, at full positions
        return False
    want = [x * cos[:, None] + rotate(x) * sin[:, None] for x in (q, k)]
    return all(torch.allclose(g, w) for g, w in zip(got, want, strict=True))


def _rotated_at_positions(
    family, plan: SlotPlan, slots: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """``(S, heads, head_dim)`` slots -> ``(B, heads, N, head_dim)`` rotated at every full
    position: ``unpack(x) * cos + unpack(rotate_half(x)) * sin``, the rotation of the halves
    done on the slots. At the full positions: two gathers, two in-place products and a sum,
    where the family's rotation after one gather adds two products, a negation, a
    concatenation and a sum, each a new tensor."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B | 1, N, 1, head_dim)
    rotated = plan.unpack(family.rotate_half(slots)).mul_(sin)
    return plan.unpack(slots).mul_(cos).add_(rotated).transpose(1, 2)  # as rounded unfused


def _attention_function(attn: nn.Module, family, registry):
    """The attention kernel the family's forward would use (``get_interface`` where the
    installed transformers has it, else its 5.0 rule: eager, or the registry's entry)."""
    impl = attn.config._attn_implementation
    if hasattr(registry, "get_interface"):
        return registry.get_interface(impl, family.eager_attention_forward)
    return family.eager_attention_forward if impl == "eager" else registry[impl]


def _qkv_at_positions(
    self: nn.Module,
    family: ModuleType,
    hidden_states: torch.Tensor,
    plan: SlotPlan,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key (rotated) and value at the ``(B, heads, N, head_dim)`` full positions,
    projected (and q/k-normed, where the family has norms) on the packed slots."""
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])  # (S, C)

    def project(linear: nn.Module, norm: nn.Module | None = None) -> torch.Tensor:
        x = linear(rows).view(plan.total, -1, self.head_dim)  # (S, heads, head_dim)
        return x if norm is None else norm(x)

    def full(x: torch.Tensor) -> torch.Tensor:
        return plan.unpack(x).transpose(1, 2)  # (B, heads, N, head_dim)

    query = project(self.q_proj, getattr(self, "q_norm", None))
    key = project(self.k_proj, getattr(self, "k_norm", None))
    value = full(project(self.v_proj))
    if cos.dim() == 3 and cos.dtype == query.dtype and self.__dict__.get(ROTATES_HALVES):
        query = _rotated_at_positions(family, plan, query, cos, sin)
        key = _rotated_at_positions(family, plan, key, cos, sin)
    else:
        query, key = family.apply_rotary_pos_emb(full(query), full(key), cos, sin)
    return query, key, value


def vtu_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    vtu_mapping: SlotPlan | torch.Tensor | None = None,
    **kwargs,
):
    """The attention with virtual unmerging; other calls go to the forward it replaced.

    ``hidden_states`` are the batch's packed slots ``(1, S, C)`` and ``vtu_mapping`` the
    forward's :class:`SlotPlan`: project the slots, gather q/k/v to the ``(B, N)`` full
    positions, RoPE, cache and attention there, then average the output back per slot.
    Where the family's RoPE is the rotation of halves (:func:`rotates_halves`), its
    ``rotate_half`` runs on the slots before the gather.

    The KV cache arrives under the name this transformers version uses (``cache`` or
    ``past_key_values``) and is passed on under the name the replaced forward takes.
    """
    cos, sin = position_embeddings
    cache = _pop_cache(self, kwargs)
    if not isinstance(vtu_mapping, SlotPlan) or vtu_mapping.shape[1] != cos.shape[-2]:
        if cache is not None:  # under the name the replaced forward takes
            kwargs[self.__dict__.get(CACHE_ARG, "cache")] = cache
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
    plan = vtu_mapping
    query, key, value = _qkv_at_positions(self, family, hidden_states, plan, cos, sin)
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
    out = plan.pack(out.reshape(*plan.shape, -1))  # (S, heads * head_dim)
    return self.o_proj(out).view(hidden_states.shape), weights
