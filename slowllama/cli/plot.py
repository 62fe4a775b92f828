"""Draw the loss curves of one or more runs from their train_log.jsonl files.

    slowllama plot OUT/train_log.jsonl [-o loss.png]
    slowllama plot a/train_log.jsonl b/train_log.jsonl --labels fp32 bf16 -o compare.png

Needs matplotlib: pip install 'slowllama[plot]'.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from slowllama.errors import ConfigError
from slowllama.fsutil import atomic_write_bytes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_log(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Series by name ('loss', 'val_loss'), each a list of (iter, value)."""
    series: dict[str, list[tuple[int, float]]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise ConfigError(f"{path}:{n}: not JSON ({e})") from e
                if not isinstance(rec, dict):
                    raise ConfigError(f"{path}:{n}: not a train_log record (a JSON object)")
                for key in ("loss", "val_loss"):
                    if rec.get(key) is not None:
                        if not isinstance(rec.get("iter"), int) or not isinstance(rec[key], (int, float)):
                            raise ConfigError(f"{path}:{n}: a {key} record needs an integer 'iter' and a number")
                        series.setdefault(key, []).append((rec["iter"], rec[key]))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason})") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the log ({e.strerror or e})") from e
    if not series:
        raise ConfigError(f"{path}: no loss records")
    return series


def check_out(out: Path, logs: list[Path]):
    """The picture replaces only a PNG that is none of the logs: never a log, a folder or a user's other file."""
    if out.suffix.lower() != ".png":
        raise ConfigError(f"-o {out}: the picture is a PNG; give a path ending in .png")
    if any(out.resolve() == log.resolve() for log in logs):
        raise ConfigError(f"-o {out}: is one of the logs; give another path")
    if out.is_dir():
        raise ConfigError(f"-o {out}: is a folder; give the path of the .png to write")
    if out.exists():
        with open(out, "rb") as f:
            if f.read(len(PNG_MAGIC)) != PNG_MAGIC:
                raise ConfigError(f"-o {out}: exists and is not a PNG; refusing to overwrite it")
    if not out.absolute().parent.is_dir():
        raise ConfigError(f"-o {out}: the folder {out.absolute().parent} does not exist")


def plot(logs: list[Path], labels: list[str], out: Path, title: str = "slowllama"):
    """Write the picture at out atomically (a Ctrl-C leaves the previous one); every input is read first."""
    check_out(out, logs)
    curves = [read_log(path) for path in logs]
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError("matplotlib is not installed: pip install 'slowllama[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for path, label, log in zip(logs, labels, curves):
        for key, points in log.items():
            xs, ys = zip(*points)
            style = "-" if key == "loss" else "--"
            ax.plot(xs, ys, style, label=f"{label} {key.replace('_', ' ')}" if len(logs) > 1 else key.replace("_", " "))
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(out, [png.getvalue()])
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
    try:
        out = plot(a.logs, labels, a.out or a.logs[0].with_name("loss.png"), a.title)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
