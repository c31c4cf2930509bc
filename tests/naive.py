"""A deliberately naive DyMU (DESIGN sections 3 and 8), one image at a time with Python lists.

Independent of ``dymu.engine.merge`` and the adapters: attention written out head by head (or
vanilla ``nn.MultiheadAttention`` with a float mask) for proportional attention, a separate
key projection for the metric, loops for matching and merging. Used only as the reference the
fast implementation must agree with. Two towers: open_clip's CLIP ViT (a class token) and
transformers' SigLIP (no prefix tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class OpenCLIPNaive:
    """open_clip ``VisionTransformer``: class token first, ``nn.MultiheadAttention`` blocks."""

    prefix = 1

    def __init__(self, visual) -> None:
        self.visual = visual
        self.layers = list(visual.transformer.resblocks)

    def embed(self, pixels):
        return list(self.visual._embeds(pixels).float())

    def keys(self, blk, x: torch.Tensor) -> torch.Tensor:
        h = blk.ln_1(x)
        d = h.shape[-1]
        k = h @ blk.attn.in_proj_weight[d : 2 * d].T + blk.attn.in_proj_bias[d : 2 * d]
        heads = blk.attn.num_heads
        return k.view(k.shape[0], heads, d // heads).mean(1)

    def attention(self, blk, x: torch.Tensor, sizes: list[float]) -> torch.Tensor:
        h = blk.ln_1(x)[None]
        mask = torch.tensor([math.log(s) for s in sizes]).expand(len(sizes), len(sizes))
        return blk.ls_1(blk.attn(h, h, h, need_weights=False, attn_mask=mask)[0][0])

    def mlp(self, blk, x: torch.Tensor) -> torch.Tensor:
        return blk.ls_2(blk.mlp(blk.ln_2(x)))


class SiglipNaive:
    """transformers ``SiglipVisionModel``: no prefix tokens, q/k/v projections per layer."""

    prefix = 0

    def __init__(self, model) -> None:
        self.model = model
        self.layers = list(model.encoder.layers)
        self.heads = model.config.num_attention_heads

    def embed(self, pixels):
        return list(self.model.embeddings(pixels).float())

    def keys(self, layer, x: torch.Tensor) -> torch.Tensor:
        k = layer.self_attn.k_proj(layer.layer_norm1(x))
        return k.view(k.shape[0], self.heads, -1).mean(1)

    def attention(self, layer, x: torch.Tensor, sizes: list[float]) -> torch.Tensor:
        attn, h = layer.self_attn, layer.layer_norm1(x)
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        step = q.shape[-1] // self.heads
        bias = torch.tensor([math.log(s) for s in sizes])
        parts = []
        for i in range(self.heads):
            cols = slice(i * step, (i + 1) * step)
            logits = q[:, cols] @ k[:, cols].T / math.sqrt(step) + bias
            parts.append(torch.softmax(logits, -1) @ v[:, cols])
        return attn.out_proj(torch.cat(parts, -1))

    def mlp(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.mlp(layer.layer_norm2(x))


def _best_partners(keys: torch.Tensor, prefix: int) -> list[tuple[float, int]]:
    """Per A token (even position): best B partner (odd position) and its cosine; prefix
    tokens are never sources (A) nor destinations (B)."""
    k = F.normalize(keys, dim=-1)
    a, b = k[0::2], k[1::2]
    out = []
    for i in range(a.shape[0]):
        candidates = [j for j in range(b.shape[0]) if 2 * j + 1 >= prefix]
        if 2 * i < prefix or not candidates:
            out.append((-math.inf, 0))
            continue
        s = {j: float(a[i] @ b[j]) for j in candidates}
        j = max(candidates, key=lambda t: s[t])  # first maximum
        out.append((s[j], j))
    return out


def _merge(x, sizes, groups, merged: dict[int, int], prefix: int):
    """merged: A index -> B index. Returns new (x, sizes, groups) in
    [prefix, unmerged A, B] order."""
    n = x.shape[0]
    a_pos = [p for p in range(0, n, 2) if p >= prefix]
    b_pos = [p for p in range(1, n, 2) if p >= prefix]
    new_x, new_s, slot_of = [], [], {}
    for p in range(prefix):
        slot_of[p] = len(new_x)
        new_x.append(x[p] * sizes[p])
        new_s.append(sizes[p])
    keep_a = [p for p in a_pos if p // 2 not in merged]
    for p in keep_a + b_pos:
        slot_of[p] = len(new_x)
        new_x.append(x[p] * sizes[p])
        new_s.append(sizes[p])
    for i, j in merged.items():
        src, dst = 2 * i, 2 * j + 1
        slot = slot_of[dst]
        new_x[slot] = new_x[slot] + x[src] * sizes[src]
        new_s[slot] += sizes[src]
        slot_of[src] = slot
    out = torch.stack([v / s for v, s in zip(new_x, new_s, strict=True)])
    return out, new_s, [slot_of[g] for g in groups]


def naive_encode(visual, pixels: torch.Tensor, r: list[int], taus: list[float] | None):
    """An open_clip CLIP tower; see :func:`naive_run`."""
    return naive_run(OpenCLIPNaive(visual), pixels, r, taus)


def naive_run(tower, pixels: torch.Tensor, r: list[int], taus: list[float] | None):
    """Returns per-image final tokens, sizes, groups and (when calibrating) batch thresholds.

    ``taus`` given: inference rule per image. ``taus`` None: calibration over the batch.
    """
    xs = tower.embed(pixels)
    p = tower.prefix
    n0 = xs[0].shape[0]
    sizes = [[1.0] * n0 for _ in xs]
    groups = [list(range(n0)) for _ in xs]
    found = []
    for layer, blk in enumerate(tower.layers):
        cand = []
        for b in range(len(xs)):
            cand.append(_best_partners(tower.keys(blk, xs[b]), p))
            xs[b] = xs[b] + tower.attention(blk, xs[b], sizes[b])
        reorder = False  # every image reordered, merges or not
        if r[layer] > 0:
            merges = [dict() for _ in xs]
            if taus is not None:
                if taus[layer] < 1:
                    for b, c in enumerate(cand):
                        merges[b] = {i: j for i, (s, j) in enumerate(c) if s > taus[layer]}
                    reorder = p == 0  # towers without prefix tokens: the batch path's order
            else:
                n = max(x.shape[0] for x in xs)
                na = (n + 1) // 2
                flat = []
                for b, c in enumerate(cand):
                    padded = c + [(-math.inf, 0)] * (na - len(c))
                    flat += [(s, j, b, i) for i, (s, j) in enumerate(padded)]
                order = sorted(range(len(flat)), key=lambda t: -flat[t][0])  # stable
                rr = len(xs) * min(r[layer], (n - p) // 2)
                for t in order[:rr]:
                    s, j, b, i = flat[t]
                    if s > -math.inf:
                        merges[b][i] = j
                if rr > 0:  # too few tokens to merge: the block records nothing, reorders nothing
                    rank = min(rr, len(flat) - 1)
                    found.append(max(flat[order[rank]][0], 0.0))
                    reorder = True
            for b in range(len(xs)):
                if merges[b] or reorder:
                    xs[b], sizes[b], groups[b] = _merge(xs[b], sizes[b], groups[b], merges[b], p)
        for b in range(len(xs)):
            xs[b] = xs[b] + tower.mlp(blk, xs[b])
    return xs, sizes, groups, found
