"""Virtual token unmerging for transformers decoder LMs with rotary attention.

``apply_vtu(model)`` patches an instance (Llama, Mistral, Qwen2 and others whose attention
has ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and the module's ``apply_rotary_pos_emb``).
A forward call that passes ``vtu_mapping`` (``(B, N)``: full position -> merged slot) runs
with hidden states at merged length: right before the first layer every group is averaged
into its slot, the batch's slots packed together (``sum(M_i)`` rows, no padding between
samples: :mod:`dymu.lm.slots`), norms and MLPs run on them, and each attention projects them,
gathers q/k/v to the N full positions (RoPE and the causal/padding mask at full positions,
the KV cache gets full-length keys/values), attends, and averages the output back per group
before its output projection. The model's final hidden states are gathered back to full
length, so logits, losses and ``generate()`` see N positions. Calls without a mapping, or
whose length differs from it (decoding steps), run the unpatched code.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import DyMUError
from ..patching import call_prior, patch, unpatch
from .slots import SlotPlan
from .vtu_attention import (
    CACHE_ARG,
    CACHE_ARGUMENTS,
    ROTATES_HALVES,
    cache_argument,
    check_attention,
    rotates_halves,
    vtu_attention_forward,
)

_STATE = "_dymu_vtu_handles"


def apply_vtu(model: nn.Module) -> nn.Module:
    """Patch ``model`` (a ``*ForCausalLM`` or its base model) in place; idempotent."""
    base = _decoder(model)
    if hasattr(base, _STATE):
        return model
    for layer in base.layers:
        check_attention(layer.self_attn)
    for layer in base.layers:
        name = cache_argument(layer.self_attn)
        patch(layer.self_attn, "forward", vtu_attention_forward)
        layer.self_attn.__dict__[CACHE_ARG] = name
        rotates = rotates_halves(type(layer.self_attn).__module__)  # probed once per family
        layer.self_attn.__dict__[ROTATES_HALVES] = rotates
    handles = [
        base.register_forward_pre_hook(_plan_hook, with_kwargs=True),
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
        layer.self_attn.__dict__.pop(CACHE_ARG, None)
        layer.self_attn.__dict__.pop(ROTATES_HALVES, None)
    unpatch(model, "forward")
    return model


def is_vtu_applied(model: nn.Module) -> bool:
    return hasattr(_decoder(model), _STATE)


def expand_groups(x: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """``x (B, slots, ...)`` -> ``(B, N, ...)``: every position gets its slot's row."""
    bsz, slots = x.shape[:2]
    if x.dim() == 3:  # one gather
        return x.gather(1, mapping[..., None].expand(-1, -1, x.shape[2]))
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


def _is_prefill(hidden: torch.Tensor, kwargs: dict) -> bool:
    """A call over several positions with nothing cached yet (decoding steps have a cache)."""
    caches = [kwargs[n] for n in CACHE_ARGUMENTS if kwargs.get(n) is not None]
    return hidden.shape[1] > 1 and (not caches or caches[0].get_seq_length() == 0)


def _full_length_call(mapping, length: int) -> bool:
    return mapping is not None and mapping.shape[1] == length


def _inputs_length(args: tuple, kwargs: dict) -> int | None:
    inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        inputs = kwargs.get("input_ids", args[0] if args else None)
    return None if inputs is None else inputs.shape[1]


def _plan_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Before the decoder runs: a full-length mapping becomes the forward's :class:`SlotPlan`
    (flat indices and counts made once, shared by every layer)."""
    mapping = kwargs.get("vtu_mapping")
    if not isinstance(mapping, torch.Tensor):
        return None
    if not _full_length_call(mapping, _inputs_length(args, kwargs) or -1):
        return None
    return args, dict(kwargs, vtu_mapping=SlotPlan.build(mapping))


def _compress_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Before the first layer: ``(B, N, C)`` -> the batch's packed slots ``(1, S, C)``."""
    hidden = args[0] if args else kwargs["hidden_states"]
    plan = kwargs.get("vtu_mapping")
    if not isinstance(plan, SlotPlan) or plan.shape[1] != hidden.shape[1]:
        if plan is not None and _is_prefill(hidden, kwargs):
            raise DyMUError(
                f"vtu_mapping covers {plan.shape[1]} positions but the prompt has "
                f"{hidden.shape[1]}; give one mapping entry per prompt position"
            )
        return None
    packed = plan.pack(hidden)[None]
    if args:
        return (packed, *args[1:]), kwargs
    return args, dict(kwargs, hidden_states=packed)


def _expand_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    """After the decoder: packed slots back to ``(B, N, C)``, so logits see N positions."""
    plan = kwargs.get("vtu_mapping")
    if not isinstance(plan, SlotPlan) or plan.shape[1] != _inputs_length(args, kwargs):
        return output
    output.last_hidden_state = plan.unpack(output.last_hidden_state[0])
    hidden = getattr(output, "hidden_states", None)
    if hidden is not None:  # output_hidden_states: every layer's states at full positions too
        output.hidden_states = tuple(_full_positions(plan, h) for h in hidden)
    return output


def _full_positions(plan: SlotPlan, hidden: torch.Tensor) -> torch.Tensor:
    """Packed slots ``(1, S, C)`` -> ``(B, N, C)``; states already at full positions stay."""
    if hidden.shape[0] == 1 and hidden.shape[1] == plan.total:  # (with B = 1 and S = N the
        return plan.unpack(hidden[0])  # mapping is the identity: the same either way)
    return hidden
