"""The PyTorch side of the NNX tests: `tests/torch_twin.py` run by the interpreter `$MISS_JAX_TORCH_PYTHON` (the
modern environment has no torch; `make test-modern` points it at `.venv`'s)."""

from __future__ import annotations

import os
import subprocess

TORCH_PYTHON = os.environ.get("MISS_JAX_TORCH_PYTHON")
TWIN = os.path.join(os.path.dirname(__file__), "torch_twin.py")


def torch_side(*args: str) -> None:
    """Runs `torch_twin.py *args` in the torch interpreter; a failure shows the end of its stderr."""
    done = subprocess.run([TORCH_PYTHON, TWIN, *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
