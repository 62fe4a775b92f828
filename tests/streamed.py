"""Helpers for tests that drive the streamed Trainer itself: a simulated kill, and one step's disk bytes."""
from __future__ import annotations

from slowllama import faults
from slowllama.fsutil import IO


def crash_at(trainer, monkeypatch, event: str, n: int):
    """Stop the n-th time `event` is reached, as a kill would, the writes queued so far flushed."""
    seen = [0]

    def point(e):
        if e == event:
            seen[0] += 1
            if seen[0] == n:
                trainer.streamer.flush()
                raise KeyboardInterrupt
    monkeypatch.setattr(faults, "point", point)


def steady_step_io(trainer, batches) -> tuple[int, int]:
    """(bytes read, bytes written) by the step on batches[2], after two steps have filled the caches."""
    for b in batches[:2]:
        trainer.train_step(*b)
    trainer.streamer.flush()
    r0, w0 = IO.snapshot()
    trainer.train_step(*batches[2])
    trainer.streamer.flush()
    r1, w1 = IO.snapshot()
    return r1 - r0, w1 - w0
