"""Token merging patched into ViT classifiers and towers: fixed ``r`` (ToMe) or DyMU thresholds.

:func:`apply_tome` patches the blocks of a model's vision tower *on the instance*: each block
runs the step the encoder runs (:func:`dymu.engine.blocks.run_block`: attention with ``log(size)``
bias, the merge, the MLP) and hands the library its tokens at merged length, so the model's
own forward, heads, hooks and output dataclasses keep working. Pooling heads that need sizes
get them. :func:`remove_tome` puts back exactly what was there, accelerate's
hooks and anyone else's wrappers included. What the last forward did is on
``model.dymu_tome`` (a :class:`ToMeState`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..engine.blocks import Merging, Tokens, run_block, threshold_merging
from ..engine.fused import fuses
from ..engine.packing import Packing
from ..engine.schedule import ToMeR, tome_schedule
from ..errors import DyMUError
from ..patching import call_prior, patch, unpatch
from ..thresholds import Thresholds, TowerIdentity
from ..towers.base import TowerAdapter

log = logging.getLogger(__name__)

ATTRIBUTE = "dymu_tome"


@dataclass
class ToMeState:
    """What a patched model merges (``r`` per block, or ``thresholds``) and what its last
    forward did: ``lengths (B,)`` tokens per image, ``sizes (B, L)`` original patches per slot
    (0 on padding; ``None`` while nothing merged), ``block_lengths`` after each block and, with
    ``trace_source``, ``groups (B, N0)``: every original token's slot in the output (prefix
    tokens included). Tokens themselves are not kept: the model hands them on."""

    r: list[int]
    thresholds: Thresholds | None
    prop_attn: bool
    trace_source: bool
    tower: TowerAdapter = field(repr=False)
    fuse: bool | None = None  # fixed-r merges run the compiled step (None: on CUDA)
    lengths: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    block_lengths: list[torch.Tensor] = field(default_factory=list)
    packing: Packing | None = field(default=None, repr=False)
    _sizes: torch.Tensor | None = field(default=None, repr=False)  # packed, (T,)
    _patched: list[tuple[object, str]] = field(default_factory=list, repr=False)

    @property
    def sizes(self) -> torch.Tensor | None:
        return None if self._sizes is None else self.packing.pad(self._sizes)

    def begin(self, x: torch.Tensor) -> None:
        """A new forward: ``x (B, N, D)`` enters the first block, nothing merged yet."""
        bsz, n = x.shape[:2]
        self.packing = Packing.from_lengths([n] * bsz, x.device)
        self.lengths = torch.full((bsz,), n, device=x.device, dtype=torch.long)
        self.groups = torch.arange(n, device=x.device).expand(bsz, n) if self.trace_source else None
        self._sizes, self.block_lengths = None, []

    def tokens(self, x: torch.Tensor) -> Tokens:
        """The padded ``x (B, L, D)`` a block receives, packed, with what the state knows."""
        packed = self.packing.pack(x)
        fuse = fuses(self.fuse, x.device)
        return Tokens(packed, self.packing, self.lengths, self._sizes, self.groups, fuse=fuse)

    def after(self, tokens: Tokens) -> None:
        self.packing, self.lengths, self._sizes = tokens.packing, tokens.lengths, tokens.sizes
        self.groups = tokens.groups
        self.block_lengths.append(tokens.lengths)


def apply_tome(
    model: nn.Module,
    r: ToMeR = 16,
    prop_attn: bool = True,
    trace_source: bool = False,
    thresholds: str | os.PathLike | Thresholds | None = None,
    fuse: bool | None = None,
) -> nn.Module:
    """Merge tokens inside ``model``'s vision tower, in place; returns ``model``.

    ``r``: tokens merged per block (ToMe): an int for every block, a list (one per block,
    zeros appended) or ``(r, inflection)``. Every image keeps the same length, so tensor
    shapes stay regular; on a class-token tower this is exactly ToMe. With ``thresholds``
    (a file or :class:`Thresholds` found for this tower) DyMU's rule applies instead: each
    image keeps the tokens its content needs (padded, batch-invariant). ``prop_attn`` adds
    ``log(size)`` to attention logits; ``trace_source`` keeps each image's ``groups`` on
    ``model.dymu_tome``. ``fuse``: fixed-r merges run one compiled step instead of some 20
    eager ops (:mod:`dymu.engine.fused`; ``None``: on CUDA only). Applying again replaces the
    previous settings.
    """
    from .factory import find_tower, instance_name

    if ATTRIBUTE in model.__dict__:
        remove_tome(model)
    tower = find_tower(model)
    if thresholds is not None:
        thresholds = _load(thresholds, tower, instance_name(tower.module))
        schedule = [int(v) for v in thresholds.r.tolist()]
        plan = threshold_merging(thresholds, schedule, tower.num_prefix_tokens == 0)
    else:
        schedule = tome_schedule(r, tower.num_blocks)
        plan = [Merging(fixed_r=v) if v > 0 else None for v in schedule]
    state = ToMeState(schedule, thresholds, prop_attn, trace_source, tower, fuse)
    patches = list(tower.sized_heads(lambda: state.sizes))
    for index, block in enumerate(tower.blocks):
        name = _forward_name(block)
        patches.append((block, name, _block_forward(state, index, plan[index], name)))
    if hasattr(getattr(tower.module, "config", None), "output_attentions"):
        name = _forward_name(tower.module)
        patches.append((tower.module, name, _no_attention_maps(name)))
    for obj, name, func in patches:
        patch(obj, name, func)
        state._patched.append((obj, name))
    model.__dict__[ATTRIBUTE] = state
    return model


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tome`: every patched method is what it was before (no-op if the
    model is not patched); returns ``model``."""
    state = model.__dict__.pop(ATTRIBUTE, None)
    if state is not None:
        for obj, name in reversed(state._patched):
            unpatch(obj, name)
    return model


def _forward_name(module: nn.Module) -> str:
    """Which attribute holds the module's own forward: accelerate's hooks keep it in
    ``_old_forward`` and wrap it, so patching there keeps the hook (device moves, offloaded
    weights) running around the patched block."""
    if "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


def _block_forward(state: ToMeState, index: int, merging: Merging | None, name: str) -> Callable:
    """The patched forward of block ``index`` (held in ``name``): the library's own block
    while nothing has merged, dymu's block step after that (or where this block merges)."""

    def forward(block: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if index == 0:
            state.begin(x)
        packing = state.packing
        if packing is None or tuple(x.shape[:2]) != (len(packing.lengths), packing.width):
            raise DyMUError("the blocks of a ToMe-patched tower run in order from the first")
        if merging is None and state._sizes is None:  # nothing merged yet: the block as it is
            state.block_lengths.append(state.lengths)
            return call_prior(block, name, x, *args, **kwargs)
        _refuse_masks(args, kwargs)
        tokens = run_block(state.tower, index, state.tokens(x), merging, state.prop_attn)
        state.after(tokens)
        return tokens.packing.pad(tokens.x)

    return forward


def _refuse_masks(args: tuple, kwargs: dict) -> None:
    given = [*args, *kwargs.values()]
    if any(isinstance(v, torch.Tensor) for v in given) or kwargs.get("is_causal"):
        raise DyMUError("a ToMe-patched tower cannot apply an attention mask to merged tokens")


def _no_attention_maps(name: str) -> Callable:
    """transformers towers: attention maps are refused in one line (tokens merge inside the
    blocks, so no map would match the model's positions)."""

    def forward(module: nn.Module, *args, **kwargs):
        wanted = kwargs.get("output_attentions")
        if wanted or (wanted is None and getattr(module.config, "output_attentions", False)):
            raise DyMUError(
                "a ToMe-patched model does not return attention maps; call it without "
                "output_attentions (hidden states come at merged length)"
            )
        return call_prior(module, name, *args, **kwargs)

    return forward


def _load(
    thresholds: str | os.PathLike | Thresholds, tower: TowerAdapter, label: str
) -> Thresholds:
    source = "thresholds"
    if not isinstance(thresholds, Thresholds):
        source = str(thresholds)
        thresholds = Thresholds.load(Path(thresholds))
    identity = TowerIdentity.of(label, tower.architecture(), tower.patch_weight)
    thresholds.check_tower(identity, tower.num_blocks, source)
    return thresholds
