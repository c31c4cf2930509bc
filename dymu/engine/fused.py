"""The merge steps as pure functions, and their compiled (fused) forms.

In eager mode a threshold merge is about 25 kernel launches per block (scores, decision, new
order, size-weighted merge, layout, group tracking, lengths: :mod:`.merge`) and a fixed-r
merge (ToMe mode) about 20, each a few microseconds of host time: what a GPU waits on at
these sizes (issue 19). Written as one function of tensors with the shapes as plain
integers, ``torch.compile(dynamic=True, fullgraph=True)`` fuses a step into a handful of
kernels (on a CPU: four fused loops, the score ``baddbmm``, the sort and one scatter),
compiled once per kind of batch (one image, one length, different lengths) and reused for
every block and every length. Qwen's towers merge whole units inside windows with the same
threshold step (:mod:`.units`): windows are its images, units its tokens (their patches side
by side), and each unit's rotary table is carried along.

The threshold step is the deferred one (:mod:`.deferred`): every image keeps its packed
segment, new tokens first and dead rows after them, so the output has the input's shapes and
nothing is read back; the caller starts the copy of the new lengths. The fixed-r step needs
no read at all: every image keeps ``width - r`` tokens. Both compute what
:func:`dymu.engine.blocks.run_block`'s eager merge computes, op for op; compiled, floating
point sums may round differently in the last bit, so a score within rounding of a threshold
can decide the other way (as between batch sizes in half precision).

When compiling fails (an old torch, a backend without a compiler), the step runs eagerly and
says so once in the log. It also runs eagerly under a ``TorchDispatchMode`` (dynamo does not
compile there) and when gradients are needed, and inside a model compiled as a whole it is
traced into that model's graph.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .merge import (
    NEG_INF,
    Sides,
    add_merged,
    destinations,
    match,
    merge_fixed_r,
    order_keys,
    split_sizes,
    threshold_rule,
    track,
    with_sizes,
)
from .packing import constant

log = logging.getLogger(__name__)

Step = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


@dataclass(frozen=True)
class StepConfig:
    """What stays fixed for a tower: prefix tokens, whether every image is reordered, whether
    ``groups`` hold -1 (padded input patches)."""

    prefix: int
    reorder_all: bool
    gaps: bool


def threshold_step(
    x: torch.Tensor,
    sizes: torch.Tensor | None,
    keys: torch.Tensor,
    groups: torch.Tensor | None,
    lengths: torch.Tensor,
    tau: torch.Tensor,
    batch: torch.Tensor | None,
    pos: torch.Tensor | None,
    bsz: int,
    width: int,
    config: StepConfig,
    carried: torch.Tensor | None = None,
) -> Step:
    """One deferred threshold merge of packed ``x (T, D)``.

    ``keys (T, A, heads, d)``: the block's attention keys of each token's ``A`` rows (1, or
    the patches of a unit); the metric is their mean over heads in float32, rows side by
    side. ``sizes (T,)`` float32 or ``None`` (all 1); ``groups (B, N0)`` or ``None``;
    ``lengths (B,)`` live tokens per image; ``tau`` the block's threshold (a 0-dim float32
    tensor, so one compiled step serves every block); ``batch``/``pos (T,)`` where each packed
    row sits in the padded ``(bsz, width)`` view, ``None`` when every image has ``width``
    tokens (the view is a reshape); ``carried (T, C)``: rows that move with their token and
    are never averaged (a merged token keeps its destination's: rotary tables). Returns
    ``x``, ``sizes``, ``lengths``, ``groups`` and ``carried`` after the merge, packed as
    before (dead rows: size 0).
    """
    uniform = batch is None
    sides = Sides(width, config.prefix)
    metric = keys.mean(-2, dtype=torch.float32).flatten(1)
    bias = None  # 0 on live slots, -inf on padding and dead rows
    if sizes is None and not uniform:  # padding must read as dead
        sizes = metric.new_ones(metric.shape[0])
    if sizes is not None:
        bias = _pad(sizes.log(), batch, pos, bsz, width, NEG_INF).clamp(max=0.0)
    xs = _pad(with_sizes(x, sizes), batch, pos, bsz, width, 0.0)  # padding: size 0
    node_max, node_idx = match(_pad(metric, batch, pos, bsz, width, 0.0), bias, sides)
    merged = threshold_rule(node_max, tau)
    order = order_keys(merged, bias, sides, config.reorder_all).sort(dim=1, stable=True)[1]
    add_merged(xs, merged, node_idx, sides)
    if groups is not None:
        dest = destinations(order, width, merged, node_idx, sides)
        groups = track(groups, dest, config.gaps)
    x, sizes = split_sizes(_lay_out(xs, order, batch, pos), x.dtype)
    if carried is not None:
        carried = _lay_out(_pad(carried, batch, pos, bsz, width, 0.0), order, batch, pos)
    return x, sizes, lengths - merged.sum(-1), groups, carried


def fixed_step(
    x: torch.Tensor,
    sizes: torch.Tensor | None,
    keys: torch.Tensor,
    groups: torch.Tensor | None,
    lengths: torch.Tensor,
    bsz: int,
    width: int,
    r: int,
    config: StepConfig,
) -> Step:
    """One fixed-r merge (ToMe mode) of ``bsz`` images of ``width`` tokens each, packed in
    ``x (T, D)``: each image merges its ``r`` best A tokens (``r`` capped by the caller).
    Arguments as :func:`threshold_step`'s; returns them after the merge, ``width - r`` tokens
    per image (nothing carried)."""
    sides = Sides(width, config.prefix)
    metric = keys.mean(-2, dtype=torch.float32).flatten(1)
    bias = None if sizes is None else sizes.log().reshape(bsz, width).clamp(max=0.0)
    xs = with_sizes(x, sizes).reshape(bsz, width, -1)
    node_max, node_idx = match(metric.reshape(bsz, width, -1), bias, sides)
    out, order, merged = merge_fixed_r(xs, node_max, node_idx, r, sides)
    if groups is not None:
        dest = destinations(order, width, merged, node_idx, sides)
        groups = track(groups, dest, config.gaps)
    x, sizes = split_sizes(out.reshape(-1, out.shape[-1]), x.dtype)
    return x, sizes, lengths - r, groups, None


def _lay_out(
    padded: torch.Tensor, order: torch.Tensor, batch: torch.Tensor | None, pos: torch.Tensor | None
) -> torch.Tensor:
    """Every image's slots of ``padded (B, W, C)`` in ``order``, packed as the input was."""
    laid = padded.gather(1, order[..., None].expand(-1, -1, padded.shape[-1]))
    return laid.reshape(-1, padded.shape[-1]) if batch is None else laid[batch, pos]


def _pad(
    t: torch.Tensor,
    batch: torch.Tensor | None,
    pos: torch.Tensor | None,
    bsz: int,
    width: int,
    fill: float,
) -> torch.Tensor:
    """Packed ``(T, ...)`` -> padded ``(bsz, width, ...)``, ``fill`` after each image."""
    if batch is None:
        return t.reshape(bsz, width, *t.shape[1:])
    out = t.new_full((bsz, width, *t.shape[1:]), fill)
    out[batch, pos] = t  # integer indices: a scatter, no host read
    return out


class FusedStep:
    """A step function, compiled on first use (eager where that cannot be).

    It compiles its own copy of the function: dynamo keeps compiled versions, and its limit on
    recompiling, per code object, so each :func:`steps_for` entry compiles for its own kinds
    of call and none crowds out another's."""

    def __init__(self, fn: Callable[..., Step]) -> None:
        code = fn.__code__.replace()  # equal, but an object of its own
        self.fn = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__)
        self._compiled: Callable[..., Step] | None = None
        self.failed: str | None = None  # why compiling failed, once it has

    def __call__(self, *args: object) -> Step:
        x = args[0]
        if self.failed or x.requires_grad or _get_current_dispatch_mode() is not None:
            return self.fn(*args)
        if self._compiled is None:
            log.info("compiling the %s merge step (once per kind of batch)", self.fn.__name__)
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        try:
            return self._compiled(*args)
        except torch.cuda.OutOfMemoryError:
            raise  # the device's, not the compiler's: eager would not fit either
        except Exception as err:  # noqa: BLE001 - any compiler failure: run eagerly instead
            self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.warning("the fused merge step did not compile (%s); merging eagerly", self.failed)
            return self.fn(*args)


@dataclass(frozen=True)
class FusedSteps:
    """The compiled steps of one configuration (or, traced, the plain functions)."""

    threshold: Callable[..., Step]
    fixed: Callable[..., Step]


def steps_for(config: StepConfig, width: int) -> FusedSteps:
    """The compiled steps for towers of this configuration at padded views of ``width``'s
    parity, made once per process: every encoder, patched model and re-applied patch of that
    configuration reuses what was compiled (compiled code is a per-process resource, as
    torch's own caches are). Odd and even widths (as many A as B tokens or one more) compile
    apart anyway; kept in steps of their own, each stays within dynamo's limit of 8 kinds of
    call (one image or more, one length or not, the first merge). Inside a model compiled as
    a whole, the plain functions, traced into its graph."""
    if torch.compiler.is_compiling():
        return FusedSteps(threshold_step, fixed_step)
    return _compiled_steps(config, width % 2)


@functools.cache
def _compiled_steps(config: StepConfig, parity: int) -> FusedSteps:
    return FusedSteps(FusedStep(threshold_step), FusedStep(fixed_step))


def fuses(fuse: bool | None, device: torch.device | str) -> bool:
    """Whether merges on ``device`` run compiled: ``fuse``, or (``None``) on CUDA only."""
    return torch.device(device).type == "cuda" if fuse is None else fuse


def threshold_tensor(tau: float, device: torch.device) -> torch.Tensor:
    """A block's threshold as the 0-dim float32 tensor the threshold step takes (copied to
    the device once per value)."""
    return constant(np.asarray(tau, dtype=np.float32), device)


class Fuses:
    """For an encoder: ``fuse`` (``None``: on CUDA only) says whether its merges run the
    compiled steps."""

    fuse: bool | None = None

    def _fuses(self, device: torch.device) -> bool:
        """Whether merges on ``device`` run compiled."""
        return fuses(self.fuse, device)
