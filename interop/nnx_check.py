"""`miss-jax check --nnx`: a PEFT adapter on an NNX LLM (tunix) against PyTorch PEFT on its transformers twin.

The JAX side builds the NNX model from a transformers folder (`model.safetensors` in torch layout plus
`config.json`; `interop.tunix_models.from_transformers`, which makes tunix's model compute the folder's
PyTorch model or refuses the config) and loads the adapter through
`MissModel.from_pretrained(model, folder, name_map=...)` with the model's ready name map. The PyTorch side runs
`interop/peft_logits.py` as a script in `torch_python` (an interpreter with torch, transformers and peft):
tunix needs Python >= 3.12 and the newest jax, so the two sides may live in different environments; when
one environment has everything, `torch_python` is simply `sys.executable`. Both sides see the same random
token ids; the logits are compared.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from miss_jax import MissModel
from miss_jax.nnx import miss_layers

from .safetensors_io import read_config
from .torch_ref import DEFAULT_ATOL, CheckResult
from .tunix_models import FAMILIES, from_transformers, model_config, tunix_modules

TORCH_PYTHON_VARIABLE = "MISS_JAX_TORCH_PYTHON"
RELATIVE_ATOL = 5e-5  # of the largest |PyTorch logit|: the default tolerance on large logits
TORCH_SIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peft_logits.py")


def causal_logits(model: Callable[..., Any], ids: np.ndarray) -> np.ndarray:
    """A tunix LLM's logits `(batch, seq, vocab)` on token ids `(batch, seq)`, causal mask, no cache; float32
    matmuls at full precision (GPUs and TPUs would otherwise use TF32 / bfloat16 passes), as PyTorch's CPU."""
    import jax
    import jax.numpy as jnp

    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    with jax.default_matmul_precision("highest"):
        out, _ = model(jnp.asarray(ids), positions, None, mask)
    return np.asarray(out, np.float32)


def default_atol(reference: np.ndarray) -> float:
    """The check's tolerance when none is given: `DEFAULT_ATOL`, or `RELATIVE_ATOL` x the largest |logit| of
    the PyTorch `reference` when that is larger (float32 rounding grows with a real model's depth and scale:
    ~1e-4 on SmolLM2-135M's logits of scale ~30)."""
    return max(DEFAULT_ATOL, RELATIVE_ATOL * float(np.max(np.abs(reference))))


def torch_logits(torch_python: str, base_dir: str, adapter_dir: str, ids: np.ndarray) -> np.ndarray:
    """PyTorch PEFT's logits of `base_dir` + `adapter_dir` on `ids`, computed by `peft_logits.py` run in
    `torch_python`; ValueError with its one-line reason if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        ids_path, out_path = os.path.join(tmp, "ids.npy"), os.path.join(tmp, "logits.npy")
        np.save(ids_path, ids)
        try:
            done = subprocess.run([torch_python, TORCH_SIDE, base_dir, adapter_dir, ids_path, out_path],
                                  capture_output=True, text=True, timeout=3600)
        except OSError as e:
            raise ValueError(f"cannot run --torch-python {torch_python!r}: {e}") from None
        if done.returncode != 0 or not os.path.isfile(out_path):
            reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            raise ValueError(f"the PyTorch side ({torch_python}) failed: {reason}")
        return np.load(out_path)


def check_nnx(family_name: str, base_dir: str, adapter_dir: str, atol: Optional[float] = None, seq_len: int = 8,
              batch: int = 2, seed: int = 0, torch_python: Optional[str] = None) -> CheckResult:
    """Loads `adapter_dir` on the NNX model of `base_dir` (family `family_name`, e.g. 'tunix-qwen3') and on its
    transformers twin in PyTorch PEFT, runs the same random token ids `(batch, seq_len)`, compares logits
    within `atol` (default: `default_atol` of the PyTorch logits)."""
    family = FAMILIES[family_name]
    tunix_modules(family)  # first: without tunix nothing else can be checked
    read_config(adapter_dir)  # a clear error for a wrong folder before any model is loaded
    hf, _, _ = model_config(family, base_dir)
    model = MissModel.from_pretrained(from_transformers(base_dir, family_name), adapter_dir, name_map=family.name_map)
    ids = np.random.default_rng(seed).integers(0, hf["vocab_size"], (batch, seq_len)).astype(np.int64)
    jax_logits = causal_logits(model, ids)
    python = torch_python or os.environ.get(TORCH_PYTHON_VARIABLE) or sys.executable
    want = torch_logits(python, base_dir, adapter_dir, ids)
    if want.shape != jax_logits.shape:
        raise ValueError(f"the PyTorch logits are {want.shape}, the NNX model's {jax_logits.shape}: {base_dir!r} "
                         f"is not a {family_name} model.")
    zero = all(not np.any(np.asarray(layer.miss_block[n][...]))
               for layer in miss_layers(model.base_model).values() for n in layer.miss_block)
    diff = float(np.max(np.abs(jax_logits - want)))
    return CheckResult({"logits": diff}, default_atol(want) if atol is None else atol,
                       f"peft-miss via {python} (NNX: {family_name})",
                       zero and not model.adapters[model.active_adapter].saved)
