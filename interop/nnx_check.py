"""`miss-jax check --nnx`: a PEFT adapter on an NNX LLM (tunix) against PyTorch PEFT on its transformers twin.

The JAX side builds the NNX model from a transformers folder (`model.safetensors` in torch layout plus
`config.json`; tunix's `create_model_from_safe_tensors`) and loads the adapter through
`interop.nnx_io.from_pretrained` with the model's ready name map. The PyTorch side runs
`interop/peft_logits.py` as a script in `torch_python` (an interpreter with torch, transformers and peft):
tunix needs Python >= 3.12 and the newest jax, so the two sides may live in different environments; when
one environment has everything, `torch_python` is simply `sys.executable`. Both sides see the same random
token ids; the logits are compared.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from miss_jax.nnx import miss_layers

from . import nnx_io
from .safetensors_io import read_config
from .torch_ref import CheckResult

TORCH_PYTHON_VARIABLE = "MISS_JAX_TORCH_PYTHON"
TORCH_SIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peft_logits.py")


@dataclasses.dataclass(frozen=True)
class NnxFamily:
    """An NNX LLM family the check can build: its transformers `model_type`, the tunix module holding
    `ModelConfig` / `create_model_from_safe_tensors`, the config's tied-embedding field, and the name map."""

    model_type: str
    package: str
    tied_field: str
    name_map: nnx_io.NameMap


FAMILIES = {
    "tunix-qwen3": NnxFamily("qwen3", "tunix.models.qwen3", "use_tied_embedding", nnx_io.TUNIX_QWEN3),
    "tunix-llama3": NnxFamily("llama", "tunix.models.llama3", "weight_tying", nnx_io.TUNIX_LLAMA3),
}


def _tunix(family: NnxFamily) -> tuple[Any, Any]:
    """tunix's `model` and `params` modules of `family` (ValueError naming the install if tunix is absent)."""
    import importlib

    try:
        model = importlib.import_module(family.package + ".model")
        params = importlib.import_module(family.package + ".params")
    except ImportError as e:
        raise ValueError(
            f"--nnx needs google-tunix ({e}): pip install 'miss-jax[tunix]' (Python >= 3.12), or run "
            "`make venv-modern` and use .venv-modern/bin/miss-jax."
        ) from None
    nnx_io.tunix_rules()
    return model, params


def model_config(family: NnxFamily, base_dir: str) -> tuple[dict[str, Any], Any]:
    """`(config.json, tunix ModelConfig)` of a transformers folder; ValueError naming the field that tunix's
    model cannot follow (its logits would differ from transformers')."""
    path = os.path.join(base_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{base_dir!r} is not a transformers model folder (no config.json).")
    with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    if hf.get("model_type") != family.model_type:
        raise ValueError(
            f"{path}: model_type is {hf.get('model_type')!r}, but this --nnx family builds {family.model_type!r} "
            f"models; pick the --nnx that matches ({', '.join(f'{k}: {v.model_type}' for k, v in FAMILIES.items())})."
        )
    unsupported = {k: hf[k] for k in ("rope_scaling", "attention_bias", "mlp_bias", "num_experts") if hf.get(k)}
    if unsupported:
        raise ValueError(f"{path}: tunix's {family.model_type} model has no {unsupported}; it cannot match this "
                         "model's PyTorch logits.")
    rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta"))
    missing = [k for k in ("num_hidden_layers", "vocab_size", "hidden_size", "intermediate_size",
                           "num_attention_heads", "rms_norm_eps") if k not in hf] + (["rope_theta"] if rope_theta is None else [])
    if missing:
        raise ValueError(f"{path} lacks {missing}; re-save the model with transformers' save_pretrained.")
    heads = hf["num_attention_heads"]
    module, _ = _tunix(family)
    config = module.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, rope_theta=rope_theta, norm_eps=hf["rms_norm_eps"],
        **{family.tied_field: bool(hf.get("tie_word_embeddings", False))},
    )
    return hf, config


def nnx_model(family: NnxFamily, base_dir: str) -> Any:
    """The tunix model of the transformers folder `base_dir` (float32)."""
    _, config = model_config(family, base_dir)
    _, params = _tunix(family)
    return params.create_model_from_safe_tensors(base_dir, config)


def causal_logits(model: Callable[..., Any], ids: np.ndarray) -> np.ndarray:
    """A tunix LLM's logits `(batch, seq, vocab)` on token ids `(batch, seq)`, causal mask, no cache."""
    import jax.numpy as jnp

    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    out, _ = model(jnp.asarray(ids), positions, None, mask)
    return np.asarray(out, np.float32)


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


def check_nnx(family_name: str, base_dir: str, adapter_dir: str, atol: float = 1e-4, seq_len: int = 8,
              batch: int = 2, seed: int = 0, torch_python: Optional[str] = None) -> CheckResult:
    """Loads `adapter_dir` on the NNX model of `base_dir` (family `family_name`, e.g. 'tunix-qwen3') and on its
    transformers twin in PyTorch PEFT, runs the same random token ids `(batch, seq_len)`, compares logits."""
    family = FAMILIES[family_name]
    _tunix(family)  # first: without tunix nothing else can be checked
    read_config(adapter_dir)  # a clear error for a wrong folder before any model is loaded
    hf, _ = model_config(family, base_dir)
    model = nnx_io.from_pretrained(nnx_model(family, base_dir), adapter_dir, family.name_map)
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
    return CheckResult({"logits": diff}, atol, f"peft-miss via {python} (NNX: {family_name})",
                       zero and not model.adapters[model.active_adapter].saved)
