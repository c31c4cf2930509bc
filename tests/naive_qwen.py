"""DyMU in a Qwen2-VL / Qwen2.5-VL vision tower the slow way: one frame, one window, one
unit at a time, with Python lists (the README's Qwen section and ``dymu.encoder.qwen``'s
rules: whole 2x2 units merge inside windows, a merged unit keeps its destination's rotary
position, ``log(size)`` on every patch of a merged unit).

Independent of dymu: windows, rotary angles and attention are derived here from the config
and the tower's weights, not from dymu's adapter or transformers' helpers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Unit:
    def __init__(self, x, cos, sin, member):
        self.x, self.cos, self.sin = x, cos, sin  # (4, D), (4, hd), (4, hd)
        self.size = 1.0
        self.members = [member]  # raster unit ids within the frame
        self.own = {member: (cos, sin)}  # every member's own rotary position


def _rotate(t, cos, sin):  # t (n, hd)
    half = t.shape[-1] // 2
    turned = torch.cat([-t[..., half:], t[..., :half]], -1)
    return t * cos + turned * sin


def _frames(visual, pixels, grid):
    """Per frame: its windows, each a list of :class:`Unit` in window order."""
    cfg = visual.config
    m, patch = cfg.spatial_merge_size, cfg.patch_size
    side = (getattr(cfg, "window_size", None) or 4 * m * patch) // m // patch  # 4x4 units
    x = visual.patch_embed(pixels).float()
    inv_freq = visual.rotary_pos_emb.inv_freq.float()
    frames, row = [], 0
    for t, h, w in grid.tolist():
        learned = _learned(visual, h, w)
        for _ in range(t):
            uh, uw = h // m, w // m
            units = []
            for u in range(uh * uw):
                ur, uc = divmod(u, uw)
                if learned is not None:  # Qwen3-VL: the table resampled, added per patch
                    for i in range(m * m):
                        x[row + i] = x[row + i] + learned[ur * m + i // m, uc * m + i % m]
                ph = torch.tensor([ur * m + i // m for i in range(m * m)]).float()
                pw = torch.tensor([uc * m + i % m for i in range(m * m)]).float()
                angles = torch.cat([ph[:, None] * inv_freq, pw[:, None] * inv_freq], -1)
                angles = torch.cat([angles, angles], -1)
                units.append(Unit(x[row : row + m * m], angles.cos(), angles.sin(), u))
                row += m * m
            windows = []
            for wr in range(math.ceil(uh / side)):
                for wc in range(math.ceil(uw / side)):
                    members = [
                        r * uw + c
                        for r in range(wr * side, min((wr + 1) * side, uh))
                        for c in range(wc * side, min((wc + 1) * side, uw))
                    ]
                    windows.append([units[u] for u in members])
            frames.append(windows)
    return frames


def _learned(visual, h, w):
    """Qwen3-VL's learned position table bilinearly resampled (corners aligned) to
    ``(h, w, D)``; ``None`` for towers without one."""
    table = getattr(visual, "pos_embed", None)
    if table is None:
        return None
    side = int(table.weight.shape[0] ** 0.5)
    grid = table.weight.float().T.reshape(1, -1, side, side)
    out = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)
    return out[0].permute(1, 2, 0)


def _tokens(head, windows):
    """One frame's tokens through a patch merger, in window order, and every raster unit's
    token."""
    units = [u for w in windows for u in w]
    tokens = head(torch.cat([u.x for u in units]))
    groups = {m: slot for slot, u in enumerate(units) for m in u.members}
    return tokens, [groups[m] for m in range(len(groups))]


def _attend(blk, heads, units, unmerge=False):
    """Attention over these units' patches, ``log(size)`` on every key; returns per unit.
    ``unmerge``: every unit repeated over its members at their own positions, no bias, and
    each unit's outputs averaged over its members."""
    if unmerge:
        rows = [(u, m) for u in units for m in u.members]
        copies = [Unit(u.x, *u.own[m], m) for u, m in rows]
        outs = _attend(blk, heads, copies)
        result = []
        for u in units:
            mine = [o for (owner, _), o in zip(rows, outs, strict=True) if owner is u]
            result.append(torch.stack(mine).mean(0))
        return result
    d = units[0].x.shape[-1]
    hd = d // heads
    x = torch.cat([u.x for u in units])
    cos, sin = torch.cat([u.cos for u in units]), torch.cat([u.sin for u in units])
    bias = torch.tensor([math.log(u.size) for u in units for _ in range(u.x.shape[0])])
    qkv = blk.attn.qkv(blk.norm1(x))
    q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
    parts = []
    for i in range(heads):
        cols = slice(i * hd, (i + 1) * hd)
        qi, ki = _rotate(q[:, cols], cos, sin), _rotate(k[:, cols], cos, sin)
        logits = qi @ ki.T / math.sqrt(hd) + bias
        parts.append(torch.softmax(logits, -1) @ v[:, cols])
    out = blk.attn.proj(torch.cat(parts, -1))
    return list(out.split([u.x.shape[0] for u in units]))


def _metric(blk, heads, unit):
    d = unit.x.shape[-1]
    k = blk.attn.qkv(blk.norm1(unit.x))[:, d : 2 * d]
    return k.view(k.shape[0], heads, -1).mean(1).flatten()


def _merge_window(window, keys, tau):
    """Section 3's threshold merge on one window's units (``keys``: each unit's metric from
    the block's input); returns the window's new unit list."""
    metrics = [F.normalize(keys[id(u)], dim=0) for u in window]
    a_pos, b_pos = list(range(0, len(window), 2)), list(range(1, len(window), 2))
    merges = {}
    for i in a_pos:
        if not b_pos:
            break
        scores = [float(metrics[i] @ metrics[j]) for j in b_pos]
        best = max(range(len(b_pos)), key=lambda t: scores[t])  # first maximum
        if scores[best] > tau:
            merges[i] = b_pos[best]
    if not merges:
        return window
    for i, j in merges.items():
        a, b = window[i], window[j]
        b.x = (b.x * b.size + a.x * a.size) / (b.size + a.size)
        b.size += a.size
        b.members += a.members
        b.own.update(a.own)
    return [window[i] for i in a_pos if i not in merges] + [window[j] for j in b_pos]


def naive_qwen(visual, pixels, grid, taus, unmerge=False):
    """Per frame: merged tokens ``(L, out)`` in window order and the token of every raster
    unit. ``taus``: per block, a threshold or ``None`` (no merging); ``unmerge``: attention
    with merged units unmerged to their members' own positions. Qwen3-VL: also the same per
    DeepStack block, as ``naive_qwen.deepstack`` (a list per DeepStack block)."""
    heads = visual.config.num_heads
    full = getattr(visual.config, "fullatt_block_indexes", None)
    frames = _frames(visual, pixels, grid)
    deepstack = []
    with torch.no_grad():
        for b, blk in enumerate(visual.blocks):
            windowed = full is not None and b not in full
            for windows in frames:
                keys = {id(u): _metric(blk, heads, u) for w in windows for u in w}
                spans = windows if windowed else [[u for w in windows for u in w]]
                for span in spans:
                    for u, out in zip(span, _attend(blk, heads, span, unmerge), strict=True):
                        u.x = u.x + out
                if taus[b] is not None:
                    windows[:] = [_merge_window(w, keys, taus[b]) for w in windows]
                for u in (u for w in windows for u in w):
                    u.x = u.x + blk.mlp(blk.norm2(u.x))
            stacked = list(getattr(visual, "deepstack_visual_indexes", ()))
            if b in stacked:
                head = visual.deepstack_merger_list[stacked.index(b)]
                deepstack.append([_tokens(head, windows) for windows in frames])
        results = [_tokens(visual.merger, windows) for windows in frames]
    return results, deepstack
