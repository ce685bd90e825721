#!/usr/bin/env python3
"""bench/charts.py - SVG charts of a bench/bench.py run: each job's ratio against the C original, and
what each server costs beyond the VRAM it lends.

    bench/charts.py RESULTS.json --out DIR [--title TEXT]

Reads the results.json that bench.py writes and writes DIR/ratios.svg (one bar a job: nbd_vram.py's
median over the C original's median of the figure that counts for it, IOPS or MiB/s; the 1.00× line
is parity) and DIR/footprint.svg (VRAM beyond the export and RAM (PSS) of each server, idle and under
load).  Standard library only; the SVG is plain enough for any browser or a Markdown page.
"""
import argparse
import json
import os
import statistics
import sys
from xml.sax.saxutils import escape

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import JOBS  # noqa: E402

METRIC = {name: metric for name, _, metric, _ in JOBS}
FONT = 'font-family="DejaVu Sans, Arial, sans-serif" font-size="12"'
GOOD, BAD, GREY, INK = "#2e7d32", "#e65100", "#9e9e9e", "#212121"


def ratios(results):
    """[(job, ratio or None)] in the order of bench.py's JOBS: median of nbd_vram.py over median of the C original."""
    out = []
    for name in [j for j in METRIC if j in results]:
        runs = results[name]
        med = {}
        for server in ("c", "py"):
            vals = [r[METRIC[name]] for r in runs.get(server, []) if r]
            med[server] = statistics.median(vals) if vals else None
        out.append((name, med["py"] / med["c"] if med["py"] and med["c"] else None))
    return out


def svg(width, height, body):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" {FONT}>\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def text(x, y, s, anchor="start", weight="normal", fill=INK):
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-weight="{weight}" fill="{fill}">{escape(s)}</text>'


def label_width(labels):
    """Pixels for the longest label at 12 px (about 7 px a character) and a margin."""
    return max([len(s) for s in labels] + [10]) * 7 + 20


def ratio_chart(rows, title):
    label_w, bar_w, row_h, top = label_width([name for name, _ in rows]), 420, 22, 48
    top_ratio = max([2.0] + [r for _, r in rows if r])
    scale = bar_w / top_ratio
    height = top + row_h * len(rows) + 36
    body = [text(10, 20, title, weight="bold"),
            text(10, 38, "nbd_vram.py / C original, same card, same fio job (above 1.00× is faster)", fill=GREY)]
    for i, (name, r) in enumerate(rows):
        y = top + i * row_h
        body.append(text(label_w - 8, y + 15, name, anchor="end"))
        if r is None:
            body.append(text(label_w + 4, y + 15, "failed", fill=BAD))
            continue
        w = r * scale
        body.append(f'<rect class="bar" data-job="{escape(name)}" data-ratio="{r:.2f}" x="{label_w}" y="{y + 3}" '
                    f'width="{w:.1f}" height="{row_h - 6}" fill="{GOOD if r >= 1 else BAD}"/>')
        body.append(text(label_w + w + 4, y + 15, f"{r:.2f}×"))
    x1 = label_w + scale
    body.append(f'<line class="parity" x1="{x1:.1f}" y1="{top - 4}" x2="{x1:.1f}" y2="{height - 30}" stroke="{INK}" '
                'stroke-dasharray="4 3"/>')
    body.append(text(x1, height - 16, "1.00×", anchor="middle"))
    return svg(label_w + bar_w + 70, height, body)


def footprint_chart(prints, title):
    """Two panels (VRAM beyond the export, RAM PSS), a bar per server and moment."""
    names = {"c": "C original", "py0": "nbd_vram.py before", "py": "nbd_vram.py"}
    rows = []
    for key, f in prints.items():
        server, when = key.split(" ", 1)
        rows.append((f"{names.get(server, server)}, {when.replace('under ', 'under load: ')}",
                     f["vram_beyond_export_mib"], f["pss_mib"], server))
    label_w, panel_w, row_h, top = label_width([r[0] for r in rows]), 220, 22, 64
    height = top + row_h * len(rows) + 20
    body = [text(10, 20, title, weight="bold"),
            text(10, 38, "what each server costs beyond the VRAM it lends (MiB; less is better)", fill=GREY)]
    for p, (what, idx) in enumerate((("VRAM beyond the export", 1), ("RAM (PSS, all processes)", 2))):
        x0 = label_w + p * (panel_w + 60)
        body.append(text(x0, top - 8, what, weight="bold"))
        top_val = max(r[idx] for r in rows) or 1
        for i, row in enumerate(rows):
            y = top + i * row_h
            w = row[idx] / top_val * panel_w
            body.append(f'<rect class="bar" data-panel="{p}" data-value="{row[idx]:.0f}" x="{x0}" y="{y + 3}" '
                        f'width="{w:.1f}" height="{row_h - 6}" fill="{GREY if row[3] == "c" else GOOD}"/>')
            body.append(text(x0 + w + 4, y + 15, f"{row[idx]:.0f}"))
    for i, row in enumerate(rows):
        body.append(text(label_w - 8, top + i * row_h + 15, row[0], anchor="end"))
    return svg(label_w + 2 * (panel_w + 60), height, body)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results.json written by bench/bench.py")
    ap.add_argument("--out", required=True, help="directory for ratios.svg and footprint.svg")
    ap.add_argument("--title", default="", help="chart title (default: the card and the date of the run)")
    a = ap.parse_args()
    try:
        with open(a.results) as f:
            data = json.load(f)
        results, prints = data["results"], data.get("footprint", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"charts: {a.results} is not a results.json of bench/bench.py: {e}")
    title = a.title or f"{data.get('card', '?').split(',')[0]}, {data.get('date', '?')}"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "ratios.svg"), "w") as f:
        f.write(ratio_chart(ratios(results), title))
    if prints:
        with open(os.path.join(a.out, "footprint.svg"), "w") as f:
            f.write(footprint_chart(prints, title))
    print(f"charts: wrote {a.out}/ratios.svg" + (f" and {a.out}/footprint.svg" if prints else ""))


if __name__ == "__main__":
    main()
