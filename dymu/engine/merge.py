"""Bipartite token matching and size-weighted merging, in few kernels.

Pure tensor functions, in the spirit of ToMe's ``merge.py``: :func:`match` scores A/B pairs,
a *rule* decides which A tokens merge, and a merge moves the tokens. State (sizes, lengths)
is passed in and returned explicitly; nothing here imports the rest of the package but
:mod:`.packing`'s host-to-device copy.

Everything works on a padded view ``(B, W, ...)`` of the batch (a reshape when the images
have one length): ``W`` slots per image, the first ``prefix`` of them prefix tokens (class,
registers), then alternating A (even positions) and B (odd positions) tokens. Slots past an
image's tokens (padding, or tokens merged away whose removal waits for a host read: dead
rows) have size 0, and ``log(size)`` = -inf masks them wherever a score is taken.

A GPU at these sizes is bound by kernel launches, not FLOPs, so every step is written as a
handful of whole-batch ops (issue 19): no per-image loops, no boolean indexing, no host reads.
A merge is a weighted scatter of the merged A tokens into their B partners followed by one
gather that lays every image out in its new order; that order comes from one stable sort of a
small integer key per slot (:func:`order_keys`) rather than from rank arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .packing import Packing, constant

NEG_INF = float("-inf")
# order keys: where a slot goes in its image's new order (a stable sort keeps positions)
PREFIX, KEPT_A, B_SIDE, GONE = 0, 1, 2, 3


@dataclass(frozen=True)
class Sides:
    """Which of ``width`` slots are A and B: A = even positions, B = odd positions, both
    from ``prefix`` on (prefix tokens are never sources or destinations)."""

    width: int
    prefix: int

    @property
    def a_start(self) -> int:
        return self.prefix + self.prefix % 2

    @property
    def b_start(self) -> int:
        return self.prefix + 1 - self.prefix % 2

    def a(self, t: torch.Tensor) -> torch.Tensor:
        """The A slots of ``t (B, W, ...)``: a view."""
        return t[:, self.a_start :: 2]

    def b(self, t: torch.Tensor) -> torch.Tensor:
        """The B slots of ``t (B, W, ...)``: a view."""
        return t[:, self.b_start :: 2]

    @property
    def num_a(self) -> int:
        return len(range(self.a_start, self.width, 2))

    @property
    def num_b(self) -> int:
        return len(range(self.b_start, self.width, 2))


def match(
    metric: torch.Tensor, bias: torch.Tensor | None, sides: Sides
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best B partner of every A token and its cosine score.

    ``metric (B, W, C)`` float32 (unnormalised keys); ``bias (B, W)`` 0 on live slots and -inf
    on padding and dead rows (``None``: every slot is live). Returns ``node_max (B, Na)``
    float32 (-inf for a dead A token, or one without a live partner) and ``node_idx``
    (index into the B slots). Scores are computed and compared in float32, also for
    half-precision towers: rounded to fp16/bf16 many scores would tie with a threshold (ties
    never merge), so a key's last-bit difference between batch sizes would flip a merge and
    an image's tokens would depend on its batch. (The published reference rounds.)
    """
    metric = F.normalize(metric, dim=-1)
    a, b = sides.a(metric), sides.b(metric)
    if bias is None:
        scores = a @ b.transpose(1, 2)
    else:  # dead B columns at -inf in the same kernel as the scores
        scores = torch.baddbmm(sides.b(bias)[:, None, :], a, b.transpose(1, 2))
    node_max, node_idx = scores.max(dim=-1)
    if bias is not None:
        node_max = node_max + sides.a(bias)
    return node_max, node_idx


def threshold_rule(node_max: torch.Tensor, tau: float) -> torch.Tensor:
    """Inference rule: merge every A token whose best score is strictly above ``tau``.

    No cap: with a class token a cap of ``(n - 1) // 2`` could never bind,
    and towers without one follow the reference's batch path, which has none.
    """
    return node_max > tau


def batch_rule(
    node_max: torch.Tensor,
    num_merges: int | torch.Tensor,
    last: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration rule: merge the ``num_merges`` best edges of the whole batch.

    Edges are ranked by a stable descending sort of the flattened scores (ties keep the lower
    index first); an edge merges when its rank is below ``num_merges``. Returns the merged
    mask ``(B, Na)`` and the batch threshold: the score of the edge at rank ``num_merges``
    (the best unmerged one; at most rank ``last``, by default the last edge), clamped to
    ``>= 0``. A 0-dim tensor on the scores' device, so accumulating it costs no host sync.
    ``num_merges`` and ``last`` are host integers or 0-dim tensors on the device
    (:func:`batch_merges`), which the host need not read.
    """
    flat = node_max.reshape(-1)
    count = flat.numel()
    values, order = flat.sort(descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(0, order, _positions(count, flat.device))
    merged = (ranks < num_merges) & torch.isfinite(flat)  # never a class or padding token
    last = count - 1 if last is None else last
    if torch.is_tensor(num_merges) or torch.is_tensor(last):
        rank = torch.minimum(torch.as_tensor(num_merges), torch.as_tensor(last)).clamp(
            max=count - 1
        )
        threshold = values.gather(0, rank.reshape(1)).reshape(())
    else:
        threshold = values[min(num_merges, last, count - 1)]
    return merged.view_as(node_max), threshold.clamp(min=0.0)


def batch_merges(lengths: torch.Tensor, r: int, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the batch rule takes in a block, counted on the device from the live
    ``lengths (B,)``, so that a deferred merge's view (whose width may still hold dead rows)
    decides as the view at the live width would: the merges, ``r`` per image (or window)
    capped at half the mergeable tokens of the longest, and the rank of that view's last
    edge (its A slots, all images)."""
    longest, bsz = lengths.max(), lengths.shape[0]
    per_image = ((longest - prefix) // 2).clamp(max=r)
    a_slots = ((longest - prefix - prefix % 2 + 1) // 2).clamp(min=1)  # Sides(longest).num_a
    return per_image * bsz, a_slots * bsz - 1


def with_sizes(x: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
    """``[x * size, size]`` float32, one channel more than ``x``: what a merge sums (sizes
    ``None``: all ones). Written in one pass where nothing needs gradients (``out=`` has
    none) and outside ``torch.compile`` (which takes no strided ``out=``)."""
    grads = x.requires_grad or (sizes is not None and sizes.requires_grad)
    if grads or torch.compiler.is_compiling():
        if sizes is None:
            sizes = x.new_ones(x.shape[:-1], dtype=torch.float32)
        return torch.cat([x * sizes[..., None], sizes[..., None]], -1)
    out = x.new_empty((*x.shape[:-1], x.shape[-1] + 1), dtype=torch.float32)
    if sizes is None:
        out[..., :-1] = x
        out[..., -1] = 1.0
    else:
        torch.mul(x, sizes[..., None], out=out[..., :-1])
        out[..., -1] = sizes
    return out


def order_keys(
    merged: torch.Tensor, bias: torch.Tensor | None, sides: Sides, reorder_all: bool
) -> torch.Tensor:
    """Where every slot goes, as a key whose stable ascending sort is the new order.

    Per image: ``[prefix tokens, kept A tokens, B tokens]`` in position order, then the
    merged A tokens and dead slots (key >= ``GONE``; +inf for dead ones). An image without
    merges keeps its order (all keys 0) unless ``reorder_all`` (calibration, and inference on
    towers without prefix tokens: the reference's batch path). Returns ``(B, W)``, float
    when ``bias`` is given.
    """
    base = _categories(sides.width, sides.prefix, merged.device)
    if reorder_all:
        key = base.repeat(merged.shape[0], 1)
    else:
        key = base * merged.any(-1, keepdim=True)
    sides.a(key).add_(merged, alpha=GONE - KEPT_A)
    return key if bias is None else key - bias  # dead slots: +inf


def add_merged(
    xs: torch.Tensor, merged: torch.Tensor, node_idx: torch.Tensor, sides: Sides
) -> torch.Tensor:
    """Threshold / batch-rule merge, in place: ``xs (B, W, D + 1)`` from :func:`with_sizes`,
    every merged A token added into its B partner and left dead (size 0). Returns ``xs``;
    :func:`lay_out` then puts every image in its new order and :func:`split_sizes` divides."""
    dim = xs.shape[-1]
    into = node_idx[..., None].expand(-1, -1, dim)
    sides.b(xs).scatter_add_(1, into, sides.a(xs) * merged[..., None])
    sides.a(xs)[..., -1].masked_fill_(merged, 0.0)  # merged away: size 0, a dead row
    return xs


def lay_out(xs: torch.Tensor, order: torch.Tensor, into: Packing | None = None) -> torch.Tensor:
    """Every image's slots in ``order (B, W)`` (slot i takes old slot ``order[i]``): padded
    ``(B, W, C)``, or packed by ``into`` (the first ``into.lengths[b]`` new slots of image
    ``b``), which then takes one row gather instead of a padded copy and a pack."""
    dim = xs.shape[-1]
    bsz, width = order.shape
    if into is None or (into.uniform and into.width == width):
        out = xs.gather(1, order[..., None].expand(-1, -1, dim))
        return out if into is None else into.pack(out)
    rows = order + constant(np.arange(bsz)[:, None] * width, order.device)  # rows of xs, flat
    return xs.reshape(-1, dim).index_select(0, into.pack(rows[:, : into.width]))


def merge_fixed_r(
    xs: torch.Tensor, node_max: torch.Tensor, node_idx: torch.Tensor, r: int, sides: Sides
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed-r merge (ToMe mode): each image merges its ``r`` best A tokens.

    A stable descending sort of the scores (ties keep the lower index first) picks them; the
    caller caps ``r`` so every chosen score is finite. The new order is ToMe's: prefix tokens,
    kept A tokens (in position order with prefix tokens, in score order without), B tokens.
    Returns the merged ``[x * size, size]`` ``(B, W - r, D + 1)``, the old slot of every new
    slot ``(B, W - r)``, and the merged A indices ``(B, r)`` with their B partners.
    """
    dim = xs.shape[-1]
    by_score = node_max.argsort(dim=-1, descending=True, stable=True)
    sources, kept = by_score[:, :r], by_score[:, r:]
    if sides.prefix:
        kept = kept.sort(dim=-1).values
    partners = node_idx.gather(-1, sources)
    a_slots, b_slots, prefix_slots = _sides_slots(sides, xs.device)
    bsz = xs.shape[0]
    order = torch.cat([prefix_slots.expand(bsz, -1), a_slots[kept], b_slots.expand(bsz, -1)], 1)
    moved = sides.a(xs).gather(1, sources[..., None].expand(-1, -1, dim))
    sides.b(xs).scatter_add_(1, partners[..., None].expand(-1, -1, dim), moved)
    out = xs.gather(1, order[..., None].expand(-1, -1, dim))
    return out, order, (sources, partners)


def split_sizes(out: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``[x * size, size]`` -> the size-weighted mean ``x`` in ``dtype`` and the sizes (dead
    rows: size 0, ``x`` finite)."""
    sizes = out[..., -1]
    x = out[..., :-1] / sizes[..., None].clamp(min=1.0)
    return x.to(dtype), sizes


def destinations(
    order: torch.Tensor,
    width: int,
    merged: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    node_idx: torch.Tensor,
    sides: Sides,
) -> torch.Tensor:
    """Where every old slot went: ``(B, W)`` new slots (``order`` inverted), a merged A token
    following its B partner (``node_idx``). ``merged`` is the mask ``(B, Na)``, or (fixed r)
    the merged A indices ``(B, r)`` with their partners."""
    bsz, count = order.shape
    slots = _positions(count, order.device).expand(bsz, -1)
    dest = order.new_empty(bsz, width).scatter_(1, order, slots)
    dest_a = sides.a(dest)
    if isinstance(merged, tuple):  # fixed r: the merged A tokens are listed
        sources, partners = merged
        dest_a.scatter_(1, sources, sides.b(dest).gather(1, partners))
    elif torch.compiler.is_compiling():  # no strided out= there
        dest_a.copy_(torch.where(merged, sides.b(dest).gather(1, node_idx), dest_a))
    else:
        torch.where(merged, sides.b(dest).gather(1, node_idx), dest_a, out=dest_a)
    return dest


def track(groups: torch.Tensor, dest: torch.Tensor, gaps: bool = False) -> torch.Tensor:
    """Follow original tokens to their new slot: ``groups (B, N0)`` -> ``(B, N0)``.

    With ``gaps`` entries of -1 (padded input patches, e.g. SigLIP2's variable patch counts)
    stay -1.
    """
    if not gaps:
        return dest.gather(1, groups)
    moved = dest.gather(1, groups.clamp(min=0))
    return torch.where(groups < 0, groups, moved)


def _categories(width: int, prefix: int, device: torch.device) -> torch.Tensor:
    """``(W,)`` order keys before merging: PREFIX, then KEPT_A / B_SIDE by position parity."""
    if torch.compiler.is_compiling():  # traced: made on the device, in the graph
        pos = torch.arange(width, device=device)
        return torch.where(pos < prefix, PREFIX, KEPT_A + pos % 2)
    pos = np.arange(width)
    return constant(np.where(pos < prefix, PREFIX, KEPT_A + pos % 2), device)


def _sides_slots(
    sides: Sides, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions of the A slots, the B slots and the prefix slots, on ``device``."""
    width = sides.width
    ranges = [(sides.a_start, width, 2), (sides.b_start, width, 2), (0, sides.prefix, 1)]
    if torch.compiler.is_compiling():
        return tuple(torch.arange(*r, device=device) for r in ranges)
    parts = [np.arange(*r) for r in ranges]
    return constant(np.concatenate(parts), device).split([len(p) for p in parts])


def _positions(count: int, device: torch.device) -> torch.Tensor:
    """``arange(count)`` on ``device``."""
    if torch.compiler.is_compiling():
        return torch.arange(count, device=device)
    return constant(np.arange(count), device)
