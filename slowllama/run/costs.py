"""What a run will cost, printed before iteration 0: store size, RAM plan, disk bytes and SSD wear."""
from __future__ import annotations

import math

from ..device import memory_budget
from ..engine.commits import AUTO_EVERY, AUTO_SECONDS
from ..engine.store import BlockStore
from ..engine.trainer import TrainConfig
from ..engine.update import tied_grad_in_ram
from .options import RunOptions

WEAR_WARNING_BYTES = 1e12  # a run that writes more is told what that costs a laptop's SSD


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def distributed_line(store: BlockStore, tcfg: TrainConfig, est: dict, world: int, batch_size: int) -> str:
    """What a data-parallel run reads, writes and communicates per iteration: per rank and in all.
    est is one rank's (its rows); a rank that does not write the store writes its activation
    scratch and its own boundary gradients (journal.py)."""
    grad = sum(math.prod(shape) * 4 for name in store.trainable for key, _, shape, _ in store.header(name)["tensors"]
               if "#" not in key) if tcfg.lora is None else 0
    other = est["activations"] + est["gradients"]
    passes = 2 if tcfg.clip_grad_norm and tcfg.lora is None else 1  # the norm-only pass all-reduces too
    return (f"data parallel: {world} ranks x --batch-size {batch_size} = a global batch of {world * batch_size}; "
            f"per iteration, rank 0 reads ~{fmt_bytes(est['read'])} and writes ~{fmt_bytes(est['written'])}, "
            f"each other rank reads ~{fmt_bytes(est['read'])} and writes ~{fmt_bytes(other)} "
            f"(all ranks: ~{fmt_bytes(world * est['read'])} read, "
            f"~{fmt_bytes(est['written'] + (world - 1) * other)} written, when they share one work dir); each rank "
            f"all-reduces " + (f"~{fmt_bytes(passes * grad)} of gradients" if grad else "its adapters' gradients")
            + " per iteration")


def print_costs(o: RunOptions, store: BlockStore, ckpt, tcfg: TrainConfig, est: dict, step: int, lora, resume: bool,
                saved: dict, validation: bool, torch_device, world: int) -> list[str]:
    """What the run will cost, before iteration 0: the store, the RAM budget, disk bytes (and SSD wear),
    tied embeddings, evaluations, data parallelism and the lr schedule. Returns the lines printed."""
    lines = []

    def say(line: str):  # each line also goes to the report page
        print(line)
        lines.append(line)

    remaining = o.iters - step
    say(f"store: {fmt_bytes(store.nbytes())} ({str(store.dtype).removeprefix('torch.')}) at {store.root}; "
          f"checkpoint: {fmt_bytes(sum(p.stat().st_size for p in ckpt.shards))}")
    if store.base_quant:
        print(base_quant_line(store, ckpt, est))
    held = "no limit" if tcfg.ram_budget is None else fmt_bytes(tcfg.ram_budget)
    plan, n = est["plan"], len(store.trainable)
    cache = "no limit" if math.isinf(plan.cache_budget) else fmt_bytes(plan.cache_budget)
    below = "nothing is recomputed" if plan.top <= plan.lowest else (
        f"{plan.top - plan.lowest} modules below it are recomputed from cached inputs "
        f"(~{fmt_bytes(plan.act_bytes)}, {'in RAM' if plan.acts_in_ram else 'in scratch files'})")
    say(f"RAM budget: {held} (--ram-budget {o.ram_budget}): the turn holds {n - plan.top} of {n} modules "
          f"(K = {plan.turn_blocks} beyond the minimal three, ~{fmt_bytes(plan.turn_bytes)} more), {below}; "
          f"modules cached: up to {cache} (the estimate below counts all of it)")
    say(commits_line(o, tcfg, est, bool(lora), world))
    say(f"disk per iteration: ~{fmt_bytes(est['read'])} read, ~{fmt_bytes(est['written'])} written; "
          f"for {remaining} iterations: ~{fmt_bytes(est['read'] * remaining)} read, "
          f"~{fmt_bytes(est['written'] * remaining)} written ({est['written'] * remaining / 1e12:.2f} TB)")
    if est["written"] * remaining > WEAR_WARNING_BYTES:
        cheaper = [c for c, on in (("--store-dtype bfloat16", o.store_dtype == "float32" and not lora),
                                   ("LoRA (--lora-rank 8)", not lora)) if on]
        say(f"warning: this run writes {est['written'] * remaining / 1e12:.1f} TB to {store.root}'s disk "
              f"({fmt_bytes(est['written'])} per iteration), a large share of a consumer SSD's rated endurance"
              + (f"; cheaper: {', '.join(cheaper)}" if cheaper else ""))
    if o.clip_grad_norm and not lora:
        say(f"gradient clipping: a norm-only reverse pass recomputes every module below the turn, "
              f"reading ~{fmt_bytes(est['clip'])} more per iteration (counted above) and writing nothing")
    if store.args.tie_word_embeddings and not lora:
        where = "kept in RAM" if tied_grad_in_ram(tcfg, store.args) else "written to disk and read back"
        say(f"tied embeddings: the output side's gradient ({fmt_bytes(store.args.vocab_size * store.args.dim * 4)}) "
              f"is {where} each iteration (a --ram-budget that holds it keeps it in RAM); tying adds "
              f"~{fmt_bytes(est['tied'])} of disk traffic per iteration, counted above")
    evals = eval_reads(o, step, store.nbytes(), validation, memory_budget(torch_device))
    if evals:
        say(f"evaluations: ~{fmt_bytes(evals)} more read (validation passes read the store once each; a "
              f"completion reads it once, or once per token when it does not fit the device)")
    if world > 1:
        say(distributed_line(store, tcfg, est, world, o.batch_size))
    if resume and o.lr_schedule != "constant" and o.iters != saved["iters"]:
        say(f"the lr schedule now spans {o.iters} iterations (it spanned {saved['iters']})")
    return lines


def commits_line(o: RunOptions, tcfg: TrainConfig, est: dict, lora: bool, world: int) -> str:
    """How often the store is written (--commit-every, engine/commits.py), and so how much work a crash loses."""
    every, flag = est["commit_every"], f"--commit-every {o.commit_every}"
    if every > 1:
        sooner = (f", or sooner once {AUTO_EVERY} would pass {AUTO_SECONDS / 60:g} minutes of measured step time"
                  if tcfg.commit_every is None else "")
        return (f"commits: the budget holds every module, so the updated modules stay in RAM and go to the store "
                f"every {every} iterations ({flag}{sooner}) and before every evaluation, checkpoint and the export: "
                f"a crash loses at most the last {every} iterations, which --resume replays exactly")
    why = ("LoRA: the base is never written, the adapters are saved" if lora else
           "data parallel: every host's store must agree at each step" if world > 1 else
           "--commit-every 1" if tcfg.commit_every == 1 else
           f"{flag} needs a --ram-budget that holds every module beside the step, and this one does not")
    return (f"commits: every iteration ({why}): a crash loses at most the iteration in flight, which --resume "
            f"finishes or runs again")


def base_quant_line(store: BlockStore, ckpt, est: dict) -> str:
    """Whether the quantized base stays in RAM (no base reads at the steady state) or is streamed."""
    base_read = est["read"] - est["activations"]  # a LoRA step reads the base and the cached inputs, nothing else
    where = ("it fits the RAM budget and stays resident: no base reads per iteration" if base_read == 0 else
             f"it does not fit the RAM budget: streamed at its quantized size, ~{fmt_bytes(base_read)} read per iteration")
    return (f"base: the blocks' linear weights in {store.base_quant} (--base-quant), {fmt_bytes(store.nbytes())} "
            f"against {fmt_bytes(sum(p.stat().st_size for p in ckpt.shards))} as the checkpoint has them; {where}")


def eval_reads(o: RunOptions, start: int, store_bytes: int, validation: bool, device_budget: int) -> int:
    """Disk bytes the run's validation passes and sample completions will read, from iteration start on."""
    points = {i for i in range(o.eval_every, o.iters, o.eval_every)} if o.eval_every else set()
    points = {i for i in points | {o.iters} | ({0} if start == 0 else set()) if i >= start}
    per_completion = store_bytes * (1 if store_bytes <= device_budget else o.gen_tokens)
    return len(points) * (store_bytes * validation + per_completion * bool(o.prompt))
