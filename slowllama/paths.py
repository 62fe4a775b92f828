"""What slowllama may delete, and who owns a folder right now.

slowllama deletes or replaces only what it can prove it wrote:
- temp files and folders whose names carry TMP_MARK (every atomic write makes them);
- inside a folder that holds its OWNER file (it created the folder), only entries
  whose names the folder's kind allows (see owned_names).

A folder with anything else in it is refused before any work. One process at a time
owns a work dir and an output folder: `FolderLock` holds an exclusive `flock` that the
kernel drops when the process dies, so a crash never leaves a stale lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
from pathlib import Path

from . import faults
from .errors import ConfigError
from .fsutil import TMP_MARK, atomic_write_json, fsync_dir

OLD_MARK = ".slowllama-old"  # an output folder moved aside while its replacement is renamed in
OWNER = ".slowllama"  # in every folder slowllama created: {"kind": "work" | "export"}
LOCK = ".slowllama.lock"

# The files each format writes into an export; the formats take their names from here, so what
# slowllama may replace in an --out it made is exactly what it writes.
META_FILES = [r"params\.json", r"consolidated\.\d+\.pth", r"tokenizer\.model"]
HF_SINGLE_FILE, HF_INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Files beside the weights that a Hugging Face export carries over unchanged (config.json is always kept).
HF_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "chat_template.jinja")
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
EXPORT_NAMES = META_FILES + [re.escape(n) for n in ("config.json", HF_SINGLE_FILE, HF_INDEX_FILE, *HF_SIDE_FILES,
                                                    PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE)] + [
    r"model-\d+-of-\d+\.safetensors", r"(model|adapter)-[a-z0-9_]+\.gguf", r"model-[a-z0-9_]+\.Modelfile"]


def gguf_file(gguf_type: str) -> str:
    """The GGUF file a run's --gguf TYPE writes beside its export (its Ollama Modelfile: model-TYPE.Modelfile)."""
    return f"model-{gguf_type}.gguf"


def adapter_gguf_file(gguf_type: str) -> str:
    """The GGUF LoRA adapter (llama.cpp's --lora) a LoRA run's --gguf TYPE writes beside its adapters."""
    return f"adapter-{gguf_type}.gguf"

# The names each kind of folder may hold, besides OWNER and LOCK. Anything else is the user's.
REPORT_FILE = "report.html"  # the run's page (run/report.py), rewritten as the run goes
RUN_FILES = [r"train_log\.jsonl", r"loss\.png", re.escape(REPORT_FILE), r"lora_adapters\.blk", r"checkpoint-\d+"]
CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # OUT/checkpoint-000100: the export after iteration 100
WORK_NAMES = [r"run\.json", r"store", r"base", r"acts", r"lora_adapters\.blk", r"reference"]


def owned_names(kind: str) -> list[str]:
    return WORK_NAMES if kind == "work" else [*EXPORT_NAMES, *RUN_FILES]


def is_tmp_of(entry: Path, target: Path) -> bool:
    """Whether entry is a temp file or folder that slowllama made for target."""
    return re.fullmatch(rf"\.{re.escape(target.name)}{re.escape(TMP_MARK)}\.\d+", entry.name) is not None


TMP_NAME = rf"\..+{re.escape(TMP_MARK)}\.\d+"  # any temp name of ours
OLD_NAME = rf"\..+{re.escape(OLD_MARK)}"  # a previous export moved aside during a swap


def remove_stale_tmp(target: Path):
    """Delete the temp files and folders that dead processes left for target (ours by name)."""
    parent = target.parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if is_tmp_of(entry, target) and not _pid_alive(int(entry.name.rsplit(".", 1)[1])):
            if entry.is_dir() and not entry.is_symlink():
                _carry_checkpoints(entry, target)  # a swap cut short had moved them here
                remove_tree(entry)
            else:
                entry.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers from an earlier failure in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_tree(path: Path):
    """rmtree for folders that slowllama made itself (temp names, its own subfolders)."""
    shutil.rmtree(path, ignore_errors=True)


def owner_info(folder: Path) -> dict:
    """What the OWNER file says of folder ({"kind": ..., and for an export "run", "step"}); {} if none."""
    try:
        info = json.loads((folder / OWNER).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def owner_kind(folder: Path) -> str | None:
    return owner_info(folder).get("kind")


def run_outputs(out: Path) -> list[tuple[Path, dict]]:
    """The folders in out (out itself, then its numbered checkpoints) that name the run which wrote them,
    with what their OWNER file says ({"kind": "export", "run": ..., "step": ..., "work_dir": ...})."""
    if not out.is_dir():
        return []
    folders = [out, *sorted(p for p in out.iterdir() if CHECKPOINT.fullmatch(p.name) and p.is_dir())]
    return [(f, info) for f in folders if (info := owner_info(f)).get("kind") == "export" and info.get("run")]


def foreign_entries(folder: Path, kind: str) -> list[str]:
    """Names in folder that slowllama did not write there. Temp and lock files are ours by
    name anywhere; the rest only in a folder that holds our OWNER file."""
    if not folder.is_dir():
        return []
    ours = [TMP_NAME, OLD_NAME, re.escape(LOCK)]
    if owner_kind(folder) == kind:
        ours += [re.escape(OWNER), *owned_names(kind)]
    allowed = re.compile("|".join(ours))
    return sorted(p.name for p in folder.iterdir() if not allowed.fullmatch(p.name))


def real_folder(path: str | Path) -> Path:
    """The absolute folder that path names, through any symlinks in it. An export replaces the output
    folder itself: given a link, it must replace the link's target, not turn the link into a folder."""
    return Path(os.path.realpath(path))


def check_not_under_a_file(path: Path, flag: str):
    """Refuse a path below a file (notes.txt/out): one line naming both, where the OS would only say ENOTDIR
    about whichever file it was making then."""
    for above in Path(path).absolute().parents:
        if above.exists():
            if not above.is_dir():
                raise ConfigError(f"{flag} {path}: {above} is a file, not a folder")
            return


def check_folder(folder: Path, kind: str, flag: str):
    """Refuse a folder that is a file, or below a file, or holds anything slowllama did not write."""
    check_not_under_a_file(folder, flag)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder}: exists and is not a folder")
    foreign = foreign_entries(folder, kind)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ConfigError(f"{flag} {folder}: holds files slowllama did not write ({shown}); "
                          f"choose an empty or new folder")


def claim_folder(folder: Path, kind: str, flag: str):
    """Create folder (or adopt an empty one) and mark it as slowllama's."""
    check_folder(folder, kind, flag)
    folder.mkdir(parents=True, exist_ok=True)
    if owner_kind(folder) != kind:
        mark_owned(folder, kind)


def mark_owned(folder: Path, kind: str, **info):
    atomic_write_json(folder / OWNER, {"kind": kind, **info})


def remove_owned(folder: Path, kind: str, keep_folder: bool = False):
    """Delete what slowllama wrote in folder, then the folder if that leaves it empty
    (keep_folder: leave the folder, its OWNER file and its lock)."""
    if owner_kind(folder) != kind:
        return
    foreign = set(foreign_entries(folder, kind))
    for p in folder.iterdir():
        if p.name in foreign or p.name in (LOCK, OWNER):
            continue
        remove_tree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    if keep_folder:
        return
    try:
        folder.joinpath(OWNER).unlink(missing_ok=True)
        folder.joinpath(LOCK).unlink(missing_ok=True)
        folder.rmdir()
    except OSError:
        pass  # something of the user's is still in it: it stays


def replace_dir(src: Path, dst: Path):
    """Move the finished export src to dst, replacing a previous export there (or an empty folder, whose
    permissions it keeps). dst must not be a symlink (see real_folder).

    POSIX cannot swap folders atomically, so the old dst is first renamed aside under
    OLD_MARK: a crash in between leaves either the old or the new one under a name
    `restore_interrupted_swap` recognises. Files in dst that slowllama did not write stop it.
    """
    check_folder(dst, "export", "--out")
    old = old_path(dst)
    if old.exists():
        remove_owned(old, "export")
    if dst.exists():
        _carry_checkpoints(dst, src)  # the run's numbered checkpoints stay in the output folder
        os.chmod(src, stat.S_IMODE(os.stat(dst).st_mode))  # a folder the user made private stays private
        os.replace(dst, old)
    faults.point("export_swap")
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old.exists():
        remove_owned(old, "export")
        with contextlib.suppress(OSError):
            old.rmdir()  # the empty folder a user made for the export (emptiness checked above); else it stays


def old_path(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}{OLD_MARK}")


def restore_interrupted_swap(dst: Path):
    """An export cut short between its two renames left the previous output aside: put it back."""
    old = old_path(dst)
    if not dst.exists() and old.is_dir() and owner_kind(old) == "export":
        os.replace(old, dst)
    if dst.is_dir():
        remove_stale_tmp(dst)


def _carry_checkpoints(src: Path, dst: Path):
    """Move the numbered checkpoints of export folder src into dst (each rename is atomic)."""
    if not (src.is_dir() and dst.is_dir()):
        return
    for c in src.iterdir():
        if CHECKPOINT.fullmatch(c.name) and c.is_dir() and not (dst / c.name).exists():
            os.replace(c, dst / c.name)


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step:06d}"


def prune_checkpoints(out: Path, keep: int):
    """Keep the newest `keep` numbered checkpoints in out; drop the rest and the temp folders
    that killed checkpoint exports left."""
    found = sorted((int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT.fullmatch(p.name)))
    for _, p in found[:max(0, len(found) - keep)]:
        remove_owned(p, "export")
    for p in out.iterdir():
        m = re.fullmatch(rf"\.(checkpoint-\d+){re.escape(TMP_MARK)}\.\d+", p.name)
        if m:
            remove_stale_tmp(out / m.group(1))


class FolderLock:
    """An exclusive (or shared) flock on a lock file, held until close or the process's death.

    remove=True deletes the lock file on close, for locks kept beside a folder rather than in
    it. That is safe because a process that got the lock checks that the path still names the
    file it locked; one that locked a file unlinked meanwhile tries again.
    """

    def __init__(self, path: Path, what: str, shared: bool = False, remove: bool = False):
        self.path, self.remove = path, remove and not shared
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(self.fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise ConfigError(f"{what} is in use by another slowllama process (pid {holder}); "
                                      f"wait for it to finish or stop it") from e
                raise
            try:
                if os.stat(path).st_ino == os.fstat(self.fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(self.fd)  # the holder before us removed this file as we opened it
        if not shared:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def close(self):
        if self.fd >= 0:
            if self.remove:
                self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing releases the flock
            self.fd = -1


def lock_work_dir(work_dir: Path, shared: bool = False) -> FolderLock:
    return FolderLock(work_dir / LOCK, f"--work-dir {work_dir}", shared, remove=True)


def lock_out_dir(out: Path) -> FolderLock:
    # Each export replaces the output folder itself, so its lock lives beside it, while held.
    return FolderLock(out.with_name(f".{out.name}{LOCK}"), f"--out {out}", remove=True)
