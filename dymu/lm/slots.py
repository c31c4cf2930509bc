"""The slots of a VTU prefill, packed across the batch.

A VTU mapping ``(B, N)`` gives every full position its merged slot within its sample. The
language model runs its norms, projections and MLPs on the batch's slots packed together:
``S = sum(M_i)`` rows, never ``B x max(M_i)``, so a sample that keeps many slots costs the
others nothing. :class:`SlotPlan` is computed once per forward, before the first layer: the
packed row of every full position. Every attention then gathers rows to full positions with
one index and averages back with one mean reduction (``index_reduce_``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch

# index_reduce_ says once per process that its API is in beta; dymu pins what it calls
warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta", category=UserWarning)


@dataclass(frozen=True)
class SlotPlan:
    """A prefill's mapping, packed: ``rows (B*N,)`` is the packed row of every full position
    (sample ``b``'s slot ``m`` sits at ``offset_b + m``), ``total`` is ``S``."""

    mapping: torch.Tensor
    rows: torch.Tensor
    total: int

    @classmethod
    def build(cls, mapping: torch.Tensor) -> SlotPlan:
        """Step by step: sample ``b`` has ``M_b = max(mapping[b]) + 1`` slots; its slots start
        at ``offset_b = M_0 + ... + M_{b-1}``; position ``(b, n)`` reads row
        ``offset_b + mapping[b, n]``. ``S`` is read to the host once (to size the rows)."""
        slots = mapping.amax(dim=1) + 1
        offsets = slots.cumsum(0) - slots
        rows = (mapping + offsets[:, None]).reshape(-1)
        return cls(mapping, rows, int(slots.sum()))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SlotPlan:
        """The plan on ``device`` (accelerate's hooks call this when a model is split over
        several GPUs and the layers' inputs are moved to each layer's device)."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, mapping=move(self.mapping), rows=move(self.rows))

    @property
    def shape(self) -> torch.Size:
        """The full ``(B, N)``, as the mapping's."""
        return self.mapping.shape

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` at full positions -> ``(S, C)``: the mean of each slot's positions,
        accumulated in float32."""
        rows = self.rows if self.rows.device == x.device else self.rows.to(x.device)
        flat = x.reshape(-1, x.shape[-1]).float()
        # every row the mapping names gets a mean; a row no position names is never read
        acc = flat.new_empty(self.total, flat.shape[1])
        return acc.index_reduce_(0, rows, flat, "mean", include_self=False).to(x.dtype)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``(S, ...)`` -> ``(B, N, ...)``: every full position gets its slot's row."""
        rows = self.rows if self.rows.device == packed.device else self.rows.to(packed.device)
        return packed.index_select(0, rows).view(*self.shape, *packed.shape[1:])
