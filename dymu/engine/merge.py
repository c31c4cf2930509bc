"""Bipartite token matching and size-weighted merging.

Pure tensor functions, in the spirit of ToMe's ``merge.py``: a matcher scores A/B pairs, a
*rule* decides which A tokens merge, and :func:`plan_merge` turns that decision into a small
:class:`MergePlan` that moves every token to its new slot. State (sizes, groups, lengths) is
passed in and returned explicitly. Nothing here imports the rest of the package.

Shapes: ``B`` images, ``N`` current (padded) tokens, A = even positions, B = odd positions.
Matching works on a padded view (padding at the end of each row, ``lengths[b]`` real
tokens); merging works on packed tokens (:class:`Packing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def bipartite_scores(
    metric: torch.Tensor, lengths: torch.Tensor, num_prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best B partner of every A token and its cosine score.

    ``metric`` is ``(B, N, C)`` (unnormalised keys), ``lengths`` ``(B,)``. The first
    ``num_prefix`` positions are prefix tokens (class, registers, distillation): one that
    falls in A is never a source (its score is -inf), one that falls in B is never a
    destination (its column is -inf). Padding never matches either.
    Returns ``node_max (B, ceil(N/2))`` float32 and ``node_idx`` (index into the B tokens).
    Scores are computed and compared in float32, also for half-precision towers: rounded to
    fp16/bf16 many scores would tie with a threshold (ties never merge), so a key's last-bit
    difference between batch sizes would flip a merge and an image's tokens would depend on
    its batch. (The published reference rounds to the tower's precision.)
    """
    n = metric.shape[1]
    metric = F.normalize(metric.float(), dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    dev = metric.device
    pos_a = torch.arange(0, n, 2, device=dev)
    pos_b = torch.arange(1, n, 2, device=dev)
    valid_b = (pos_b[None, :] < lengths[:, None]) & (pos_b[None, :] >= num_prefix)
    scores = scores.masked_fill(~valid_b[:, None, :], NEG_INF)
    node_max, node_idx = scores.max(dim=-1)
    valid_a = (pos_a[None, :] < lengths[:, None]) & (pos_a[None, :] >= num_prefix)
    return node_max.masked_fill(~valid_a, NEG_INF), node_idx


def threshold_rule(node_max: torch.Tensor, tau: float) -> torch.Tensor:
    """Inference rule: merge every A token whose best score is strictly above ``tau``.

    No cap: with a class token a cap of ``(n - 1) // 2`` could never bind,
    and towers without one follow the reference's batch path, which has none.
    """
    return node_max > tau


def batch_rule(node_max: torch.Tensor, num_merges: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration rule: merge the ``num_merges`` best edges of the whole batch.

    Edges are ranked by a stable descending sort of the flattened scores (ties keep the lower
    index first). Returns the merged mask ``(B, Na)`` and the batch threshold: the score of
    the edge at rank ``num_merges`` (the best unmerged one), clamped to ``>= 0``. A 0-dim
    tensor on the scores' device, so accumulating it costs no host sync.
    """
    flat = node_max.reshape(-1)
    values, order = flat.sort(descending=True, stable=True)
    num_merges = min(num_merges, flat.numel())
    merged = torch.zeros_like(flat, dtype=torch.bool)
    merged[order[:num_merges]] = True
    merged &= torch.isfinite(flat)  # never merge a class or padding token
    threshold = values[min(num_merges, flat.numel() - 1)].clamp(min=0.0)
    return merged.view_as(node_max), threshold


def fixed_r_rule(node_max: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-r rule (ToMe mode): each image merges its ``r`` best A tokens.

    Per row, a stable descending sort of the scores (ties keep the lower index first); the
    first ``r`` merge. The caller caps ``r`` at ``(n - num_prefix) // 2``, so every chosen
    score is finite (a prefix or padding token is never chosen). Returns the merged mask and
    the sort order: ToMe lays unmerged A tokens out in that order on towers without prefix
    tokens (``plan_merge``'s ``a_order``).
    """
    order = node_max.argsort(dim=-1, descending=True, stable=True)
    merged = torch.zeros_like(node_max, dtype=torch.bool)
    return merged.scatter(-1, order[:, :r], True), order


@dataclass(frozen=True)
class Packing:
    """Where each image's tokens sit in a packed ``(T, D)`` tensor (``T = sum(lengths)``).

    Per-token work (norms, projections, MLPs, merging) runs on the packed tensor, so no
    image pays for another's length; only scoring uses a small padded view. The index
    tensors (``batch``, ``pos``, ``offsets``) are made on the host from the host lengths and
    copied to the device in one non-blocking copy: no sync. A batch of one length (fixed r,
    nothing merged yet) needs none of them: packing is a reshape there.
    """

    lengths: tuple[int, ...]
    device: torch.device
    index: torch.Tensor | None  # batch, pos, offsets, counts, concatenated (None when uniform)

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device) -> Packing:
        lengths, device = tuple(lengths), torch.device(device)
        uniform = len(set(lengths)) == 1
        return cls(lengths, device, None if uniform else _packing_index(lengths, device))

    def _part(self, which: int) -> torch.Tensor:
        index = self.index
        if index is None:  # uniform: only the flex way and dead-row merges ask, made on the spot
            index = _packing_index(self.lengths, self.device)
        total, bsz = sum(self.lengths), len(self.lengths)
        return index.split([total, total, bsz, bsz])[which]

    @property
    def batch(self) -> torch.Tensor:
        """``(T,)`` image of every packed token."""
        return self._part(0)

    @property
    def pos(self) -> torch.Tensor:
        """``(T,)`` position of every packed token within its image."""
        return self._part(1)

    @property
    def offsets(self) -> torch.Tensor:
        """``(B,)`` first packed index of every image."""
        return self._part(2)

    @property
    def counts(self) -> torch.Tensor:
        """``(B,)`` the host lengths, on the device."""
        return self._part(3)

    @property
    def width(self) -> int:
        return max(self.lengths)

    @property
    def uniform(self) -> bool:
        """Every image has the same length: packing is a reshape."""
        return len(set(self.lengths)) == 1

    def pad(self, packed: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``(T, ...)`` -> ``(B, width, ...)`` with ``fill`` after each image's tokens."""
        shape = (len(self.lengths), self.width, *packed.shape[1:])
        if self.uniform:
            return packed.reshape(shape)
        out = packed.new_full(shape, fill)
        out[self.batch, self.pos] = packed
        return out

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """``(B, width, ...)`` -> ``(T, ...)``: each image's real tokens (inverse of ``pad``)."""
        if self.uniform:
            return padded.reshape(-1, *padded.shape[2:])
        return padded[self.batch, self.pos]


def _packing_index(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``batch``, ``pos``, ``offsets`` and ``counts`` of a packing, built on the host (no op can
    need a sync) and copied to ``device`` from pinned memory without blocking."""
    counts = torch.tensor(lengths)
    total = sum(lengths)
    batch = torch.arange(len(lengths)).repeat_interleave(counts, output_size=total)
    offsets = counts.cumsum(0) - counts
    pos = torch.arange(total) - offsets[batch]
    host = torch.cat([batch, pos, offsets, counts])
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


@dataclass(frozen=True)
class MergePlan:
    """Where every current slot goes: ``dest (B, N)`` local slots (``length`` on padding)."""

    dest: torch.Tensor
    lengths: torch.Tensor
    host_lengths: tuple[int, ...]

    @property
    def length(self) -> int:
        """The new padded length (the longest image)."""
        return max(self.host_lengths)

    def merge(
        self,
        x: torch.Tensor,
        sizes: torch.Tensor | None,
        before: Packing,
        after: Packing,
        dead_rows: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Size-weighted mean of each group on packed tokens, accumulated in float32.

        ``x`` is ``(T, D)`` packed by ``before``; ``sizes`` ``(T,)`` float32 (``None``: all
        ones). Returns ``(T', D)`` packed by ``after`` and the new sizes ``(T',)``.
        With ``dead_rows`` (a plan made with ``bound``) rows of ``before`` past an image's real
        length go nowhere, and rows of ``after`` that no token reaches come out as zeros of
        size 0, which attention's ``log(size)`` bias masks.
        """
        if before.uniform and after.uniform:  # one length per image, before and after
            local = self.dest
            base = torch.arange(len(before.lengths), device=x.device) * after.lengths[0]
            target = base[:, None] + local
            inside = local < after.lengths[0] if dead_rows else None
        else:
            local = self.dest[before.batch, before.pos]
            target = after.offsets[before.batch] + local
            inside = local < after.counts[before.batch] if dead_rows else None
        total = sum(after.lengths)
        if dead_rows:  # one spare row past the end takes what goes nowhere, then is dropped
            target = torch.where(inside, target, total)
        target = target.reshape(-1)
        if sizes is None:
            sizes = torch.ones(x.shape[0], device=x.device, dtype=torch.float32)
        rows = total + int(dead_rows)
        acc = torch.zeros(rows, x.shape[1], device=x.device, dtype=torch.float32)
        acc.index_add_(0, target, x.float() * sizes[:, None])
        new_sizes = torch.zeros(rows, device=x.device, dtype=torch.float32)
        new_sizes.index_add_(0, target, sizes)
        acc, new_sizes = acc[:total], new_sizes[:total]
        # a real slot holds at least size 1, so the clamp only keeps empty rows at 0 / 1
        return (acc / new_sizes.clamp(min=1.0)[:, None]).to(x.dtype), new_sizes

    def track(self, groups: torch.Tensor) -> torch.Tensor:
        """Follow original tokens to their new slot: ``groups (B, N0)`` -> ``(B, N0)``.

        Entries of -1 (padded input patches, e.g. SigLIP2's variable patch counts) stay -1.
        """
        moved = self.dest.gather(1, groups.clamp(min=0))
        return torch.where(groups < 0, groups, moved)


def plan_merge(
    merged: torch.Tensor,
    node_idx: torch.Tensor,
    lengths: torch.Tensor,
    n: int,
    num_prefix: int = 0,
    reorder_all: bool = False,
    a_order: torch.Tensor | None = None,
    new_length: int | None = None,
    bound: tuple[int, ...] | None = None,
) -> MergePlan | None:
    """Turn a merge decision over ``n`` current slots into new slots; ``None`` if nothing moves.

    New order per image: ``[prefix tokens, unmerged A tokens in order, other B tokens in
    order]``, padding last. An image without merges keeps its order unless ``reorder_all``
    (calibration, and inference on towers without prefix tokens: the reference's batch path).
    ``a_order (B, Na)`` lays the unmerged A tokens out in that order of A indices instead of
    by position (ToMe's score order, from :func:`fixed_r_rule`). Reads the new lengths back to the
    host in one small transfer, the only sync per merging block, needed to size the shorter
    tensors; fixed-r merging knows them beforehand (``new_length`` for every image) and skips it.
    With ``bound`` (host upper bounds of the new lengths, e.g. the current ones) nothing is
    read: the plan keeps those lengths, and the slots past an image's real new length are
    dead rows (see :meth:`MergePlan.merge`); a plan is made even if nothing merged.
    """
    dev = merged.device
    pos = torch.arange(n, device=dev)
    real = pos[None, :] < lengths[:, None]
    # prefix tokens stay where they are; "movable" tokens are the real non-prefix ones
    movable = real & (pos >= num_prefix)[None, :]
    move_a, move_b = movable[:, ::2], movable[:, 1::2]
    keep_a = move_a & ~merged
    n_keep = keep_a.sum(-1, keepdim=True)
    count = merged.sum(-1)
    new_lengths = lengths - count
    if new_length is not None:
        host_lengths = [new_length] * merged.shape[0]
    elif bound is not None:
        host_lengths = list(bound)
    else:
        *host_lengths, any_merge = torch.cat([new_lengths, count.max()[None]]).tolist()
        if any_merge == 0 and not reorder_all:
            return None
    length = max(host_lengths)
    # Step by step, for one image:
    # 1. prefix slots 0 .. num_prefix-1 keep their position;
    # 2. kept A tokens follow, in position order (or in ``a_order``): slot
    #    num_prefix + (rank among kept A);
    # 3. B tokens after them: B index j (position 2j+1) is the (j - num_prefix // 2)-th
    #    non-prefix B token (the first num_prefix // 2 B tokens are prefix tokens), so its
    #    slot is first_b + j - num_prefix // 2;
    # 4. a merged A token goes to the slot of its B partner (never a prefix B token);
    # 5. padding goes to ``length``, one past the longest image's last slot.
    first_b = num_prefix + n_keep
    b_offset = first_b - num_prefix // 2
    dest = torch.empty_like(real, dtype=torch.long)
    slot_a = torch.where(keep_a, num_prefix + _rank_among(keep_a, a_order), length)
    dest[:, ::2] = torch.where(merged, b_offset + node_idx, slot_a)
    b_index = torch.arange(move_b.shape[1], device=dev)[None, :]
    dest[:, 1::2] = torch.where(move_b, b_offset + b_index, length)
    dest[:, :num_prefix] = pos[:num_prefix]
    if not reorder_all:
        identity = torch.where(real, pos[None, :], length)
        dest = torch.where((count > 0)[:, None], dest, identity)
    return MergePlan(dest, new_lengths, tuple(host_lengths))


def _rank_among(keep: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """For every kept A token, how many kept A tokens come before it: in position order, or
    in ``order`` (gather the kept flags in that order, count them, scatter the counts back)."""
    if order is None:
        return keep.cumsum(-1) - 1
    before = keep.gather(-1, order).cumsum(-1) - 1
    return torch.empty_like(before).scatter_(-1, order, before)
