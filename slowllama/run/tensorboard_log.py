"""--tensorboard DIR: the log's numbers as TensorBoard scalar events, written with torch's SummaryWriter.

tensorboard is an optional extra (pip install 'slowllama[tensorboard]'), imported only when asked for.
The writer only adds event files under names of its own making (events.out.tfevents.TIME.HOST.PID.N),
so a folder shared with other runs loses nothing; a resume adds a file and TensorBoard joins them.
"""
from __future__ import annotations

from pathlib import Path

from ..engine.preference import METRICS as PREFERENCE_METRICS
from ..errors import ConfigError
from ..paths import check_not_under_a_file
from .report import tokens_per_s

# Record key -> TensorBoard tag. tokens/s is derived from the record (report.tokens_per_s).
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "seconds": "train/seconds",
        "bytes_read": "disk/bytes_read", "bytes_written": "disk/bytes_written", "eta_s": "time/eta_s",
        "val_loss": "val/loss", "val_ppl": "val/perplexity", **{k: f"train/{k}" for k in PREFERENCE_METRICS}}
TOKENS_TAG = "train/tokens_per_s"
FLUSH_S = 30  # how stale the events on disk may be while the run goes on


def _writer_class():
    """torch's SummaryWriter, or one line saying what to install."""
    try:
        import tensorboard  # noqa: F401  (torch's wrapper needs it; importing it first gives our message)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("--tensorboard: needs the tensorboard package: pip install 'slowllama[tensorboard]'") from e
    return SummaryWriter


def check(folder: str | None, *inside: tuple[str, str]):
    """Refuse, before any work, a --tensorboard that cannot be written: tensorboard missing, a file, or a
    folder inside one that slowllama replaces or reads (inside: (flag, path) pairs)."""
    if not folder:
        return
    _writer_class()
    path = Path(folder)
    check_not_under_a_file(path, "--tensorboard")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--tensorboard {path}: exists and is not a folder")
    for flag, other in inside:
        if other and path.resolve().is_relative_to(Path(other).resolve()):
            raise ConfigError(f"--tensorboard {path}: must not be inside {flag} {other}; choose a folder beside it")


class TensorBoardLog:
    """Scalar events of the log's records, one tag per number, at the record's iteration."""

    def __init__(self, folder: str | Path, resumed_at: int | None = None):
        """resumed_at: the iteration a resumed session begins at. It may replay iterations an earlier session had
        logged (the steps since the last interval commit), so TensorBoard's readers are told to drop the earlier
        events from there on (SummaryWriter's purge_step: hidden, the files are kept) and each point shows once."""
        self.writer = _writer_class()(log_dir=str(folder), flush_secs=FLUSH_S, purge_step=resumed_at)

    def record(self, rec: dict):
        step = rec["iter"]
        for key, tag in TAGS.items():
            if isinstance(rec.get(key), (int, float)):
                self.writer.add_scalar(tag, rec[key], step)
        v = tokens_per_s(rec)
        if v is not None:
            self.writer.add_scalar(TOKENS_TAG, v, step)

    def close(self):
        self.writer.close()
