"""The README's code runs as written: every ```python block on its own, each in a fresh interpreter (in
one temp folder, in order, so files a block writes are there for the next), then every `miss-jax ...`
line of its ```bash blocks, through the command's own `main`. (```console blocks show commands that
need other output, e.g. `make demo`'s, and are not run.)"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from interop.cli import main as miss_jax_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_a_quickstart():
    python = blocks(README.read_text(), "python")
    assert python, "README.md has no python code block"
    assert any("get_peft_model" in b for b in python)


def test_readme_says_how_to_activate_the_environment():
    assert "source .venv/bin/activate" in README.read_text()


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    printed = []
    for i, block in enumerate(blocks(README.read_text(), "python")):
        run = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, f"README python block {i} failed on its own:\n{block}\n{run.stderr[-3000:]}"
        printed.append(run.stdout)
    assert "trainable params:" in printed[0]  # the quickstart's print_trainable_parameters ran
    monkeypatch.chdir(tmp_path)
    commands = [line for b in blocks(README.read_text(), "bash") for line in b.splitlines()
                if line.startswith("miss-jax ")]
    assert len(commands) >= 4
    for line in commands:
        assert miss_jax_cli(shlex.split(line)[1:]) == 0, line
    assert "largest" in capsys.readouterr().out.lower()
