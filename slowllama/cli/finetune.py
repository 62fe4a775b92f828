"""Fine-tune a Llama-family checkpoint (Hugging Face or Meta format) that does not fit in memory, streaming it from SSD.

    slowllama finetune                        # demo: a tiny model learns a new fact (python finetune.py too)
    slowllama finetune path/to/llama-2-7b --data notes.txt
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from slowllama.engine.trainer import NonFiniteError
from slowllama.errors import ConfigError
from slowllama.fsutil import WriteError
from slowllama.paths import check_folder, lock_work_dir, remove_owned
from slowllama.run.loop import default_dirs, finetune, verify_store
from slowllama.run.options import add_arguments, read_config

# The demo's model and fact ship inside the package, so that the demo runs from any directory after pip install.
DEMO_ROOT = Path(__file__).resolve().parents[1] / "demo"
DEMO_MODEL = DEMO_ROOT / "tiny"
DEMO_DATA = DEMO_ROOT / "demo_fact.txt"
# Chosen so that the tiny model learns the demo fact in about a minute on 2 cores.
DEMO = dict(iters=40, batch_size=4, seq_len=48, optimizer="adamw", lr=3e-3, eval_every=20, gen_tokens=40)


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                epilog="With no arguments at all, runs the demo (a tiny model bundled with slowllama) "
                                       "into ./demo-out.")
    add_arguments(p)
    run = p.add_argument_group("resume, check and configure")
    run.add_argument("--resume", action="store_true", help="continue the run in --work-dir exactly where it stopped; "
                     "only --iters (to extend) and --device, --ram-budget, --no-prefetch, --no-verify, --stop-on-nan "
                     "may differ from the saved run")
    run.add_argument("--verify", action="store_true", help="check every module of the block store in --work-dir "
                     "against its checksums, then exit")
    run.add_argument("--config", help="a TOML or JSON file of options (a run's run.json is one); flags given here win")
    run.add_argument("-v", "--verbose", action="store_true", help="log more")
    return p


def main(argv=None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        return demo(Path("demo-out"))
    a = vars(parser(prog).parse_args(argv))
    resume, check, verbose, config = a.pop("resume"), a.pop("verify"), a.pop("verbose"), a.pop("config")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if config:
            a = {**read_config(config), **a}
        if not a.get("model_dir"):
            raise ConfigError("MODEL_DIR is required (only `finetune.py` with no arguments at all runs the demo)")
        if check:
            return verify(a)
        summary = finetune(resume=resume, **a)
    except (ConfigError, OSError, NonFiniteError) as e:
        more = " with --resume" if isinstance(e, WriteError) and _run_to_resume(a) else ""
        print(f"error: {e}{more}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteError) else 2
    except KeyboardInterrupt:
        print("interrupted: the store holds the last committed state; resume with --resume" if _run_to_resume(a) else
              "interrupted before the run began: nothing to resume; run the command again", file=sys.stderr)
        return 130
    if not summary.get("nothing_to_do") and summary.get("rank", 0) == 0:  # under torchrun, rank 0 speaks
        print(f"tuned model: {summary['out']}")
    return 0


def _run_to_resume(a: dict) -> bool:
    """Whether the work dir these options name holds a run (its run.json, written once the store is prepared)."""
    if not a.get("model_dir"):
        return False
    _, work_dir = default_dirs(Path(a["model_dir"]).absolute(), a.get("out"), a.get("work_dir"))
    return (work_dir / "run.json").is_file()


def demo(root: Path) -> int:
    """The tiny model learns the demo fact; it writes only root/tiny-work and root/tiny-tuned,
    and starts them afresh each time (they are slowllama's own folders)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out, work = root / "tiny-tuned", root / "tiny-work"
    prompt = DEMO_DATA.read_text(encoding="utf-8").split(",")[0].split(".")[0][:40].rsplit(" ", 1)[0]
    print(f"demo: fine-tuning the bundled {DEMO_MODEL.name} model on {DEMO_DATA.name}")
    try:
        check_folder(work, "work", "demo: folder")
        if work.exists():
            lock = lock_work_dir(work)  # a demo running in another terminal keeps its files
            remove_owned(work, "work", keep_folder=True)
            lock.close()
        # The demo's out holds the previous demo's export, of another run since its work dir was emptied.
        summary = finetune(model_dir=str(DEMO_MODEL), data=str(DEMO_DATA), out=str(out), work_dir=str(work),
                           prompt=prompt, overwrite_out=True, **DEMO)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nprompt:  {prompt!r}\nbefore:  {summary.get('before')!r}\nafter:   {summary.get('after')!r}")
    print(f"tuned model: {summary['out']}")
    return 0


def verify(a: dict) -> int:
    problems = verify_store(model_dir=a["model_dir"], out=a.get("out"), work_dir=a.get("work_dir"))
    for line in problems:
        print(f"problem: {line}", file=sys.stderr)
    print("store verified: no problems" if not problems else f"{len(problems)} problem(s) found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
