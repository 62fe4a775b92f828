"""What a person watching a run sees beside its log: the time estimate before iteration 0, the ETA on the
progress bar and in each iteration record (eta_s), OUT/report.html and --tensorboard events.

The run's loop calls it at four points (start, each record, each finished iteration, the end); rank 0 alone
watches, the other ranks get a monitor that does nothing.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from ..device import memory_budget
from . import eta as eta_mod
from .costs import eval_reads
from .report import write_report
from .tensorboard_log import TensorBoardLog

log = logging.getLogger("slowllama")
REPORT_EVERY_S = 10.0  # the page is rewritten after an iteration at most this often (and after evaluations)


class Monitor:
    def __init__(self, run, est: dict, plan: list[str], leader: bool):
        """run: the loop's Run (options, store, trainer, device); est: estimate_io's; plan: the cost lines."""
        self.on = leader
        self.eta = self.tb = None
        if not leader:
            return
        o, store, tcfg = run.o, run.store, run.tcfg
        self.out, self.log_path, self.iters = run.out, run.log_path, o.iters
        self.options = dataclasses.asdict(o)
        start = run.trainer.step
        rows = o.batch_size * o.grad_accum * o.rows_per_example
        mb = min(tcfg.micro_batch or rows, rows)
        p = eta_mod.probe(store, tcfg, mb, o.seq_len, run.p.device, est["written"], staged=est["commit_every"] > 1)
        export = store.nbytes() if not run.p.lora or o.merge else 0
        evals = eval_reads(o, start, store.nbytes(), bool(run.p.val_batches), memory_budget(run.p.device))
        t = eta_mod.estimate(p, store, tcfg, est, -(-rows // mb), export, evals)
        line = eta_mod.estimate_line(t, o.iters - start)
        print(line)
        self.plan = [*plan, line]
        self.written_estimate = est["written"] * o.iters
        self.eta = eta_mod.Eta(t, start, o.iters)
        run.summary["time_estimate"] = {"iteration_s": t.iteration_s, "disk_s": t.disk_s, "compute_s": t.compute_s,
                                        "run_s": t.iteration_s * (o.iters - start) + t.tail_s}
        self.tb = TensorBoardLog(o.tensorboard, start if run.resume else None) if o.tensorboard else None
        self.last_report = -float("inf")

    def record(self, rec: dict) -> dict:
        """A log record on its way to the log: an iteration's gets eta_s; TensorBoard gets its numbers."""
        if not self.on:
            return rec
        if "loss" in rec and not rec.get("resumed"):
            rec["eta_s"] = round(self.eta.left(rec["iter"] + 1), 2)
        if self.tb:
            self.tb.record(rec)
        return rec

    def iteration_done(self, done: int, bar, evaluated: bool = False):
        """After iteration done - 1 (and its evaluation or checkpoint): the bar's ETA, the page now and then."""
        if not self.on:
            return
        bar.set_postfix_str(f"run ends in ~{eta_mod.fmt_seconds(self.eta.left(done))}", refresh=False)
        if evaluated or time.monotonic() - self.last_report >= REPORT_EVERY_S:
            self.report("running")

    def started(self, bar):
        """Before the first iteration: the bar shows the probe's ETA, the page what the run will do."""
        if self.on:
            self.eta.t0 = time.monotonic()  # the measured rate counts the loop's iterations, not what came before
            bar.set_postfix_str(f"run ends in ~{eta_mod.fmt_seconds(self.eta.left(self.eta.start))}",
                                refresh=False)
            self.report("running")

    def report(self, status: str):
        write_report(self.out, self.log_path, self.options, self.plan, status, self.iters, self.written_estimate)
        self.last_report = time.monotonic()

    def close(self, finished: bool):
        """The last page (finished, or stopped by an error: the terminal says which) and the events' flush."""
        if not self.on:
            return
        try:
            if self.tb:
                self.tb.close()
            self.report("finished" if finished else "stopped")
        except OSError as e:
            if finished:
                raise
            log.warning("%s: could not write the report (%s)", Path(self.out), e)
