"""Where each image's tokens sit in a packed ``(T, D)`` tensor, and the padded view of it.

Per-token work (norms, projections, MLPs) runs on packed tokens, so no image pays for another's
length; matching and merging work on a padded ``(B, width, ...)`` view, which is a reshape when
every image has the same length (fixed r, nothing merged yet, batch 1).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

# torch's jagged <-> padded kernels (one launch each; forward only): used where available
_JAGGED = tuple(
    getattr(torch.ops.aten, name)
    for name in ("_jagged_to_padded_dense_forward", "_padded_dense_to_jagged_forward")
    if hasattr(torch.ops.aten, name)
)
_JAGGED = _JAGGED if len(_JAGGED) == 2 else ()
_CPU_JAGGED_MAX = 16  # images; past that, indexing pads and packs faster on a CPU


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
    # batch, pos, offsets, counts, bounds, concatenated (None when uniform)
    index: torch.Tensor | None

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device) -> Packing:
        lengths, device = tuple(lengths), torch.device(device)
        uniform = len(set(lengths)) == 1
        return cls(lengths, device, None if uniform else _packing_index(lengths, device))

    def _part(self, which: int) -> torch.Tensor:
        index = self.index
        if index is None:  # uniform: only the flex way asks (pad and pack reshape), made here
            index = _packing_index(self.lengths, self.device)
        total, bsz = sum(self.lengths), len(self.lengths)
        return index.split([total, total, bsz, bsz, bsz + 1])[which]

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
    def bounds(self) -> torch.Tensor:
        """``(B + 1,)`` where every image's tokens start, then ``T``: jagged offsets."""
        return self._part(4)

    @property
    def width(self) -> int:
        return max(self.lengths)

    @property
    def uniform(self) -> bool:
        """Every image has the same length: packing is a reshape."""
        return len(set(self.lengths)) == 1

    def _jagged(self, x: torch.Tensor) -> bool:
        """Whether torch's jagged kernels pad and pack ``x``: one launch on a GPU; on a CPU
        they walk the images one by one (at 200 windows of a Qwen tower about 4x slower
        than indexing), so there only for a few images."""
        few = len(self.lengths) <= _CPU_JAGGED_MAX or x.device.type != "cpu"
        return bool(_JAGGED) and few and not x.requires_grad

    def pad(self, packed: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``(T, ...)`` -> ``(B, width, ...)`` with ``fill`` after each image's tokens."""
        shape = (len(self.lengths), self.width, *packed.shape[1:])
        if self.uniform:
            return packed.reshape(shape)
        if self._jagged(packed):  # one kernel, on 2-d values as it requires
            values = packed.reshape(packed.shape[0], -1)
            return _JAGGED[0](values, [self.bounds], [self.width], fill).view(shape)
        out = packed.new_full(shape, fill)
        out[self.batch, self.pos] = packed
        return out

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """``(B, width, ...)`` -> ``(T, ...)``: each image's real tokens (inverse of ``pad``)."""
        if self.uniform:
            return padded.reshape(-1, *padded.shape[2:])
        if self._jagged(padded):  # one kernel, on a contiguous (B, W, F)
            dense = padded.reshape(*padded.shape[:2], -1).contiguous()
            total = sum(self.lengths)
            return _JAGGED[1](dense, [self.bounds], total).view(total, *padded.shape[2:])
        return padded[self.batch, self.pos]


def _packing_index(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``batch``, ``pos``, ``offsets`` and ``counts`` of a packing, built on the host with
    numpy (no device op, no sync) and copied to ``device`` from pinned memory without
    blocking."""
    counts = np.asarray(lengths, dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    batch = np.repeat(np.arange(len(counts)), counts)
    pos = np.arange(len(batch)) - offsets[batch]
    bounds = np.append(offsets, len(batch))
    return upload(np.concatenate([batch, pos, offsets, counts, bounds]), device)


def upload(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``: pinned and copied without blocking on CUDA."""
    tensor = torch.from_numpy(host)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def constant(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on ``device``, copied once per value (cached) without blocking;
    under ``torch.compile`` made in the graph instead. Callers must not write to it."""
    if torch.compiler.is_compiling():
        return torch.as_tensor(host, device=device)
    return _cached(host.tobytes(), str(host.dtype), host.shape, device)


@functools.lru_cache(maxsize=256)
def _cached(data: bytes, dtype: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return upload(np.frombuffer(data, dtype=dtype).reshape(shape).copy(), device)
