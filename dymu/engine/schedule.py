"""How many tokens each block removes (``r`` per block); README "Names" lists the schedules."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import DyMUError

SCHEDULES = ("constant", "linear", "reverse_linear")


def canonical_schedule(name: str) -> str:
    """A schedule name as files record it: ``reverse-linear`` (the model-name spelling) and
    ``reverse_linear`` are the same schedule, stored as ``reverse_linear``."""
    return name.replace("-", "_")


def make_schedule(
    r_total: int, num_blocks: int, schedule: str | Sequence[int] = "constant"
) -> list[int]:
    """Spread ``r_total`` removed tokens over ``num_blocks`` blocks.

    ``constant``: ``r_total // L`` each, the remainder on the first blocks. ``linear``:
    decreasing from ``r0 = 2 r_total // L`` with the remainder in the last non-zero block.
    ``reverse_linear``: ``linear`` reversed. A list is taken as is (one entry per block).
    """
    if not isinstance(schedule, str):
        r = [int(v) for v in schedule]
        if len(r) != num_blocks or any(v < 0 for v in r):
            raise DyMUError(
                f"an explicit schedule needs {num_blocks} non-negative entries, got {r}"
            )
        return r
    if r_total < 0:
        raise DyMUError(f"r_total must be >= 0, got {r_total}")
    name = canonical_schedule(schedule)
    if name == "constant":
        base, rest = divmod(r_total, num_blocks)
        return [base + (1 if i < rest else 0) for i in range(num_blocks)]
    if name in ("linear", "reverse_linear"):
        r = _linear(r_total, num_blocks)
        return r[::-1] if name == "reverse_linear" else r
    raise DyMUError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def _linear(r_total: int, num_blocks: int) -> list[int]:
    r0 = (2 * r_total) // num_blocks
    r: list[int] = []
    total = 0
    k = 0
    step = r0 / num_blocks  # k * step, not k * r0 / L: the reference's float rounding
    while len(r) < num_blocks - 1:
        value = int(r0 - k * step)
        if total + value >= r_total:
            break
        r.append(value)
        total += value
        k += 1
    r.append(r_total - total)
    return r + [0] * (num_blocks - len(r))


# ToMe's ways of giving r: one int for every block, a list (one per block; zeros are appended
# up to the block count) or an ``(r, inflection)`` pair
ToMeR = int | list[int] | tuple[int, float]


def tome_schedule(r: ToMeR, num_blocks: int) -> list[int]:
    """ToMe's ``r`` as one entry per block (ToMe's ``parse_r``).

    ``(r, inflection)``: a straight line from ``int(r * (1 - inflection))`` to twice ``r``
    minus that, truncated per block, so ``inflection = 0`` is constant ``r`` and ``-1`` the
    paper's decreasing schedule ``2r .. 0``.
    """
    if isinstance(r, bool) or not isinstance(r, int | list | tuple):
        raise DyMUError(f"r must be an int, a list or an (r, inflection) pair, not {r!r}")
    if isinstance(r, list):
        if len(r) > num_blocks or any(not isinstance(v, int) or v < 0 for v in r):
            raise DyMUError(
                f"a list r needs at most {num_blocks} non-negative ints (one per block), got {r}"
            )
        return [int(v) for v in r] + [0] * (num_blocks - len(r))
    inflection = 0.0
    if isinstance(r, tuple):
        if len(r) != 2 or not -1.0 <= float(r[1]) <= 1.0:
            raise DyMUError(f"a tuple r is (r, inflection) with inflection in [-1, 1], got {r}")
        r, inflection = int(r[0]), float(r[1])
    if r < 0:
        raise DyMUError(f"r must be >= 0, got {r}")
    low = int(r * (1.0 - inflection))
    high = 2 * r - low
    step = (high - low) / max(num_blocks - 1, 1)
    return [int(low + step * i) for i in range(num_blocks)]
