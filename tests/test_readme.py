"""Every ```python block of the README runs as written (in order, in one namespace, in a temp folder)."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_a_quickstart():
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no python code block"
    assert any("get_peft_model" in b for b in blocks)


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(python_blocks(README.read_text())):
        try:
            exec(compile(block, f"README.md block {i}", "exec"), namespace)
        except Exception as e:  # name the block that failed
            raise AssertionError(f"README python block {i} failed:\n{block}") from e
    assert "trainable params:" in capsys.readouterr().out  # the quickstart's print_trainable_parameters ran
