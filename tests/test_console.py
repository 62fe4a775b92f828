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
