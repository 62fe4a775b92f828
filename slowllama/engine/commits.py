"""When a full fine-tune's updates go to the store (--commit-every): every step, or every N steps while RAM
holds them.

With the whole trained state in the RAM budget (plan.holds_trained_state) a step reads nothing, so
the write of every module is the only disk traffic a step has: 1.12 GB per step on a 271M-parameter
model, about a tenth of its step time (issue 28). Held in RAM and committed every N steps, it falls
by N; a crash loses the steps since the last commit, which a resume replays on the same batches
(the batches, dropout masks and lr are functions of (seed, step), the optimizer state is committed
with the modules), so the run still ends bit-identical.

The default, auto, commits every AUTO_EVERY steps, or sooner once the uncommitted work would pass
AUTO_SECONDS of measured step time. Ten cuts the writes to a tenth, where the rest of a step's cost
dwarfs them (on the shape above, from ~11% of a step to ~1%; a larger N gains under 1% more while
the work at risk keeps growing with it), and on that shape (~5 s a step) a crash loses under a minute;
the time bound keeps slow steps (a larger model, a slower machine) from risking more than two minutes.
"""
from __future__ import annotations

AUTO_EVERY = 10  # steps between commits under --commit-every auto
AUTO_SECONDS = 120.0  # ... or sooner, so that a crash loses at most about this much measured work


def interval(commit_every: int | None) -> int:
    """The steps between commits that commit_every (None: auto) asks for, at most."""
    return AUTO_EVERY if commit_every is None else commit_every


class CommitPolicy:
    """Counts the steps held since the last commit and says when the next commit is due."""

    def __init__(self, commit_every: int | None):
        self.every = interval(commit_every)
        self.by_time = commit_every is None
        self.steps, self.seconds = 0, 0.0

    def due(self, step_seconds: float) -> bool:
        """After a held step of step_seconds: whether to commit now (the next step would pass a bound)."""
        self.steps += 1
        self.seconds += step_seconds
        return self.steps >= self.every or (self.by_time and self.seconds + step_seconds > AUTO_SECONDS)

    def committed(self):
        self.steps, self.seconds = 0, 0.0
