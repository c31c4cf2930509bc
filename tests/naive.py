"""A deliberately naive DyMU (DESIGN section 3), one image at a time with Python lists.

Independent of ``dymu.merge``: vanilla ``nn.MultiheadAttention`` with a float mask for
proportional attention, a separate key projection for the metric, loops for matching and
merging. Used only as the reference the fast implementation must agree with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _keys(blk, h: torch.Tensor) -> torch.Tensor:
    d = h.shape[-1]
    w = blk.attn.in_proj_weight[d : 2 * d]
    b = blk.attn.in_proj_bias[d : 2 * d]
    k = h @ w.T + b
    heads = blk.attn.num_heads
    return k.view(k.shape[0], heads, d // heads).mean(1)


def _attention(blk, x: torch.Tensor, sizes: list[float]) -> torch.Tensor:
    h = blk.ln_1(x)[None]
    mask = torch.tensor([math.log(s) for s in sizes]).expand(len(sizes), len(sizes))
    return blk.ls_1(blk.attn(h, h, h, need_weights=False, attn_mask=mask)[0][0])


def _best_partners(blk, x_after_norm: torch.Tensor, cls: bool) -> list[tuple[float, int]]:
    k = F.normalize(_keys(blk, x_after_norm), dim=-1)
    a, b = k[0::2], k[1::2]
    out = []
    for i in range(a.shape[0]):
        if cls and i == 0:
            out.append((-math.inf, 0))
            continue
        s = [float(a[i] @ b[j]) for j in range(b.shape[0])]
        j = max(range(len(s)), key=lambda t: s[t])  # first maximum
        out.append((s[j], j))
    return out


def _merge(x, sizes, groups, merged: dict[int, int]):
    """merged: A index -> B index. Returns new (x, sizes, groups) in [unmerged A, B] order."""
    n = x.shape[0]
    a_pos = list(range(0, n, 2))
    b_pos = list(range(1, n, 2))
    keep_a = [i for i in range(len(a_pos)) if i not in merged]
    new_x, new_s = [], []
    slot_of = {}
    for i in keep_a:
        slot_of[a_pos[i]] = len(new_x)
        new_x.append(x[a_pos[i]] * sizes[a_pos[i]])
        new_s.append(sizes[a_pos[i]])
    for p in b_pos:
        slot_of[p] = len(new_x)
        new_x.append(x[p] * sizes[p])
        new_s.append(sizes[p])
    for i, j in merged.items():
        slot = slot_of[b_pos[j]]
        new_x[slot] = new_x[slot] + x[a_pos[i]] * sizes[a_pos[i]]
        new_s[slot] += sizes[a_pos[i]]
        slot_of[a_pos[i]] = slot
    out = torch.stack([v / s for v, s in zip(new_x, new_s, strict=True)])
    return out, new_s, [slot_of[g] for g in groups]


def naive_encode(visual, pixels: torch.Tensor, r: list[int], taus: list[float] | None):
    """Returns per-image final tokens, sizes, groups and (when calibrating) batch thresholds.

    ``taus`` given: inference rule per image. ``taus`` None: calibration over the batch.
    """
    xs = list(visual._embeds(pixels).float())
    n0 = xs[0].shape[0]
    sizes = [[1.0] * n0 for _ in xs]
    groups = [list(range(n0)) for _ in xs]
    found = []
    for layer, blk in enumerate(visual.transformer.resblocks):
        cand = []
        for b in range(len(xs)):
            h = blk.ln_1(xs[b])
            xs[b] = xs[b] + _attention(blk, xs[b], sizes[b])
            cand.append(_best_partners(blk, h, cls=True))
        if r[layer] > 0:
            merges = [dict() for _ in xs]
            if taus is not None:
                if taus[layer] < 1:
                    for b, c in enumerate(cand):
                        merges[b] = {i: j for i, (s, j) in enumerate(c) if s > taus[layer]}
            else:
                n = max(x.shape[0] for x in xs)
                na = (n + 1) // 2
                flat = []
                for b, c in enumerate(cand):
                    padded = c + [(-math.inf, 0)] * (na - len(c))
                    flat += [(s, j, b, i) for i, (s, j) in enumerate(padded)]
                order = sorted(range(len(flat)), key=lambda t: -flat[t][0])  # stable
                rr = len(xs) * min(r[layer], (n - 1) // 2)
                for t in order[:rr]:
                    s, j, b, i = flat[t]
                    if s > -math.inf:
                        merges[b][i] = j
                if rr > 0:  # too few tokens to merge: the block records nothing, reorders nothing
                    rank = min(rr, len(flat) - 1)
                    found.append(max(flat[order[rank]][0], 0.0))
            for b in range(len(xs)):
                if merges[b] or (taus is None and rr > 0):
                    xs[b], sizes[b], groups[b] = _merge(xs[b], sizes[b], groups[b], merges[b])
        for b in range(len(xs)):
            xs[b] = xs[b] + blk.ls_2(blk.mlp(blk.ln_2(xs[b])))
    return xs, sizes, groups, found
