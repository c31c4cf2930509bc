"""VTU mappings from a VLM's own arrangement of visual features.

A VLM places the features of its crops and frames into the LLM sequence with its own code:
AnyRes grids, unpadding, newline tokens, pooling, interpolation, several images per prompt.
dymu never re-implements that code. An integration runs it twice: once on the merged
features expanded to full grids (what the LLM gets), and once on *marker rows*
(:func:`marker_rows`) in place of features. A marker row names, in a few of its channels,
the merged token its patch belongs to. The arrangement code only selects, reshapes,
concatenates and takes convex combinations of rows (bilinear interpolation, pooling), so a
row that still reads as a marker after it (:func:`read_markers`) came from one merged token.
A blend of several tokens, a newline token, or any other row reads as ``-1``: a slot of its
own. :func:`slot_mapping` turns the keys of a whole sequence into the VTU mapping.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..engine.packing import constant
from ..errors import DyMUError

# A merged token's key k is written in base-8 digits d_i; each digit takes two channels,
# d_i and d_i ** 2. A convex combination of rows with different digits has
# mean(d ** 2) > mean(d) ** 2 (the variance of the blend), so blends are told apart from
# pure rows. Digits stay below 8 and squares below 64, exact even in bfloat16.
BASE = 8
TAG = -1.0  # every channel after the digits; a newline or text row never has them all
_TOL = 1e-4  # float32 rounding through interpolation stays well below it
MIN_TAG_CHANNELS = 2


def num_digits(num_keys: int) -> int:
    """Base-8 digits needed for keys ``0 .. num_keys - 1``."""
    digits = 1
    while BASE**digits < num_keys:
        digits += 1
    return digits


def marker_rows(
    groups: torch.Tensor,
    lengths: torch.Tensor | Sequence[int],
    dim: int,
    first_key: int = 0,
    num_keys: int | None = None,
) -> torch.Tensor:
    """``(C, P, dim)`` float32 rows standing in for the features of ``C`` crops or frames.

    ``groups (C, P)`` gives each patch's merged token within its crop (``-1``: none) and
    ``lengths (C,)`` the merged tokens per crop (on the device, or the host's copy: then the
    keys' offsets cost the device nothing). Merged token ``g`` of crop ``c`` gets key
    ``first_key + sum(lengths[:c]) + g``: every merged token of the batch has its own key.
    A patch without a token gets a row that reads as ``-1``. ``num_keys`` is
    ``first_key + sum(lengths)``, read from the device here unless the caller knows it.
    """
    crops, patches = groups.shape
    if torch.is_tensor(lengths):
        first = (lengths.cumsum(0) - lengths).to(groups.device) + first_key
        if num_keys is None:  # what read_markers is given: same digits
            num_keys = first_key + int(lengths.sum())
    else:
        host = np.asarray(lengths, dtype=np.int64)
        first = constant(np.cumsum(host) - host + first_key, groups.device)
        num_keys = first_key + int(host.sum()) if num_keys is None else num_keys
    keys = first[:, None] + groups  # (C, P)
    digits = num_digits(num_keys)
    if dim < 2 * digits + MIN_TAG_CHANNELS:
        raise DyMUError(
            f"features of width {dim} are too narrow to trace {num_keys} merged "
            f"tokens (need {2 * digits + MIN_TAG_CHANNELS} channels)"
        )
    rows = torch.full((crops, patches, dim), TAG, device=groups.device)
    # all digits at once, least significant first: (C, P, digits), then [d, d^2] per digit
    digit = (keys.clamp(min=0)[..., None] // _powers(digits, groups.device) % BASE).float()
    rows[..., : 2 * digits] = torch.stack([digit, digit * digit], -1).flatten(-2)
    return rows.masked_fill_((groups < 0)[..., None], 0.0)  # not a marker: no TAG channels


def read_markers(rows: torch.Tensor, num_keys: int) -> torch.Tensor:
    """The key each row names, ``-1`` for rows that are not one merged token's marker.

    ``num_keys`` is ``first_key + sum(lengths)`` of the markers written (it fixes the digits).
    """
    digits = num_digits(max(num_keys, 1))
    rows = rows.float()
    # every tag channel within _TOL of TAG: its smallest and largest are, in one pass
    low, high = torch.aminmax(rows[..., 2 * digits :], dim=-1)
    tagged = (low > TAG - _TOL) & (high < TAG + _TOL)
    pairs = rows[..., : 2 * digits].unflatten(-1, (digits, 2))
    value, square = pairs[..., 0], pairs[..., 1]
    whole = value.round()
    # a pure row: whole digits whose squares match (a blend of two keys fails one or the other)
    error = torch.stack([value - whole, square - value * value]).abs().amax((0, -1))
    keys = (whole.long() * _powers(digits, rows.device)).sum(-1)
    return torch.where(tagged & (error < _TOL), keys, -1)


def _powers(digits: int, device: torch.device) -> torch.Tensor:
    """``BASE ** [0, 1, ..., digits - 1]``."""
    return constant(BASE ** np.arange(digits, dtype=np.int64), device)


def place_keys(mask: torch.Tensor, keys: torch.Tensor, what: str = "image") -> torch.Tensor:
    """``(B, N)`` keys: ``keys`` written in row-major order where ``mask`` is set, as
    ``masked_scatter`` places features; ``-1`` elsewhere."""
    found = int(mask.sum())
    if found != keys.numel():
        raise DyMUError(
            f"the prompts hold {found} {what} tokens but the {what}s give {keys.numel()} features"
        )
    if found == 0:
        return torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
    # the i-th set position (row-major) takes keys[i]: its rank among set positions is the
    # running count of the mask minus one (no boolean indexing, so no read of its size)
    flat = mask.reshape(-1)
    rank = (flat.cumsum(0) - 1).clamp(min=0)  # a bool cumsum counts in int64
    placed = keys.to(mask.device).reshape(-1).long()[rank]
    return torch.where(flat, placed, -1).view(mask.shape)


def slot_mapping(keys: torch.Tensor, num_keys: int | None = None) -> torch.Tensor:
    """The VTU mapping (``(B, N)``: position -> slot) from per-position keys.

    Positions with the same key ``>= 0`` share a slot; a position with key ``-1`` gets a slot
    of its own. Slots are numbered in order of first appearance, so with nothing merged the
    mapping is ``arange(N)`` in every row. ``num_keys`` (keys are below it) is read from the
    device unless given; nothing else reads the device.
    """
    bsz, n = keys.shape
    positions = constant(np.arange(n), keys.device).expand(bsz, n)
    if num_keys is None:
        num_keys = int(keys.max()) + 1 if keys.numel() else 0
    # first position holding each key, per row: keys are offset per row so rows never
    # collide, and positions without a key go to one spare bucket at the end
    keyed = (keys >= 0) & (keys < num_keys)
    spare = bsz * num_keys
    row_offset = constant(np.arange(bsz)[:, None] * num_keys, keys.device)
    flat = torch.where(keyed, keys + row_offset, spare)
    first = torch.full((spare + 1,), n, device=keys.device, dtype=torch.long)
    first.scatter_reduce_(0, flat.reshape(-1), positions.reshape(-1), reduce="amin")
    # each position's representative: itself, or the first position of its key
    rep = torch.where(keyed, first[flat], positions)
    # representatives are the positions that are their own; count them to number the slots
    slot_of = (rep == positions).cumsum(1) - 1  # a bool cumsum counts in int64
    return slot_of.gather(1, rep)
