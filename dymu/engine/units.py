"""Merging whole *units* inside *windows*: the merge step of Qwen-VL's towers.

A unit is ``unit`` consecutive patch rows (Qwen's 2x2 patches, one LLM token after its patch
merger); a window is a run of units that only merge among themselves (Qwen2.5-VL's attention
windows). The matching, rules and size-weighted merge are :mod:`.merge`'s, on the windows'
padded view with one row per unit (its patches side by side). Every unit also carries its
patches' rotary table (``rope``): a merged unit keeps its destination's.

New lengths are read as :mod:`.deferred` reads them: ``lag`` blocks after each merge (0: right
after it), the windows keeping their dead units (size 0, masked by the ``log(size)`` bias)
until then; every lag computes the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .blocks import Merging
from .deferred import PendingLengths, compact
from .fused import StepConfig, steps_for, threshold_tensor
from .merge import (
    NEG_INF,
    Sides,
    add_merged,
    destinations,
    lay_out,
    match,
    order_keys,
    split_sizes,
    track,
    with_sizes,
)
from .packing import Packing


@dataclass
class Units:
    """Tokens between blocks. ``x (P, D)`` and ``rope (P, R)`` are patch rows, ``unit`` per
    unit, units packed by ``windows`` (dead units included until compacted); ``live (W,)``:
    each window's live units, on the device; ``sizes (U,)`` float32 (``None`` until something
    merged); ``groups (W, W0)``: each original unit's slot in its window (-1: padding)."""

    x: torch.Tensor
    rope: torch.Tensor
    windows: Packing
    live: torch.Tensor
    unit: int
    sizes: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    lag: int = 0
    pending: tuple[PendingLengths, ...] = ()
    read: tuple[tuple[int, list[int]], ...] = ()  # (block, lengths) read so far
    fuse: bool = False  # threshold merges run the compiled step


def merge_units(state: Units, keys: torch.Tensor, merging: Merging, block: int) -> Units:
    """One merge inside every window: ``keys (U, unit, heads, d)``, each unit's patches' keys
    (the metric: their means over heads, side by side, in float32). The windows keep their
    dead units until their lengths are read (``lag`` blocks later; 0: right after)."""
    if state.fuse and merging.tau is not None:
        return _merge_fused(state, keys, merging.tau, block)
    metric = keys.mean(2, dtype=torch.float32).flatten(1)
    windows, count = state.windows, metric.shape[0]
    sides, sizes = Sides(windows.width, 0), state.sizes
    if sizes is None and not windows.uniform:  # padding must read as dead
        sizes = metric.new_ones(count)
    bias = None if sizes is None else windows.pad(sizes.log(), NEG_INF).clamp(max=0.0)
    xs = windows.pad(with_sizes(state.x.view(count, -1), sizes))  # padding: size 0
    node_max, node_idx = match(windows.pad(metric), bias, sides)
    merged = merging.rule(node_max, state.live, windows.width)
    order = order_keys(merged, bias, sides, False).sort(dim=1, stable=True)[1]
    add_merged(xs, merged, node_idx, sides)
    dest = destinations(order, windows.width, merged, node_idx, sides)
    groups = track(state.groups, dest, True)
    live = state.live - merged.sum(-1)
    # the same segments, dead units after the live ones
    x, sizes = split_sizes(lay_out(xs, order, windows), state.x.dtype)
    rope = lay_out(windows.pad(state.rope.view(count, -1)), order, windows)  # the destination's
    state = replace(state, x=x.view(-1, state.x.shape[-1]), sizes=sizes, groups=groups)
    state = replace(state, rope=rope.view(-1, state.rope.shape[-1]), live=live)
    return replace(state, pending=(*state.pending, PendingLengths.start(live, block)))


def _merge_fused(state: Units, keys: torch.Tensor, tau: float, block: int) -> Units:
    """The deferred merge as one compiled step (:mod:`.fused`): windows as its images, units
    as its tokens (their patches side by side), the rotary tables carried."""
    windows, count, dim = state.windows, keys.shape[0], state.x.shape[-1]
    index = (None, None) if windows.uniform else (windows.batch, windows.pos)
    config = StepConfig(0, False, True)
    x, sizes, live, groups, rope = steps_for(config, windows.width).threshold(
        state.x.view(count, -1), state.sizes, keys, state.groups, state.live,
        threshold_tensor(tau, keys.device), *index,
        len(windows.lengths), windows.width, config, state.rope.view(count, -1),
    )  # fmt: skip
    rope = rope.view(-1, state.rope.shape[-1])
    state = replace(state, x=x.view(-1, dim), sizes=sizes, groups=groups, rope=rope, live=live)
    return replace(state, pending=(*state.pending, PendingLengths.start(live, block)))


def catch_up_units(state: Units, block: int | None = None) -> Units:
    """Compact every window to the newest lengths read at least ``lag`` blocks ago (all of
    them when ``block`` is None: the end of the forward, its one wait)."""
    due = [p for p in state.pending if block is None or block - p.block >= state.lag]
    if not due:
        return state
    read = tuple((p.block, p.wait()) for p in due)
    lengths, unit, windows = read[-1][1], state.unit, state.windows
    count = state.x.shape[0] // unit
    x, sizes, after = compact(state.x.view(count, -1), state.sizes, windows, lengths)
    rope = compact(state.rope.view(count, -1), state.sizes, windows, lengths)[0]
    return replace(
        state,
        x=x.view(-1, state.x.shape[-1]),
        rope=rope.view(-1, state.rope.shape[-1]),
        sizes=sizes,
        windows=after,
        pending=state.pending[len(due) :],
        read=(*state.read, *read),
    )


def lengths_by_block(state: Units, first: list[int], blocks: int) -> np.ndarray:
    """``(blocks, W)``: each window's live units after every block, from what was read
    (call after the forward's last wait)."""
    out, current, known = [], np.asarray(first), dict(state.read)
    for block in range(blocks):
        current = np.asarray(known.get(block, current))
        out.append(current)
    return np.stack(out)
