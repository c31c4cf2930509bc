"""``bench_overhead.py``'s rows: ops and host syncs per forward against vanilla's and the
budgets, printed as one table, the sites of the syncs and the ops dymu adds most."""

from __future__ import annotations

from dataclasses import dataclass, field

from .op_counter import Count


@dataclass
class Row:
    part: str  # 'encoder' or 'vlm'
    model: str
    variant: str
    batch: int
    ops: int
    host_reads: int
    uploads: int
    vanilla_ops: int
    ops_budget: float | None = None  # most ops / vanilla ops
    syncs_budget: int | None = None  # most host reads + uploads per forward
    sites: dict[str, int] = field(default_factory=dict)
    ops_by_name: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ops / self.vanilla_ops

    @property
    def ops_ok(self) -> bool | None:
        return None if self.ops_budget is None else self.ratio <= self.ops_budget

    @property
    def syncs(self) -> int:
        return self.host_reads + self.uploads

    @property
    def syncs_ok(self) -> bool | None:
        return None if self.syncs_budget is None else self.syncs <= self.syncs_budget


def make_row(part: str, model: str, variant: str, batch: int, count: Count, vanilla: int,
             ops_budget: float | None, syncs_budget: int | None) -> Row:  # fmt: skip
    return Row(part, model, variant, batch, count.ops, count.host_reads, count.uploads, vanilla,
               ops_budget, syncs_budget, dict(count.sites), dict(count.ops_by_name))  # fmt: skip


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else "within" if ok else "OVER"


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'part':<7} {'model':<27} {'variant':<16} {'batch':>5} {'ops':>6} {'x vanilla':>9} "
        f"{'budget':>6} {'ops':>6} {'reads':>5} {'uploads':>7} {'budget':>6} {'syncs':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        budget = "-" if r.ops_budget is None else f"{r.ops_budget:.1f}x"
        syncs = "-" if r.syncs_budget is None else str(r.syncs_budget)
        reads, uploads = (str(n) if n >= 0 else "-" for n in (r.host_reads, r.uploads))
        print(
            f"{r.part:<7} {r.model:<27} {r.variant:<16} {r.batch:>5} {r.ops:>6} "
            f"{r.ratio:>8.2f}x {budget:>6} {verdict(r.ops_ok):>6} {reads:>5} "
            f"{uploads:>7} {syncs:>6} {verdict(r.syncs_ok):>6}"
        )


def print_sites(rows: list[Row]) -> None:
    """Where the host reads and uploads of each variant happen (at its largest batch)."""
    last: dict[tuple[str, str], Row] = {}
    for r in rows:
        if r.syncs > 0:  # compiled rows count none (-1)
            last[r.part, r.variant] = r
    if last:
        print("\nhost reads and uploads by site (largest batch):")
    for (part, variant), r in last.items():
        sites = ", ".join(f"{s} x{n}" for s, n in sorted(r.sites.items(), key=lambda s: -s[1]))
        print(f"  {part} {variant} b{r.batch}: {sites}")


def print_top(rows: list[Row], top: int) -> None:
    """The ``top`` ops whose count grows most over vanilla's, per dymu variant (first batch)."""
    if not top:
        return
    vanilla = {(r.part, r.batch): r.ops_by_name for r in rows if r.variant == "vanilla"}
    first = min(r.batch for r in rows)
    print(f"\nops added over vanilla, batch {first} (op: dymu - vanilla):")
    for r in rows:
        if r.variant == "vanilla" or r.batch != first:
            continue
        base = vanilla[r.part, r.batch]
        extra = {op: n - base.get(op, 0) for op, n in r.ops_by_name.items()}
        shown = sorted(extra.items(), key=lambda kv: -kv[1])[:top]
        print(f"  {r.part} {r.variant}: " + ", ".join(f"{op} {n:+d}" for op, n in shown))
