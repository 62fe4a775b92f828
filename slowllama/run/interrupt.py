"""Ctrl-C during the iterations of a run whose steps wait in RAM for an interval commit (--commit-every).

Killed at once, such a run loses the steps since its last commit (a resume replays them, but the time is
gone). So while finished steps are held, the first Ctrl-C asks to stop when the iteration under way ends,
after its steps are committed; a second one stops at once, as a kill would. When nothing is held (runs that
commit every step, or just after a commit, as during a checkpoint's export) the first Ctrl-C stops at once,
as before: nothing is lost.
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable


class StopAfterIteration:
    """`with StopAfterIteration(holding) as stop:` ... `if stop.requested:` commit, then raise KeyboardInterrupt.

    holding() says, when Ctrl-C comes, whether steps are held in RAM. Outside the main thread (where Python
    delivers no signals) it changes nothing."""

    MESSAGE = ("\nCtrl-C: stopping when this iteration ends, once the steps held in RAM are committed "
               "(Ctrl-C again stops now and loses them; --resume replays them either way)")

    def __init__(self, holding: Callable[[], bool]):
        self.holding, self.requested, self._old = holding, False, None

    def _handler(self, signum, frame):
        if self.requested or not self.holding():
            raise KeyboardInterrupt
        self.requested = True
        print(self.MESSAGE, file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None
        return False
