"""The tables of scripts/bench-peers: one per scenario, one row per tool, ratios against Keepsake."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bench_peers.tools import RESTORE_STEP, Result, median

MB = 1_000_000


def fmt_bytes(n: float) -> str:
    if abs(n) >= 1000 * MB:
        return f"{n / (1000 * MB):.2f} GB"
    if abs(n) >= MB:
        return f"{n / MB:.0f} MB" if abs(n) >= 100 * MB else f"{n / MB:.1f} MB"
    return f"{n / 1000:.1f} kB"


def fmt_s(seconds: float) -> str:
    if seconds >= 100:
        return f"{seconds:,.0f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.0f} ms"


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return ""
    r = value / base
    return f"{r:.2f}x" if r < 10 else f"{r:.0f}x"


def checks(results: Sequence[Result], baseline: Result | None) -> list[str]:
    """The issue's claims for scenario F, checked for keepsake (local) against this run's peers."""
    if baseline is None or not baseline.ok or baseline.stored is None:
        return ["check: keepsake (local) did not run: nothing to check"]
    lines = []
    peers = [r for r in results if r.ok and r.stored is not None and not r.name.startswith("keepsake (")]
    if peers:
        least = min(peers, key=lambda r: r.stored or 0)
        ok = all(baseline.stored < (r.stored or 0) for r in peers)
        lines.append(f"check: keepsake (local) stores less than every peer: {'PASS' if ok else 'FAIL'} "
                     f"({fmt_bytes(baseline.stored)}; the least of the peers: {least.name}, {fmt_bytes(least.stored or 0)})")
    original = next((r for r in results if r.ok and r.name.startswith("keepsake 0.4.2")), None)
    if original is not None:
        ours, theirs = median(baseline.blocked), median(original.blocked)
        lines.append(f"check: keepsake (local) blocks less per checkpoint than keepsake 0.4.2 (median): "
                     f"{'PASS' if ours < theirs else 'FAIL'} ({fmt_s(ours)} vs {fmt_s(theirs)})")
    return lines


def is_short(cells: list[str]) -> bool:
    return not any(cells[3:])


def table(results: Sequence[Result], baseline: Result | None, n: int) -> list[str]:
    """The lines of one scenario's table; ratios are ``tool / baseline`` (baseline: 1.00x)."""
    base = baseline if baseline is not None and baseline.ok else None
    head = ["tool", "version", "blocked/ckpt", "x", "1st ckpt", "until durable", "x", f"stored after {n}", "x",
            "list", "x", f"restore #{RESTORE_STEP + 1}", "x", "identical"]
    right = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
    rows: list[list[str]] = []

    def pair(get: Callable[[Result], float | None], fmt: Callable[[float], str], r: Result) -> list[str]:
        value = get(r)
        if value is None:
            return ["", ""]
        return [fmt(value), ratio(value, get(base) if base is not None else None)]

    for r in results:
        if r.na or r.problem:
            why = r.na or f"error: {r.problem}"
            if len(why) > 90:
                why = why[:87] + "..."
            rows.append([r.name, r.version or "-", why] + [""] * (len(head) - 3))
            continue
        row = [r.name, r.version]
        row += pair(lambda x: median(x.blocked), fmt_s, r)
        row.append(fmt_s(r.blocked[0]))
        row += pair(lambda x: x.durable, fmt_s, r)
        row += pair(lambda x: None if x.stored is None else float(x.stored), fmt_bytes, r)
        if r.list_times:
            row += pair(lambda x: median(x.list_times) if x.list_times else None, fmt_s, r)
        else:
            row += ["n/a", ""]
        row += pair(lambda x: x.restore_seconds, fmt_s, r)
        row.append({True: "yes", False: "NO", None: "-"}[r.identical])
        rows.append(row)

    full = [head] + [x for x in rows if not is_short(x)]
    widths = [max(len(x[i]) for x in full) for i in range(len(head))]
    lines = []

    def line(cells: list[str]) -> str:
        if is_short(cells):  # n/a or error: the reason runs across the columns
            return "  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1]), cells[2]]).rstrip()
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines.append(line(head))
    lines.append("  ".join("-" * w for w in widths))
    lines += [line(r) for r in rows]
    return lines
