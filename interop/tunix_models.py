"""tunix's LLMs (Qwen 3, Llama 3; Flax NNX) built from a transformers folder so that they compute the folder's
PyTorch model (`AutoModelForCausalLM.from_pretrained(folder)`, float32).

`from_transformers(folder)` reads `config.json`, builds tunix's `ModelConfig` and loads `model.safetensors`
with tunix's `create_model_from_safe_tensors`, and fixes what tunix (0.1.7) would compute differently:

  * RoPE: tunix's attention calls its `apply_rope(x, positions, head_dim=...)`, whose `rope_theta` defaults to
    1e6; `ModelConfig.rope_theta` is never read and there is no `rope_scaling`. Every attention module gets a
    subclass whose `block` is tunix's own code with `apply_rope` bound to `miss_jax.rope.rotate` at the folder's
    frequencies (`rope_theta`, `rope_scaling` of type default / linear / llama3), as transformers computes them.
  * dtype: weights are loaded in float32 (the PyTorch side's dtype), whatever dtype the folder stores.
  * tied head: `tie_word_embeddings` becomes tunix's `weight_tying` / `use_tied_embedding` (the embedding
    decodes); an untied folder must hold `lm_head.weight`.

What tunix's models cannot follow is refused with a ValueError naming the `config.json` field (another
`rope_scaling` type, attention or MLP biases, a non-SiLU activation, sliding windows, partial rotary, MoE)
rather than built into a model whose logits differ.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import sys
import types
from typing import Any, Optional

import numpy as np

from miss_jax import rope

from . import nnx_io

SCALING_TYPES = ("default", "linear", "llama3")  # rope_scaling types tunix's models follow (RoPE frequencies only)


@dataclasses.dataclass(frozen=True)
class NnxFamily:
    """An NNX LLM family built from transformers folders: its `model_type`, the tunix module holding
    `ModelConfig` / `create_model_from_safe_tensors`, the config's tied-embedding field, and the name map."""

    model_type: str
    package: str
    tied_field: str
    name_map: nnx_io.NameMap


FAMILIES = {
    "tunix-qwen3": NnxFamily("qwen3", "tunix.models.qwen3", "use_tied_embedding", nnx_io.TUNIX_QWEN3),
    "tunix-llama3": NnxFamily("llama", "tunix.models.llama3", "weight_tying", nnx_io.TUNIX_LLAMA3),
}

# config.json fields tunix's models have no counterpart for: (field, the value transformers computes without it)
UNSUPPORTED = (("attention_bias", False), ("mlp_bias", False), ("use_sliding_window", False),
               ("partial_rotary_factor", 1.0), ("num_experts", 0), ("hidden_act", "silu"))


def tunix_modules(family: NnxFamily) -> tuple[Any, Any]:
    """tunix's `model` and `params` modules of `family` (ValueError naming the install if tunix is absent)."""
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


def read_hf_config(base_dir: str) -> dict[str, Any]:
    """The `config.json` of a transformers folder (ValueError if there is none)."""
    path = os.path.join(base_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{base_dir!r} is not a transformers model folder (no config.json).")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def family_of(base_dir: str) -> str:
    """The `FAMILIES` name that builds the folder's `model_type` (ValueError naming the supported ones)."""
    model_type = read_hf_config(base_dir).get("model_type")
    for name, family in FAMILIES.items():
        if family.model_type == model_type:
            return name
    raise ValueError(f"{base_dir}: model_type {model_type!r} has no tunix model here; supported: "
                     f"{', '.join(f'{f.model_type} ({k})' for k, f in FAMILIES.items())}.")


def rope_settings(hf: dict[str, Any]) -> tuple[float, Optional[dict[str, Any]]]:
    """`(rope_theta, rope_scaling)` of a config.json: transformers 4.x fields, or 5.x's `rope_parameters`."""
    parameters = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", parameters.get("rope_theta"))
    return theta, hf.get("rope_scaling") or {k: v for k, v in parameters.items() if k != "rope_theta"} or None


def model_config(family: NnxFamily, base_dir: str) -> tuple[dict[str, Any], Any, np.ndarray]:
    """`(config.json, tunix ModelConfig, RoPE inverse frequencies (head_dim // 2,))` of a transformers folder;
    ValueError naming the field that tunix's model cannot follow (its logits would differ from transformers')."""
    hf = read_hf_config(base_dir)
    path = os.path.join(base_dir, "config.json")
    if hf.get("model_type") != family.model_type:
        raise ValueError(
            f"{path}: model_type is {hf.get('model_type')!r}, but this --nnx family builds {family.model_type!r} "
            f"models; pick the --nnx that matches ({', '.join(f'{k}: {v.model_type}' for k, v in FAMILIES.items())})."
        )
    unsupported = {k: hf[k] for k, neutral in UNSUPPORTED if hf.get(k, neutral) != neutral}
    if unsupported:
        raise ValueError(f"{path}: tunix's {family.model_type} model has no {unsupported}; it cannot match this "
                         "model's PyTorch logits. Use a folder without these settings.")
    theta, scaling = rope_settings(hf)
    needed = ("num_hidden_layers", "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
              "rms_norm_eps")
    missing = [k for k in needed if k not in hf] + (["rope_theta"] if theta is None else [])
    if missing:
        raise ValueError(f"{path} lacks {missing}; re-save the model with transformers' save_pretrained.")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    kind = rope.scaling_type(scaling)
    try:
        if kind not in SCALING_TYPES:
            raise ValueError(f"rope_scaling type {kind!r} is not supported (only {', '.join(SCALING_TYPES)}): it "
                             "changes the attention beyond the rotary frequencies.")
        inv_freq, _ = rope.frequencies(head_dim, theta, scaling)
    except ValueError as e:
        raise ValueError(f"{path}: {e} tunix's model cannot match this model's PyTorch logits; use a folder whose "
                         f"rope_scaling is one of {', '.join(SCALING_TYPES)}.") from None
    module, _ = tunix_modules(family)
    config = module.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=heads, head_dim=head_dim,
        num_kv_heads=hf.get("num_key_value_heads") or heads, rope_theta=theta, norm_eps=hf["rms_norm_eps"],
        **{family.tied_field: bool(hf.get("tie_word_embeddings", False))},
    )
    return hf, config, inv_freq


@functools.cache
def rope_attention(attention: type, inv_freq: tuple[float, ...]) -> type:
    """A subclass of tunix's attention class `attention` whose `block` runs tunix's own code with its
    module-level `apply_rope` bound to `rope.rotate` at `inv_freq` (one class per class and frequencies).
    ValueError if this tunix's `block` does not call `apply_rope` (a tunix whose attention miss-jax cannot set)."""
    module = sys.modules[attention.__module__]
    block = attention.block
    if "apply_rope" not in block.__code__.co_names or not callable(getattr(module, "apply_rope", None)):
        raise ValueError(f"{attention.__module__}.{attention.__name__}.block does not call apply_rope: this tunix "
                         "version's RoPE cannot be set to the folder's rope_theta; use google-tunix 0.1.7.")
    frequencies = np.asarray(inv_freq, np.float32)

    def apply_rope(inputs: Any, positions: Any, head_dim: int = 0, rope_theta: Any = None) -> Any:
        """tunix's `apply_rope` signature; the frequencies are the folder's, not `rope_theta`'s."""
        return rope.rotate(inputs, positions, frequencies)

    scope = {**vars(module), "apply_rope": apply_rope}
    rebound = types.FunctionType(block.__code__, scope, block.__name__, block.__defaults__, block.__closure__)
    rebound.__kwdefaults__ = block.__kwdefaults__
    rebound.__doc__ = f"tunix's {attention.__name__}.block with the folder's RoPE (miss_jax.rope.rotate)."
    return type(attention.__name__, (attention,), {"block": rebound, "__module__": __name__})


def set_rope(model: Any, inv_freq: np.ndarray) -> None:
    """Gives every attention module of a tunix LLM (`model.layers[i].attn`) RoPE at `inv_freq` `(head_dim // 2,)`."""
    for layer in model.layers:
        attention = type(layer.attn)
        base = attention.__mro__[1] if attention.__module__ == __name__ else attention
        object.__setattr__(layer.attn, "__class__", rope_attention(base, tuple(float(f) for f in inv_freq)))


def weight_names(base_dir: str) -> set[str]:
    """The tensor names of the folder's `*.safetensors` files (ValueError if it has none: tunix loads only
    safetensors)."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(base_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{base_dir!r} has no *.safetensors weights (tunix loads only those); re-save the model "
                         "with save_pretrained(..., safe_serialization=True).")
    names: set[str] = set()
    for name in files:
        with safe_open(os.path.join(base_dir, name), "np") as f:
            names.update(f.keys())
    return names


def from_transformers(base_dir: str, family_name: Optional[str] = None) -> Any:
    """tunix's model of the transformers folder `base_dir` (float32, RoPE and head as the folder's config
    says); `family_name` (a `FAMILIES` key) defaults to the one of the folder's `model_type`. ValueError
    naming the field for a config tunix cannot follow, or for an untied folder without `lm_head.weight`."""
    if family_name is not None and family_name not in FAMILIES:
        raise ValueError(f"Unknown tunix family {family_name!r}; pick one of {sorted(FAMILIES)}.")
    family = FAMILIES[family_name or family_of(base_dir)]
    _, config, inv_freq = model_config(family, base_dir)
    _, params = tunix_modules(family)
    import jax.numpy as jnp

    if not getattr(config, family.tied_field) and "lm_head.weight" not in weight_names(base_dir):
        raise ValueError(f"{base_dir}: the weights have no lm_head.weight, and config.json does not tie the head to "
                         "the embedding; if the model ties them, its config.json needs tie_word_embeddings: true.")
    model = params.create_model_from_safe_tensors(base_dir, config, dtype=jnp.float32)
    set_rope(model, inv_freq)
    return model
