"""ToMe spelled out with loops, one image at a time: the independent reference for
``dymu.apply_tome`` (DESIGN 10).

Per block: attention with ``log(size)`` added to every key's logits, head by head; the keys
averaged over heads and L2-normalised; the bipartite split (A = even positions, B = odd),
every A token's best B partner; the ``r`` best A tokens (descending score, lower index first
on ties) merge into their partners as size-weighted means; the new order is prefix tokens,
unmerged A tokens (by position with prefix tokens, by score without), B tokens. A block
is read through ``Parts``: the library's own modules, named in the test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Parts:
    """One block of a library, as the four pieces ToMe needs."""

    qkv: Callable  # x -> (q, k, v), pre-norm and in-projection included
    out: Callable  # attention result -> branch output (projection, layer scale)
    mlp: Callable  # x -> MLP branch output (norm, MLP, layer scale)


def timm_parts(block) -> Parts:
    return Parts(
        qkv=lambda x: block.attn.qkv(block.norm1(x)).chunk(3, -1),
        out=lambda o: block.ls1(block.attn.proj(o)),
        mlp=lambda x: block.ls2(block.mlp(block.norm2(x))),
    )


def hf_vit_parts(layer) -> Parts:
    def qkv(x):
        h = layer.layernorm_before(x)
        attn = layer.attention
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)

    return Parts(
        qkv=qkv,
        out=lambda o: layer.attention.o_proj(o),
        mlp=lambda x: layer.mlp(layer.layernorm_after(x)),
    )


def open_clip_parts(block) -> Parts:
    def qkv(x):
        h = block.ln_1(x)
        return (h @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).chunk(3, -1)

    return Parts(
        qkv=qkv,
        out=lambda o: block.ls_1(block.attn.out_proj(o)),
        mlp=lambda x: block.ls_2(block.mlp(block.ln_2(x))),
    )


def attention(q, k, v, heads: int, sizes: list[float] | None) -> torch.Tensor:
    """Softmax attention head by head, ``log(size)`` of each key added to its logits."""
    n, dim = q.shape
    dh = dim // heads
    out = torch.zeros_like(q)
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        logits = q[:, cols] @ k[:, cols].T / math.sqrt(dh)
        if sizes is not None:
            logits = logits + torch.tensor(sizes, dtype=q.dtype).log()[None, :]
        out[:, cols] = logits.softmax(-1) @ v[:, cols]
    return out


def merge_step(x, k, sizes, r: int, heads: int, prefix: int):
    """One ToMe merge of ``r`` tokens; returns the new tokens, sizes and each old token's
    new slot."""
    n = x.shape[0]
    metric = k.reshape(n, heads, -1).mean(1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a_pos = [i for i in range(0, n, 2) if i >= prefix]
    b_pos = [j for j in range(1, n, 2) if j >= prefix]
    best = {}
    for i in a_pos:
        scores = [(float(metric[i] @ metric[j]), j) for j in b_pos]
        best[i] = max(scores, key=lambda s: s[0])  # the first of equal maxima
    ranked = sorted(a_pos, key=lambda i: (-best[i][0], i))
    merged = set(ranked[:r])
    kept = [i for i in (a_pos if prefix else ranked) if i not in merged]
    order = list(range(prefix)) + kept + b_pos
    slot = {pos: s for s, pos in enumerate(order)}
    for i in merged:
        slot[i] = slot[best[i][1]]
    new_x = torch.zeros(len(order), x.shape[1], dtype=torch.float64)
    new_sizes = [0.0] * len(order)
    for pos in range(n):
        new_x[slot[pos]] += sizes[pos] * x[pos].double()
        new_sizes[slot[pos]] += sizes[pos]
    new_x = new_x / torch.tensor(new_sizes, dtype=torch.float64)[:, None]
    return new_x.to(x.dtype), new_sizes, [slot[p] for p in range(n)]


def naive_tome(
    tokens: torch.Tensor,
    blocks: list[Parts],
    r: list[int],
    heads: int,
    prefix: int,
    prop_attn: bool = True,
):
    """``tokens (N, D)`` (one image, embedded) through the blocks with ToMe; returns the final
    tokens, their sizes, the length after every block and every original token's slot."""
    x, sizes, lengths = tokens, [1.0] * tokens.shape[0], []
    slots = list(range(tokens.shape[0]))
    merged_yet = False
    for parts, r_l in zip(blocks, r, strict=True):
        q, k, v = parts.qkv(x)
        x = x + parts.out(attention(q, k, v, heads, sizes if merged_yet and prop_attn else None))
        r_l = min(r_l, (x.shape[0] - prefix) // 2)
        if r_l > 0:
            x, sizes, moved = merge_step(x, k, sizes, r_l, heads, prefix)
            slots = [moved[s] for s in slots]
            merged_yet = True
        x = x + parts.mlp(x)
        lengths.append(x.shape[0])
    return x, sizes, lengths, slots
