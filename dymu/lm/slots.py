"""The slots of a VTU prefill, packed across the batch.

A VTU mapping ``(B, N)`` gives every full position its merged slot within its sample. The
language model runs its norms, projections and MLPs on the batch's slots packed together:
``S = sum(M_i)`` rows, never ``B x max(M_i)``, so a sample that keeps many slots costs the
others nothing. :class:`SlotPlan` is computed once per forward, before the first layer: the
packed row of every full position and the reciprocal of every slot's count. Every attention
then gathers rows to full positions with one index and averages back with one sum
(``index_add_``) scaled by those reciprocals: a mean, about ten times faster on a CPU than
``index_reduce_``'s (3.0 against 0.27 ms for 16 x 585 positions of width 512, 2 threads),
which counts the groups again at every call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class SlotPlan:
    """A prefill's mapping, packed: ``rows (B*N,)`` is the packed row of every full position
    (sample ``b``'s slot ``m`` sits at ``offset_b + m``), ``total`` is ``S`` and ``scale
    (S, 1)`` float32 one over the number of positions of every slot."""

    mapping: torch.Tensor
    rows: torch.Tensor
    total: int
    scale: torch.Tensor

    @classmethod
    def build(cls, mapping: torch.Tensor) -> SlotPlan:
        """Step by step: sample ``b`` has ``M_b = max(mapping[b]) + 1`` slots; its slots start
        at ``offset_b = M_0 + ... + M_{b-1}``; position ``(b, n)`` reads row
        ``offset_b + mapping[b, n]``. ``S`` is read to the host once (to size the rows);
        each row's count of positions is summed once and its reciprocal kept (a row no
        position names is never read: its count is taken as 1)."""
        slots = mapping.amax(dim=1) + 1
        offsets = slots.cumsum(0) - slots
        rows = (mapping + offsets[:, None]).reshape(-1)
        total = int(slots.sum())
        ones = torch.ones_like(rows, dtype=torch.float32)
        counts = ones.new_zeros(total).index_add_(0, rows, ones)
        return cls(mapping, rows, total, counts.clamp(min=1.0).reciprocal()[:, None])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SlotPlan:
        """The plan on ``device`` (accelerate's hooks call this when a model is split over
        several GPUs and the layers' inputs are moved to each layer's device)."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(
            self, mapping=move(self.mapping), rows=move(self.rows), scale=move(self.scale)
        )

    @property
    def shape(self) -> torch.Size:
        """The full ``(B, N)``, as the mapping's."""
        return self.mapping.shape

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` at full positions -> ``(S, C)``: the mean of each slot's positions,
        accumulated in float32."""
        rows, scale = self.rows, self.scale
        if rows.device != x.device:
            rows, scale = rows.to(x.device), scale.to(x.device)
        flat = x.reshape(-1, x.shape[-1]).float()
        acc = flat.new_zeros(self.total, flat.shape[1]).index_add_(0, rows, flat)
        return acc.mul_(scale).to(x.dtype)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``(S, ...)`` -> ``(B, N, ...)``: every full position gets its slot's row."""
        rows = self.rows if self.rows.device == packed.device else self.rows.to(packed.device)
        return packed.index_select(0, rows).view(*self.shape, *packed.shape[1:])
