"""New lengths read a block later: threshold merging without a host sync per block.

After a threshold merge the new lengths live on the device. Instead of reading them at once
(which stalls the host until the GPU has caught up), the merge keeps each image's current
packed segment, with its new tokens first and dead rows after them (size 0, masked by the
``log(size)`` attention bias), and starts a non-blocking copy of the new lengths to pinned
host memory, marked by a CUDA event. ``lag`` blocks later the host waits on that event (the
GPU meanwhile works through the blocks already queued) and compacts every image's segment
to those lengths: an upper bound of the lengths by then, since lengths only shrink. At the
end of the forward the last lengths are waited for: the one blocking read per forward.
With ``lag`` 0 the segments are compacted right after the merge, before the MLP, which
computes exactly what a synchronous read would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .packing import Packing, upload


@dataclass(frozen=True)
class PendingLengths:
    """A merge's new lengths on their way to the host."""

    block: int
    host: torch.Tensor
    event: torch.cuda.Event | None

    @classmethod
    def start(cls, lengths: torch.Tensor, block: int) -> PendingLengths:
        """Copy ``lengths`` to (pinned) host memory without blocking."""
        cuda = lengths.device.type == "cuda"
        host = lengths.to("cpu", non_blocking=True)  # from CUDA: into pinned memory
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return cls(block, host, event)

    def wait(self) -> list[int]:
        """The lengths, once the copy has landed (waits on its event, not on the stream)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def auto_lag(device: torch.device) -> int:
    """Blocks between a merge and the read of its lengths: 1 on CUDA (the host waits while
    the GPU runs the merging block's MLP), 0 elsewhere (nothing to overlap)."""
    return 1 if device.type == "cuda" else 0


def compact(
    x: torch.Tensor, sizes: torch.Tensor, packing: Packing, lengths: list[int]
) -> tuple[torch.Tensor, torch.Tensor, Packing]:
    """Keep the first ``lengths[b]`` rows of every image's segment (its live tokens come
    first); the rows to keep are listed on the host and copied without blocking."""
    if tuple(lengths) == packing.lengths:
        return x, sizes, packing
    if len(lengths) == 1:  # one image: its first rows, a view
        return x[: lengths[0]], sizes[: lengths[0]], Packing.from_lengths(lengths, x.device)
    old = np.asarray(packing.lengths, dtype=np.int64)
    new = np.asarray(lengths, dtype=np.int64)
    starts = np.repeat(np.cumsum(old) - old, new)  # each kept row's segment start
    firsts = np.repeat(np.cumsum(new) - new, new)
    rows = upload(starts + np.arange(len(starts)) - firsts, x.device)  # + rank in its image
    after = Packing.from_lengths(lengths, x.device)
    return x.index_select(0, rows), sizes.index_select(0, rows), after
