"""Attention over packed images of different lengths, each image attending only to itself.

After a merging block the images of a batch have different lengths. Four ways to attend:

* ``"loop"``: one SDPA call per image. No wasted work, but one launch per image per block
  (fine on a CPU, hundreds of small kernels at batch 64 on a GPU).
* ``"nested"``: one SDPA call over nested jagged tensors (``torch.nested``, the layout
  transformers' and torch's varlen kernels take). NJT attention takes no mask, so the
  ``log(size)`` bias of proportional attention rides in the scores themselves: one extra
  head dimension holding ``sqrt(d)`` in the queries and ``log(size)`` in the keys adds
  exactly ``log(size_j)`` to every score ``q.k_j / sqrt(d)`` (the scale is fixed at the
  original ``1 / sqrt(d)``; the dimension is padded to a multiple of 8 for fused kernels).
* ``"flex"``: FlexAttention over the whole packed sequence with a block mask that keeps
  every image to itself and a ``score_mod`` adding ``log(size)``; compiled on a GPU (on a
  CPU it runs unfused, for checking only).
* ``"padded"``: one SDPA call over the batch padded to its longest image, the padding
  masked by the same additive bias row that carries ``log(size)`` (-inf there). A constant
  handful of kernels whatever the batch size, and no copy of q/k for the bias; the padding
  costs attention FLOPs, a small share of a block's at these lengths.
* ``"auto"`` (default): images of one length share one batched SDPA call (all ways give
  the same there); otherwise ``"padded"`` on a GPU, where a block is bound by launches (the
  loop launches per image: at batch 64, 64 attention calls per block), and ``"loop"`` on a
  CPU, where launches cost nothing and the loop wastes no FLOPs (the fastest measured there;
  on an H200 ``"nested"`` took 2.3x-2.5x the loop's time at batch 8; README: Attention over
  images of different lengths).

Every way gives the per-image result (to 1e-5 in fp32; tests/test_attention.py). Lengths are
read from the packing's host copy, so none of them synchronises with the device.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DyMUError
from .packing import Packing, upload

ATTENTION_MODES = ("auto", "loop", "padded", "nested", "flex")
_BIAS_DIMS = 8  # the extra head dimensions of the nested way (one used, padded to 8)


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`ATTENTION_MODES`, else a one-line error."""
    if mode not in ATTENTION_MODES:
        raise DyMUError(f"attention must be one of {', '.join(ATTENTION_MODES)}, not {mode!r}")
    return mode


def auto_way(device_type: str) -> str:
    """What ``"auto"`` runs for images of different lengths on a device of this type."""
    return "padded" if device_type == "cuda" else "loop"


def way(mode: str, device_type: str) -> str:
    """The way ``mode`` takes for images of different lengths on this device type."""
    return auto_way(device_type) if mode == "auto" else mode


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    packing: Packing,
    log_sizes: torch.Tensor | None,
    mode: str = "auto",
    padded_log: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention on packed ``(T, D)`` tokens; ``log_sizes`` ``(T,)`` float32 is
    added to every key's scores (proportional attention; -inf masks a dead row). The padded
    way takes its padded view ``padded_log`` when the caller has made it. Returns
    ``(T, D)``."""
    lengths = packing.lengths
    if packing.uniform and mode != "flex":
        return _sdpa(q, k, v, log_sizes, heads, len(lengths), lengths[0])
    mode = way(mode, q.device.type)
    if mode == "padded":
        if padded_log is None and log_sizes is not None:
            padded_log = packing.pad(log_sizes, fill=float("-inf"))
        return _padded(q, k, v, heads, packing, padded_log)
    if mode == "nested":
        return _nested(q, k, v, heads, packing, log_sizes)
    if mode == "flex":
        return _flex(q, k, v, heads, packing, log_sizes)
    return _loop(q, k, v, heads, lengths, log_sizes)


def _loop(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    lengths: tuple[int, ...],
    log_sizes: torch.Tensor | None,
) -> torch.Tensor:
    """One SDPA call per image, or per distinct length where that halves the calls or better
    (a Qwen tower's windows: at batch 8 about 150 windows per block but a few dozen lengths;
    each call costs tens of microseconds of overhead on a CPU, more than a small window's
    attention). Images of one length are gathered next to each other, attended as one batch
    and put back."""
    sizes = np.asarray(lengths, dtype=np.int64)
    kinds, counts = np.unique(sizes, return_counts=True)
    if 2 * len(kinds) > len(sizes):
        parts = zip(
            q.split(lengths),
            k.split(lengths),
            v.split(lengths),
            log_sizes.split(lengths) if log_sizes is not None else [None] * len(lengths),
            lengths,
            strict=True,
        )
        return torch.cat([_sdpa(qi, ki, vi, si, heads, 1, n) for qi, ki, vi, si, n in parts])
    index = upload(_by_length(sizes), q.device)
    q, k, v = (t.index_select(0, index) for t in (q, k, v))
    log_sizes = None if log_sizes is None else log_sizes.index_select(0, index)
    out, start = [], 0
    for n, count in zip(kinds.tolist(), counts.tolist(), strict=True):
        rows = slice(start, start + n * count)
        bias = None if log_sizes is None else log_sizes[rows]
        if n:
            out.append(_sdpa(q[rows], k[rows], v[rows], bias, heads, count, n))
        start += n * count
    return q.new_empty(q.shape).index_copy_(0, index, torch.cat(out))


def _by_length(sizes: np.ndarray) -> np.ndarray:
    """``(T,)``: the packed rows reordered so that images of one length sit together, in
    order of length (each image's rows in order; a stable sort keeps images in order).

    Step by step: image ``i`` starts at ``start_i = sum(sizes[:i])``; sorted, image
    ``order[j]`` is the ``j``-th, starting at ``sum(sorted[:j])`` in the new layout; new row
    ``r`` of image ``order[j]`` is old row ``start_order[j] + (r - sum(sorted[:j]))``."""
    order = np.argsort(sizes, kind="stable")
    ordered = sizes[order]
    starts = np.cumsum(sizes) - sizes
    new_starts = np.cumsum(ordered) - ordered
    return np.repeat(starts[order] - new_starts, ordered) + np.arange(int(sizes.sum()))


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_sizes: torch.Tensor | None,
    heads: int,
    bsz: int,
    n: int,
) -> torch.Tensor:
    """``bsz`` images of ``n`` tokens each, in one call; the bias is a broadcast row."""
    dim = q.shape[-1]
    q, k, v = (t.reshape(bsz, n, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
    bias = None if log_sizes is None else log_sizes.view(bsz, 1, 1, n).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return out.transpose(1, 2).reshape(bsz * n, dim)


def _padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    packing: Packing,
    padded_log: torch.Tensor | None,
) -> torch.Tensor:
    """One SDPA call over the padded batch; padding masked by -inf in the bias row
    (``padded_log``: ``(B, W)`` log sizes, -inf on padding; ``None``: sizes all 1)."""
    total, dim = q.shape
    bsz, width = len(packing.lengths), packing.width
    if padded_log is None:
        padded_log = packing.pad(q.new_zeros(total, dtype=torch.float32), fill=float("-inf"))
    bias = padded_log.to(q.dtype).view(bsz, 1, 1, width)
    qkv = packing.pad(torch.stack([q, k, v], 1))  # (B, W, 3, D), zeros after each image
    q, k, v = (t.view(bsz, width, heads, dim // heads).transpose(1, 2) for t in qkv.unbind(2))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return packing.pack(out.transpose(1, 2).reshape(bsz, width, dim))


def _nested(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    packing: Packing,
    log_sizes: torch.Tensor | None,
) -> torch.Tensor:
    """One SDPA call on nested jagged tensors; the bias folded into an extra dimension."""
    total, dim = q.shape
    lengths = packing.lengths
    d = dim // heads
    q, k, v = (t.view(total, heads, d) for t in (q, k, v))
    if log_sizes is not None:
        # scores = (q . k) * scale, with scale = 1/sqrt(d) for the original d:
        # [q, sqrt(d), 0..] . [k, log(size), 0..] * scale = q . k / sqrt(d) + log(size)
        pad = q.new_zeros(total, heads, _BIAS_DIMS - 1)
        q = torch.cat([q, q.new_full((total, heads, 1), d**0.5), pad], -1)
        log_size = log_sizes.to(k.dtype).view(total, 1, 1).expand(total, heads, 1)
        k = torch.cat([k, log_size, pad], -1)
        v = torch.cat([v, pad, pad[..., :1]], -1)
    offsets = packing.bounds  # (B + 1,), made on the host with the packing
    nested = [
        torch.nested.nested_tensor_from_jagged(
            t, offsets, min_seqlen=min(lengths), max_seqlen=max(lengths)
        ).transpose(1, 2)  # (B, heads, j, d): the layout SDPA takes
        for t in (q, k, v)
    ]
    out = F.scaled_dot_product_attention(*nested, scale=d**-0.5)
    return out.transpose(1, 2).values()[..., :d].reshape(total, dim)


def _flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    packing: Packing,
    log_sizes: torch.Tensor | None,
) -> torch.Tensor:
    """FlexAttention over the packed sequence: a block mask per image, ``log(size)`` added
    by ``score_mod``."""
    from torch.nn.attention.flex_attention import create_block_mask

    total, dim = q.shape
    image = packing.batch

    def same_image(b, h, q_idx, kv_idx):
        return image[q_idx] == image[kv_idx]

    mask = create_block_mask(same_image, None, None, total, total, device=q.device)
    score_mod = None
    if log_sizes is not None:
        log_size = log_sizes.to(q.dtype)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + log_size[kv_idx]

    q, k, v = (t.view(1, total, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
    out = _flex_attention(q.device.type)(q, k, v, score_mod=score_mod, block_mask=mask)
    return out.transpose(1, 2).reshape(total, dim)


@functools.cache
def _flex_attention(device_type: str):
    """FlexAttention, compiled (once, for any length) where it has fused kernels: CUDA."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=True)
    return flex_attention
