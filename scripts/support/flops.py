"""FLOP counts behind every benchmark's FLOP bound (vanilla FLOPs / dymu FLOPs).

In one place so every script counts the same way, and so ``tests/test_flops.py`` can hold
each formula against torch's own counter (``torch.utils.flop_counter.FlopCounterMode``) on
the unmodified models. A FLOP is a multiply or an add: a product of (n, k) by (k, m) is
``2nkm``. Only matrix products are counted (linear layers, convolutions, attention);
norms, activations, softmax, rotary embeddings and dymu's own bookkeeping (merge scores,
gathers) are not, so a bound says what the saved products alone would give.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace


def vit_dims(tower) -> tuple[int, int, int, float]:
    """(width D, MLP width, tokens entering block 0, patch-embedding FLOPs per image) of a
    dymu tower adapter (``dymu.build_encoder(model).tower``)."""
    patch = 2 * tower.num_patches * 3 * tower.patch_size**2 * tower.width
    return tower.width, tower.mlp_width, tower.num_tokens, patch


def vit_block(
    n_attn: float, n_mlp: float, dim: int, mlp_width: int, attention: bool = True
) -> float:
    """One ViT block: qkv ``2nD*3D`` and the out projection ``2nD^2`` at the ``n`` tokens
    attention sees, attention ``4n^2D`` (scores and weighted sum, no mask; left out with
    ``attention=False``), and the MLP ``4nD*mlp`` at the ``n`` tokens left after the block's
    merge."""
    qkv = 2 * n_attn * dim * 3 * dim
    out = 2 * n_attn * dim * dim
    attn = 2 * 2 * n_attn * n_attn * dim if attention else 0
    mlp = 2 * 2 * n_mlp * dim * mlp_width
    return qkv + out + attn + mlp


def vit_image(
    counts: Sequence[float], n0: int, dim: int, mlp_width: int, patch: float,
    attention: bool = True,
) -> float:  # fmt: skip
    """One image through a ViT whose token count after block ``l`` is ``counts[l]``: the
    patch embedding, then each block at the count it starts with and ends with."""
    total = float(patch)
    n_in = n0
    for n_out in counts:
        total += vit_block(n_in, n_out, dim, mlp_width, attention)
        n_in = n_out
    return total


def lm_shape(text_config) -> SimpleNamespace:
    """What :func:`lm` needs of a transformers text config (the head for the last position
    only, as ``logits_to_keep=1`` asks)."""
    c = text_config
    return SimpleNamespace(
        hidden=c.hidden_size, intermediate=c.intermediate_size, vocab=c.vocab_size,
        heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
        layers=c.num_hidden_layers, last_logits=True,
    )  # fmt: skip


def lm(shape, n_attn: float, n_lin: float, n_full: float) -> float:
    """A decoder LM's prefill (gated MLP, grouped-query attention): projections and MLP at
    ``n_lin`` rows (VTU: the M slots), causal attention at ``n_attn`` positions (half the
    ``4N^2D`` of full attention), the head at the last position or at all ``n_full``."""
    d, i, v = shape.hidden, shape.intermediate, shape.vocab
    d_kv = shape.kv_heads * (d // shape.heads)
    proj = 2 * n_lin * d * (2 * d + 2 * d_kv)  # q and o at D, k and v at the kv width
    mlp = 3 * 2 * n_lin * d * i  # gate, up, down
    attn = 2 * n_attn * n_attn * d  # causal: (2N^2D scores + 2N^2D weighted sum) / 2
    head = 2 * (1 if shape.last_logits else n_full) * d * v
    return shape.layers * (proj + mlp + attn) + head


def qwen_windows(vision_config, grid: tuple[int, int, int]) -> list[int]:
    """Units (2x2 patches) per attention window of one frame of ``grid`` (t, h, w) patches:
    windows of ``window_size`` pixels tile the unit grid from its top-left corner, the last
    row and column of windows cut by the grid's edge."""
    v = vision_config
    _, h, w = grid
    unit = v.patch_size * v.spatial_merge_size
    side = v.window_size // unit  # units per window side
    rows, cols = h // v.spatial_merge_size, w // v.spatial_merge_size
    return [
        min(side, rows - r) * min(side, cols - c)
        for r in range(0, rows, side)
        for c in range(0, cols, side)
    ]


def qwen_tower(
    vision_config, grid: tuple[int, int, int], kept: Sequence[float] | None,
    attention: bool = True,
) -> float:  # fmt: skip
    """One frame through a Qwen2/2.5-VL vision tower: the patch embedding (one product per
    patch), each block, then the 2x2 patch merger. ``kept`` (None: vanilla) is the units
    left after each block; a block's attention, qkv and out projection run at the units it
    starts with and its gated MLP at the units after its merge (4 patches a unit). Window
    blocks attend within each window, shrunk by the share of units kept; full-attention
    blocks over the frame (merged windows are not tracked one by one: each keeps the
    frame's share of units). ``attention=False`` leaves attention out."""
    v = vision_config
    d, i, blocks = v.hidden_size, v.intermediate_size, v.depth
    _, h, w = grid
    units0 = h * w // v.spatial_merge_size**2
    per_unit = v.spatial_merge_size**2
    kept = [units0] * blocks if kept is None else list(kept)
    counts = [units0, *kept]
    total = 2 * h * w * (v.in_channels * v.temporal_patch_size * v.patch_size**2) * d
    for b in range(blocks):
        share = counts[b] / units0
        before, after = per_unit * counts[b], per_unit * counts[b + 1]
        total += 2 * before * 4 * d * d + 2 * after * 3 * d * i
        if not attention:
            continue
        if b in v.fullatt_block_indexes:
            total += 4 * before * before * d
        else:
            total += sum(4 * (per_unit * n * share) ** 2 * d for n in qwen_windows(v, grid))
    merger_in = per_unit * d  # the merger's MLP: 4D -> 4D -> out, once per unit
    return total + 2 * counts[-1] * (merger_in * merger_in + merger_in * v.out_hidden_size)
