"""`slowllama COMMAND`: one command over the scripts' own code, with each subcommand's own help."""
from __future__ import annotations

import subprocess
import sys

import pytest

from slowllama.cli.main import COMMANDS, main


def test_overview_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name}" in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: slowllama {name}")  # the subcommand's name, not the module's file


def test_unknown_command_is_one_line(capsys):
    assert main(["fine-tune"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'fine-tune' is not a command" in err[0] and "finetune" in err[0]


def test_python_dash_m_runs_the_same_command():
    r = subprocess.run([sys.executable, "-m", "slowllama", "generate"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "usage: slowllama generate" in r.stderr  # argparse: MODEL_DIR is missing


def test_finetune_help_lists_every_option_once_in_its_group(capsys):
    from dataclasses import fields

    from slowllama.run.options import HELP_GROUPS, RunOptions

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    heads = [out.index(f"\n{title}:\n") for title in HELP_GROUPS.values()]
    assert heads == sorted(heads)  # the groups in RunOptions' order
    names = [f.name for f in fields(RunOptions)]
    starts = [names.index(first) for first in HELP_GROUPS]
    for i, f in enumerate(fields(RunOptions)):
        shown = f.name if f.metadata.get("positional") else RunOptions.flag(f.name)
        at = [k for k in range(len(out)) if out.startswith(f"  {shown} ", k) or out.startswith(f"  {shown}\n", k)]
        assert len(at) == 1, shown
        g = max(j for j, s in enumerate(starts) if s <= i)  # the group whose range holds this field
        end = heads[g + 1] if g + 1 < len(heads) else len(out)
        assert heads[g] < at[0] < end, f"{shown} is not under {list(HELP_GROUPS.values())[g]!r}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_help_lists_its_options_by_group(name, capsys):
    """Every option and positional sits under a heading of its own, none under argparse's catch-alls."""
    with pytest.raises(SystemExit):
        main([name, "--help"])
    out = capsys.readouterr().out
    sections = out.split("\n\n")
    assert not any(s.startswith("positional arguments:") for s in sections)
    for s in sections:
        if s.startswith("options:"):  # argparse's own: only --help
            assert [line.split()[0] for line in s.splitlines()[1:] if line.startswith("  -")] == ["-h,"]
    headings = [s.split("\n")[0] for s in sections if not s.startswith(("usage", "options:", " "))]
    assert any(h.endswith(":") for h in headings)

def test_export_is_the_tools_script(tmp_path, capsys):
    """`slowllama export` and tools/export_gguf.py: one command, one refusal of a folder that is no export."""
    from pathlib import Path

    args = [str(tmp_path), "--out", str(tmp_path / "m.gguf")]
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0]
    script = Path(__file__).resolve().parents[2] / "tools" / "export_gguf.py"
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == err
