"""OUT/report.html: the run as one self-contained page, drawn from its train_log.jsonl.

No script, no network, no server: the curves are inline SVG, so the page opens from a laptop's disk or an
e-mail attachment the same. While the run goes on, the page reloads itself every RELOAD_S seconds. Every
text from outside (the prompt, completions, options, paths) passes through html.escape.
"""
from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path

from ..fsutil import atomic_write_bytes
from ..paths import REPORT_FILE
from .costs import fmt_bytes
from .eta import fmt_seconds

RELOAD_S = 60
W, H, PAD = 440, 170, 36  # one chart's size and its margin for the axis labels
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def tokens_per_s(rec: dict) -> float | None:
    """An iteration record's throughput (the log keeps tokens and seconds)."""
    return rec["tokens"] / rec["seconds"] if rec.get("seconds") and "tokens" in rec else None


def read_records(path: Path) -> list[dict]:
    """The log's records; a line a crash cut short is skipped (the run rewrites the page, it never reads it)."""
    recs = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("iter"), int):
            recs.append(rec)
    return recs


def series(recs: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The page's curves, each a list of (iteration, value): one point per record that holds the value."""
    its = [r for r in recs if "loss" in r]
    out: dict[str, list[tuple[int, float]]] = {
        "loss": [(r["iter"], r["loss"]) for r in its],
        "val_loss": [(r["iter"], r["val_loss"]) for r in recs if "val_loss" in r],
        "lr": [(r["iter"], r["lr"]) for r in its if "lr" in r],
        "grad_norm": [(r["iter"], r["grad_norm"]) for r in its if "grad_norm" in r],
        "tokens_per_s": [(r["iter"], v) for r in its if (v := tokens_per_s(r)) is not None],
        "eta_s": [(r["iter"], r["eta_s"]) for r in its if "eta_s" in r],
    }
    for key in ("bytes_read", "bytes_written"):  # running totals
        total, pts = 0, []
        for r in its:
            if key in r:
                total += r[key]
                pts.append((r["iter"], total))
        out[key] = pts
    return out


def _num(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3g}"


def chart(title: str, lines: dict[str, list[tuple[int, float]]], fmt=_num) -> str:
    """An SVG line chart: one polyline per series, its point count in data-points (what the page's test reads)."""
    finite = {k: [(x, y) for x, y in pts if math.isfinite(y)] for k, pts in lines.items()}
    allp = [p for pts in finite.values() for p in pts]
    body = []
    if allp:
        x0, x1 = min(p[0] for p in allp), max(p[0] for p in allp)
        y0, y1 = min(p[1] for p in allp), max(p[1] for p in allp)
        if x1 == x0:
            x1 = x0 + 1
        if y1 == y0:
            y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)

        def at(x, y):
            return f"{PAD + (x - x0) / (x1 - x0) * (W - PAD - 8):.1f},{H - 20 - (y - y0) / (y1 - y0) * (H - 40):.1f}"

        body.append(f'<text x="2" y="24">{html.escape(fmt(y1))}</text>'
                    f'<text x="2" y="{H - 20}">{html.escape(fmt(y0))}</text>'
                    f'<text x="{PAD}" y="{H - 4}">{x0}</text>'
                    f'<text x="{W - 8}" y="{H - 4}" text-anchor="end">iteration {x1}</text>')
    for (name, pts), color in zip(finite.items(), COLORS):
        coords = " ".join(at(x, y) for x, y in pts) if pts else ""
        # A lone point draws nothing as a line: a dot shows it.
        dots = "".join(f'<circle cx="{c.split(",")[0]}" cy="{c.split(",")[1]}" r="2" fill="{color}"/>'
                       for c in coords.split()) if len(pts) == 1 else ""
        body.append(f'<polyline class="series" data-series="{html.escape(name)}" data-points="{len(pts)}" '
                    f'fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>{dots}')
    skipped = sum(len(lines[k]) - len(finite[k]) for k in lines)
    legend = " ".join(f'<span style="color:{c}">&#9632; {html.escape(k.replace("_", " "))}</span>'
                      for k, c in zip(lines, COLORS))
    note = f" ({skipped} non-finite values not drawn)" if skipped else ""
    return (f'<figure><figcaption><b>{html.escape(title)}</b> {legend}{note}</figcaption>'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}">'
            f'<rect x="{PAD}" y="10" width="{W - PAD - 8}" height="{H - 30}" fill="#fafafa" stroke="#ccc"/>'
            + "".join(body) + "</svg></figure>")


def _table(rows) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def render(recs: list[dict], options: dict, plan: list[str], status: str, iters: int,
           written_estimate: float | None = None) -> str:
    """The whole page."""
    s = series(recs)
    its = [r for r in recs if "loss" in r]
    done = its[-1]["iter"] + 1 if its else 0
    eta = s["eta_s"][-1][1] if s["eta_s"] and status == "running" else None
    written = s["bytes_written"][-1][1] if s["bytes_written"] else 0
    read = s["bytes_read"][-1][1] if s["bytes_read"] else 0
    wear = f"{fmt_bytes(written)} written to the work dir's disk so far"
    if written_estimate:
        wear += f", of ~{fmt_bytes(written_estimate)} estimated for the whole run (an SSD is rated in TB written)"
    summary = [("status", status), ("iterations", f"{done} of {iters}"),
               ("time left", fmt_seconds(eta) if eta is not None else "-"),
               ("last loss", _num(its[-1]["loss"]) if its else "-"),
               ("disk", f"{fmt_bytes(read)} read, {fmt_bytes(written)} written"), ("SSD wear", wear),
               ("updated", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))]
    completions = [(r["iter"], r["completion"]) for r in recs if "completion" in r]
    comp = "".join(f"<tr><th>{'before' if i == 0 else 'after' if i == iters else f'iteration {i}'}</th>"
                   f"<td><pre>{html.escape(str(text))}</pre></td></tr>" for i, text in completions)
    charts = [chart("loss", {"loss": s["loss"], "val_loss": s["val_loss"]}), chart("learning rate", {"lr": s["lr"]}),
              chart("gradient norm (before clipping)", {"grad_norm": s["grad_norm"]}),
              chart("tokens per second", {"tokens_per_s": s["tokens_per_s"]}),
              chart("disk bytes so far", {"bytes_read": s["bytes_read"], "bytes_written": s["bytes_written"]},
                    fmt=fmt_bytes),
              chart("time left (estimate)", {"eta_s": s["eta_s"]}, fmt=fmt_seconds)]
    reload = f'<meta http-equiv="refresh" content="{RELOAD_S}">' if status == "running" else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{reload}<title>slowllama: {html.escape(status)}, {done} of {iters}</title>
<style>body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222}} figure{{display:inline-block;margin:0 1em 1em 0}}
svg text{{font-size:10px;fill:#555}} table{{border-collapse:collapse;margin-bottom:1em}}
th,td{{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}} pre{{margin:0;white-space:pre-wrap}}</style>
</head><body><h1>slowllama run</h1>
{_table(summary)}
<section id="charts">{"".join(charts)}</section>
<h2>Completions</h2>{"<table id='completions'>" + comp + "</table>" if comp else "<p>none logged</p>"}
<h2>Plan</h2><pre id="plan">{html.escape(chr(10).join(plan))}</pre>
<h2>Options</h2>{_table(sorted(options.items()))}
</body></html>
"""


def write_report(out: Path, log_path: Path, options: dict, plan: list[str], status: str, iters: int,
                 written_estimate: float | None = None) -> Path:
    """Rewrite OUT/report.html atomically from the log."""
    page = render(read_records(log_path), options, plan, status, iters, written_estimate)
    path = out / REPORT_FILE
    atomic_write_bytes(path, [page.encode("utf-8")])
    return path
