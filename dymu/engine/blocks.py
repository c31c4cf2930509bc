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
from .attention import attend
from .deferred import PendingLengths, compact
from .merge import Packing, bipartite_scores, fixed_r_rule, plan_merge, threshold_rule

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
    heads, dim = tower.num_heads, x.shape[-1]
    q, k, v = tower.qkv(block, x)
    bias_sizes = tokens.sizes if prop_attn else None
    x = x + tower.attn_out(block, attend(q, k, v, heads, packing, bias_sizes, attention))
    tokens = replace(tokens, x=x)
    if merging is not None and packing.width - prefix >= 2:
        metric = packing.pad(k.reshape(-1, heads, dim // heads).mean(dim=1))
        tokens = catch_up(_merge(tokens, metric, merging, prefix, block), block)
    return replace(tokens, x=tokens.x + tower.mlp(block, tokens.x))


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
    tokens: Tokens, metric: torch.Tensor, merging: Merging, prefix: int, block: int
) -> Tokens:
    packing, lengths = tokens.packing, tokens.lengths
    n = packing.width
    node_max, node_idx = bipartite_scores(metric, lengths, prefix)
    order, new_length = None, None
    deferred = tokens.lag is not None and merging.fixed_r is None
    if merging.fixed_r is not None:
        if not packing.uniform:
            raise DyMUError("fixed-r merging needs every image of a batch at one length")
        r = min(merging.fixed_r, (n - prefix) // 2)  # the cap counts mergeable tokens
        merged, by_score = fixed_r_rule(node_max, r)
        order, new_length = (by_score if prefix == 0 else None), n - r
    else:
        merged = merging.rule(node_max, lengths, n)
    reorder = merging.reorder_all or merging.fixed_r is not None
    bound = packing.lengths if deferred else None
    plan = plan_merge(merged, node_idx, lengths, n, prefix, reorder, order, new_length, bound)
    if plan is None:
        return tokens
    groups = plan.track(tokens.groups) if tokens.groups is not None else None
    if deferred:  # the same segments, dead rows after each image's tokens; lengths follow
        x, sizes = plan.merge(tokens.x, tokens.sizes, packing, packing, dead_rows=True)
        pending = (*tokens.pending, PendingLengths.start(plan.lengths, block))
        return replace(tokens, x=x, lengths=plan.lengths, sizes=sizes, groups=groups,
                       pending=pending)  # fmt: skip
    after = Packing.from_lengths(list(plan.host_lengths), tokens.x.device)
    x, sizes = plan.merge(tokens.x, tokens.sizes, packing, after)
    return replace(tokens, x=x, packing=after, lengths=plan.lengths, sizes=sizes, groups=groups)


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
            out.append(Merging(rule, reorder_all))
        else:
            out.append(None)
    return out
