"""The README's code runs as written: every ```python block (in order, in one namespace, in a temp
folder), then every `miss-jax ...` line of its ```bash blocks, through the command's own `main`."""

from __future__ import annotations

import pathlib
import re
import shlex

from interop.cli import main as miss_jax_cli

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_a_quickstart():
    python = blocks(README.read_text(), "python")
    assert python, "README.md has no python code block"
    assert any("get_peft_model" in b for b in python)


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks(README.read_text(), "python")):
        try:
            exec(compile(block, f"README.md block {i}", "exec"), namespace)
        except Exception as e:  # name the block that failed
            raise AssertionError(f"README python block {i} failed:\n{block}") from e
    assert "trainable params:" in capsys.readouterr().out  # the quickstart's print_trainable_parameters ran
    commands = [line for b in blocks(README.read_text(), "bash") for line in b.splitlines()
                if line.startswith("miss-jax ")]
    assert len(commands) >= 4
    for line in commands:
        assert miss_jax_cli(shlex.split(line)[1:]) == 0, line
    assert "largest" in capsys.readouterr().out.lower()
