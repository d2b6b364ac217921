#!/usr/bin/env python3
"""Plot and tabulate the results of benches/refresh.rs.

Reads criterion's output (target/criterion/<group>/<id>/new/), takes the
median point estimate of each benchmark (ns per operation), then

- writes docs/redeem-vs-size.svg: ns/op (log) against live families (log)
  for the redeem path and its baselines, one line per series;
- prints Markdown tables of every median in the redeem, issue and exchange
  groups, with ratio columns, ready for BENCHMARKS.md.

Python 3 standard library only. Run after `cargo bench --bench refresh`
(scripts/bench.sh does both).
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("redeem", "issue", "exchange")
REDEEM_PATHS = ("rotate", "grace_replay", "reuse_revoke", "ip_denied", "forged")
BASELINES = ("floor", "oxide_auth", "naive")

# (label, benchmark name, threads, colour, dashed)
SERIES = (
    ("rotate, 1 thread", "rotate", 1, "#1f77b4", False),
    ("rotate, 2 threads", "rotate", 2, "#1f77b4", True),
    ("floor (lookup + HMAC), 1 thread", "floor", 1, "#7f7f7f", False),
    ("oxide-auth TokenMap, 1 thread", "oxide_auth", 1, "#d62728", False),
    ("oxide-auth TokenMap, 2 threads", "oxide_auth", 2, "#d62728", True),
    ("naive Mutex<HashMap>, 1 thread", "naive", 1, "#2ca02c", False),
    ("naive Mutex<HashMap>, 2 threads", "naive", 2, "#2ca02c", True),
)


def criterion_dir():
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    return Path(target) / "criterion"


def load(base):
    """{(group, name, threads, families): median ns} from criterion's files.

    Ids are `<name>/<threads>t/<families>`; anything else is skipped.
    """
    results = {}
    for group in GROUPS:
        for bench in sorted((base / group).glob("**/new/benchmark.json")):
            meta = json.loads(bench.read_text())
            parts = meta.get("function_id", "").split("/")
            if len(parts) != 2 or not parts[1].endswith("t"):
                continue
            try:
                threads = int(parts[1][:-1])
                families = int(meta["value_str"])
            except (KeyError, TypeError, ValueError):
                continue
            estimates = json.loads((bench.parent / "estimates.json").read_text())
            median = estimates["median"]["point_estimate"]
            results[(meta["group_id"], parts[0], threads, families)] = median
    return results


def fmt_ns(ns):
    if ns is None:
        return "—"
    if ns >= 100:
        return f"{ns:,.0f} ns"
    return f"{ns:.1f} ns"


def fmt_ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def fmt_families(n):
    for div, suffix in ((1_000_000, "M"), (1_000, "K")):
        if n >= div and n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


def tables(results):
    lines = []
    sizes = sorted({k[3] for k in results})
    get = results.get

    lines.append("### redeem (median ns per operation)")
    lines.append("")
    head = ["families", "threads", *REDEEM_PATHS, *BASELINES]
    head += ["rotate / floor", "oxide_auth / rotate", "naive / rotate"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for n in sizes:
        for t in (1, 2):
            row = {name: get(("redeem", name, t, n)) for name in (*REDEEM_PATHS, *BASELINES)}
            if all(v is None for v in row.values()):
                continue
            cells = [f"{n:,}", str(t)]
            cells += [fmt_ns(row[name]) for name in (*REDEEM_PATHS, *BASELINES)]
            cells.append(fmt_ratio(row["rotate"], row["floor"]))
            cells.append(fmt_ratio(row["oxide_auth"], row["rotate"]))
            cells.append(fmt_ratio(row["naive"], row["rotate"]))
            lines.append("| " + " | ".join(cells) + " |")

    lines.append("")
    lines.append("### issue and exchange (median ns per operation)")
    lines.append("")
    head = ["families", "threads", "issue", "authorize", "exchange"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for n in sizes:
        for t in (1, 2):
            row = [
                get(("issue", "issue", t, n)),
                get(("issue", "authorize", t, n)),
                get(("exchange", "exchange", t, n)),
            ]
            if all(v is None for v in row):
                continue
            lines.append("| " + " | ".join([f"{n:,}", str(t), *map(fmt_ns, row)]) + " |")
    return "\n".join(lines)


def svg(results):
    """A log-log line chart, as an SVG document."""
    series = []
    for label, name, threads, colour, dashed in SERIES:
        points = sorted(
            (k[3], v) for k, v in results.items() if k[:3] == ("redeem", name, threads)
        )
        if points:
            series.append((label, colour, dashed, points))
    if not series:
        return None

    xs = [x for *_, pts in series for x, _ in pts]
    ys = [y for *_, pts in series for _, y in pts]
    x_lo, x_hi = math.floor(math.log10(min(xs))), math.ceil(math.log10(max(xs)))
    y_lo, y_hi = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    if x_lo == x_hi:
        x_hi += 1
    if y_lo == y_hi:
        y_hi += 1

    width, height = 820, 480
    left, right, top, bottom = 80, 290, 50, 60
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x):
        return left + (math.log10(x) - x_lo) / (x_hi - x_lo) * plot_w

    def py(y):
        return top + (1 - (math.log10(y) - y_lo) / (y_hi - y_lo)) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left + plot_w / 2}" y="24" text-anchor="middle" font-size="15">'
        "redeem: time per refresh by live families</text>",
    ]
    # Grid and tick labels: every decade, with 2 and 5 on the y axis.
    for e in range(x_lo, x_hi + 1):
        x = px(10**e)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#ddd"/>')
        out.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 18}" text-anchor="middle">'
            f"{fmt_families(10**e)}</text>"
        )
    for e in range(y_lo, y_hi + 1):
        for m in (1, 2, 5):
            v = m * 10**e
            if v > 10**y_hi:
                break
            y = py(v)
            colour = "#ccc" if m == 1 else "#eee"
            out.append(
                f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="{colour}"/>'
            )
            label = f"{v:,} ns" if v >= 1 else f"{v} ns"
            out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    out.append(
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>'
    )
    out.append(
        f'<text x="{left + plot_w / 2}" y="{height - 16}" text-anchor="middle">'
        "live families (log scale)</text>"
    )
    out.append(
        f'<text transform="translate(18 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
        "ns per operation, median (log scale)</text>"
    )
    for i, (label, colour, dashed, points) in enumerate(series):
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        out.append(
            f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>'
        )
        for x, y in points:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
        ly = top + 10 + i * 20
        lx = left + plot_w + 16
        out.append(
            f'<line x1="{lx}" y1="{ly}" x2="{lx + 24}" y2="{ly}" stroke="{colour}" '
            f'stroke-width="2"{dash}/>'
        )
        out.append(f'<text x="{lx + 30}" y="{ly + 4}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--criterion", type=Path, default=criterion_dir(),
                    help="criterion's output directory (default: target/criterion)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "redeem-vs-size.svg",
                    help="where to write the SVG")
    args = ap.parse_args()

    results = load(args.criterion)
    if not results:
        sys.exit(f"no refresh benchmark results under {args.criterion}; "
                 "run `cargo bench --bench refresh` first")
    doc = svg(results)
    if doc is None:
        print("no redeem results to plot", file=sys.stderr)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(doc)
        print(f"wrote {args.out}", file=sys.stderr)
    print(tables(results))


if __name__ == "__main__":
    main()
