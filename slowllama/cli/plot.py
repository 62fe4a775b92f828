"""Draw the loss curves of one or more runs from their train_log.jsonl files.

    slowllama plot OUT/train_log.jsonl [-o loss.png]
    slowllama plot a/train_log.jsonl b/train_log.jsonl --labels fp32 bf16 -o compare.png

Needs matplotlib: pip install 'slowllama[plot]'.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_log(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Series by name ('loss', 'val_loss'), each a list of (iter, value)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise SystemExit(f"error: {path}:{n}: not JSON ({e})")
            for key in ("loss", "val_loss"):
                if key in rec and rec[key] is not None:
                    series.setdefault(key, []).append((rec["iter"], rec[key]))
    if not series:
        raise SystemExit(f"error: {path}: no loss records")
    return series


def plot(logs: list[Path], labels: list[str], out: Path, title: str = "slowllama"):
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: matplotlib is not installed: pip install 'slowllama[plot]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for path, label in zip(logs, labels):
        for key, points in read_log(path).items():
            xs, ys = zip(*points)
            style = "-" if key == "loss" else "--"
            ax.plot(xs, ys, style, label=f"{label} {key.replace('_', ' ')}" if len(logs) > 1 else key.replace("_", " "))
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    logs = p.add_argument_group("the runs")
    logs.add_argument("logs", nargs="+", type=Path, help="train_log.jsonl files")
    logs.add_argument("--labels", nargs="*", help="one label per log (default: the folder names)")
    picture = p.add_argument_group("the picture")
    picture.add_argument("-o", "--out", type=Path, help="PNG to write (default: loss.png beside the first log)")
    picture.add_argument("--title", default="slowllama", help="its title (default: slowllama)")
    a = p.parse_args(argv)
    labels = a.labels or [path.parent.name for path in a.logs]
    if len(labels) != len(a.logs):
        p.error("--labels needs one label per log")
    out = plot(a.logs, labels, a.out or a.logs[0].with_name("loss.png"), a.title)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
