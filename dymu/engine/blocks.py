"""One block of a tower with merging: the step the encoder and the ToMe patch share.

A block is ``x = x + attn_out(attend(qkv(x))); [merge]; x = x + mlp(x)``, read
through a :class:`~dymu.towers.base.TowerAdapter`. What the merge does is a
:class:`Merging`: a threshold or batch rule (DyMU), or a fixed ``r`` per image (ToMe mode).
Tokens travel packed (:class:`Tokens`), so no image pays for another's length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ..errors import DyMUError
from ..thresholds import Thresholds
from ..towers.base import TowerAdapter
from .attention import attend, way
from .deferred import PendingLengths, compact
from .fused import StepConfig, steps_for, threshold_tensor
from .merge import (
    NEG_INF,
    Sides,
    add_merged,
    batch_merges,
    batch_rule,
    destinations,
    lay_out,
    match,
    merge_fixed_r,
    order_keys,
    split_sizes,
    threshold_rule,
    track,
    with_sizes,
)
from .packing import Packing

# A rule decides, for one block, which A tokens merge: (node_max, lengths, n) -> mask (B, Na).
Rule = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Merging:
    """How one block merges: a ``rule`` (threshold or batch rule) or a ``fixed_r`` per image.

    ``reorder_all``: images without merges are reordered too (calibration; towers without
    prefix tokens at inference). Fixed r always reorders and lays unmerged A tokens out in
    ToMe's order (by position with prefix tokens, by score without).
    """

    rule: Rule | None = None
    reorder_all: bool = False
    fixed_r: int | None = None
    tau: float | None = None  # the threshold of a threshold rule (what the fused step takes)


@dataclass
class Tokens:
    """Tokens between blocks: packed ``x (T, D)``, where each image's tokens sit, their sizes
    ``(T,)`` float32 (``None`` until something merged) and ``groups (B, N0)`` (original token
    -> slot; ``None`` when nobody asked)."""

    x: torch.Tensor
    packing: Packing
    lengths: torch.Tensor
    sizes: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    # threshold merges read their new lengths ``lag`` blocks later (None: at once, with a
    # sync; :mod:`dymu.engine.deferred`), and the reads on their way
    lag: int | None = None
    pending: tuple[PendingLengths, ...] = ()
    gaps: bool = False  # groups hold -1 (padded input patches)
    fuse: bool = False  # merges run the compiled steps (:mod:`.fused`) where they can


def run_block(
    tower: TowerAdapter,
    block: int,
    tokens: Tokens,
    merging: Merging | None,
    prop_attn: bool = True,
    attention: str = "auto",
) -> Tokens:
    """Attention (with ``log(size)`` bias when ``prop_attn``; ``attention`` picks how images
    of different lengths attend, :mod:`dymu.engine.attention`), the merge, the MLP."""
    tokens = catch_up(tokens, block)
    x, packing, prefix = tokens.x, tokens.packing, tower.num_prefix_tokens
    heads = tower.num_heads
    q, k, v = tower.qkv(block, x)
    merges = merging is not None and packing.width - prefix >= 2
    fused = merges and _fusable(tokens, merging)
    log_sizes = None if tokens.sizes is None else tokens.sizes.log()  # dead rows: -inf
    padded_log = None  # the padded view (uniform: a reshape), for the padded attention and merge
    if log_sizes is not None:
        eager_merge = merges and not fused
        if eager_merge or (not packing.uniform and way(attention, x.device.type) == "padded"):
            padded_log = packing.pad(log_sizes, NEG_INF)
    if not prop_attn and log_sizes is not None:  # only dead rows masked
        log_sizes = log_sizes.clamp(max=0.0)
        padded_log = None if padded_log is None else padded_log.clamp(max=0.0)
    out = attend(q, k, v, heads, packing, log_sizes, attention, padded_log)
    tokens = replace(tokens, x=x + tower.attn_out(block, out))
    if fused:
        tokens = catch_up(_merge_fused(tokens, k, merging, prefix, heads, block), block)
    elif merges:
        metric = k.unflatten(-1, (heads, -1)).mean(1, dtype=torch.float32)
        tokens = catch_up(_merge(tokens, metric, padded_log, merging, prefix, block), block)
    return replace(tokens, x=tokens.x + tower.mlp(block, tokens.x))


def _fusable(tokens: Tokens, merging: Merging) -> bool:
    """Whether this merge runs a compiled step (asked for): a deferred threshold merge, or a
    fixed-r merge of images of one length."""
    if not tokens.fuse:
        return False
    if merging.fixed_r is not None:
        return tokens.packing.uniform
    return tokens.lag is not None and merging.tau is not None


def _merge_fused(
    tokens: Tokens, keys: torch.Tensor, merging: Merging, prefix: int, heads: int, block: int
) -> Tokens:
    """The merge as one compiled step (:mod:`.fused`)."""
    packing = tokens.packing
    bsz, width = len(packing.lengths), packing.width
    config = StepConfig(prefix, merging.reorder_all, tokens.gaps)
    keys = keys.view(keys.shape[0], 1, heads, -1)  # one row per token
    state = (tokens.x, tokens.sizes, keys, tokens.groups, tokens.lengths)
    if merging.fixed_r is not None:
        r = min(merging.fixed_r, (width - prefix) // 2)  # the cap counts mergeable tokens
        x, sizes, lengths, groups, _ = steps_for(config, width).fixed(*state, bsz, width, r, config)
        after = Packing.from_lengths([width - r] * bsz, x.device)
        return replace(tokens, x=x, packing=after, lengths=lengths, sizes=sizes, groups=groups)
    tau = threshold_tensor(merging.tau, tokens.x.device)
    index = (None, None) if packing.uniform else (packing.batch, packing.pos)
    step = steps_for(config, width).threshold
    x, sizes, lengths, groups, _ = step(*state, tau, *index, bsz, width, config)
    pending = (*tokens.pending, PendingLengths.start(lengths, block))
    return replace(tokens, x=x, sizes=sizes, lengths=lengths, groups=groups, pending=pending)


def catch_up(tokens: Tokens, block: int | None = None) -> Tokens:
    """Compact to the newest lengths read at least ``lag`` blocks ago (all of them when
    ``block`` is None: the end of the forward, its one wait)."""
    due = [p for p in tokens.pending if block is None or block - p.block >= tokens.lag]
    if not due:
        return tokens
    x, sizes, packing = compact(tokens.x, tokens.sizes, tokens.packing, due[-1].wait())
    rest = tokens.pending[len(due) :]
    return replace(tokens, x=x, sizes=sizes, packing=packing, pending=rest)


def _merge(
    tokens: Tokens,
    metric: torch.Tensor,
    padded_log: torch.Tensor | None,
    merging: Merging,
    prefix: int,
    block: int,
) -> Tokens:
    """One merge on the padded view: match, decide, merge, lay out; then pack again (at the
    new lengths, or, deferred, at the old ones with dead rows)."""
    packing, bsz = tokens.packing, len(tokens.packing.lengths)
    sides = Sides(packing.width, prefix)
    sizes = tokens.sizes
    if sizes is None and not packing.uniform:  # padding must read as dead: sizes 1, then 0
        sizes = metric.new_ones(metric.shape[0])
        padded_log = packing.pad(sizes.log(), NEG_INF)
    bias = None if padded_log is None else padded_log.clamp(max=0.0)
    xs = packing.pad(with_sizes(tokens.x, sizes))  # padding: size 0
    node_max, node_idx = match(packing.pad(metric), bias, sides)
    if merging.fixed_r is not None:
        if not packing.uniform:
            raise DyMUError("fixed-r merging needs every image of a batch at one length")
        r = min(merging.fixed_r, (packing.width - prefix) // 2)  # the cap counts mergeable tokens
        out, order, merged = merge_fixed_r(xs, node_max, node_idx, r, sides)
        lengths, host = tokens.lengths - r, [packing.width - r] * bsz
    else:
        merged = merging.rule(node_max, tokens.lengths, packing.width)
        order = order_keys(merged, bias, sides, merging.reorder_all).sort(dim=1, stable=True)[1]
        add_merged(xs, merged, node_idx, sides)
        lengths, host = tokens.lengths - merged.sum(-1), None
    groups = tokens.groups
    if groups is not None:
        dest = destinations(order, packing.width, merged, node_idx, sides)
        groups = track(groups, dest, tokens.gaps)
    if host is None and tokens.lag is not None:  # deferred: same segments, dead rows after
        pending = (*tokens.pending, PendingLengths.start(lengths, block))
        x, sizes = split_sizes(lay_out(xs, order, packing), tokens.x.dtype)
        return replace(tokens, x=x, sizes=sizes, lengths=lengths, groups=groups, pending=pending)
    if host is None:
        host = lengths.tolist()  # the one host read of a synchronous merge
        if tuple(host) == packing.lengths and not merging.reorder_all:
            return tokens  # nothing merged, nothing moved
    after = Packing.from_lengths(host, xs.device)
    fixed = merging.fixed_r is not None
    laid = after.pack(out[:, : after.width]) if fixed else lay_out(xs, order, after)
    x, sizes = split_sizes(laid, tokens.x.dtype)
    return replace(tokens, x=x, packing=after, lengths=lengths, sizes=sizes, groups=groups)


def threshold_merging(
    thresholds: Thresholds, r: Sequence[int], reorder_all: bool
) -> list[Merging | None]:
    """Per block, the inference rule of ``thresholds`` (``None`` where the block never
    merges). Scores and thresholds are compared in float32 whatever the tower's precision."""
    out: list[Merging | None] = []
    for r_l, tau in zip(r, thresholds.merging_blocks(), strict=False):
        if r_l > 0 and tau is not None:
            tau = float(torch.tensor(tau, dtype=torch.float32))
            rule = lambda m, lengths, n, tau=tau: threshold_rule(m, tau)  # noqa: E731
            out.append(Merging(rule, reorder_all, tau=tau))
        else:
            out.append(None)
    return out


class BatchThresholds:
    """The batch rule in every block of one calibration batch, and what it found: per block
    the threshold and whether the block merged at all (too few tokens: it records nothing).
    Counted and kept on the device (:func:`.merge.batch_merges`), so a merge's lengths may
    be read blocks later."""

    def __init__(self, r: Sequence[int], prefix: int, reorder_all: bool) -> None:
        self.found: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(r)
        self.merging = [self._merging(b, v, prefix, reorder_all) if v > 0 else None
                        for b, v in enumerate(r)]  # fmt: skip

    def _merging(self, block: int, r: int, prefix: int, reorder_all: bool) -> Merging:
        def rule(node_max: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
            merges, last = batch_merges(lengths, r, prefix)
            merged, threshold = batch_rule(node_max, merges, last)
            self.found[block] = (threshold, merges > 0)
            return merged

        return Merging(rule, reorder_all)

    def results(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Every block's threshold ``(L,)`` float64 (0 where none) and whether it has one."""
        zero = torch.zeros((), device=device, dtype=torch.float64)
        no = torch.zeros((), device=device, dtype=torch.bool)
        found = [f if f is not None else (zero, no) for f in self.found]
        used = torch.stack([flag for _, flag in found])
        values = torch.stack([t.double() for t, _ in found])
        return torch.where(used, values, zero), used
