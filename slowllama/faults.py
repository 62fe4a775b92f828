"""Deterministic crash points for the crash-consistency tests.

SLOWLLAMA_KILL_AT="event:n" makes the process SIGKILL itself the n-th time (1-based)
it reaches `event`; "event:n:INT" sends SIGINT instead, the signal of a user's Ctrl-C.
Unset, each check is one dict lookup.
"""
from __future__ import annotations

import os
import signal
import threading

_lock = threading.Lock()
_counts: dict[str, int] = {}
_target = os.environ.get("SLOWLLAMA_KILL_AT", "")
_event, _, _rest = _target.partition(":")
_n, _, _sig = _rest.partition(":")
_n = int(_n) if _n.isdigit() else 0
_signal = signal.SIGINT if _sig == "INT" else signal.SIGKILL


def point(event: str):
    if not _target or event != _event:
        return
    with _lock:
        _counts[event] = _counts.get(event, 0) + 1
        hit = _counts[event] == _n
    if hit:
        os.kill(os.getpid(), _signal)
