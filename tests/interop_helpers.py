"""Shared helpers for the cross-framework tests: PyTorch twins of the tiny Flax models, real PEFT.

`torch_twin(arch, params)` builds the torch model of `tiny_models`' architecture holding the given
Flax params, converted by transformers' own `load_flax_weights_in_pytorch_model` (so the name
mapping under test is checked against transformers', not against itself).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import jax
import numpy as np
import peft
import torch
from peft.utils import load_peft_weights
from safetensors import safe_open
from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model
from transformers.utils import logging as hf_logging

import tiny_models as tm

ATOL = 1e-4
hf_logging.set_verbosity_error()


def torch_twin(arch: str, params: Optional[Mapping] = None) -> torch.nn.Module:
    """A fresh torch model of `arch` (eval mode) with `params` (default: `tm.flax_model(arch).params`)."""
    model = tm.torch_class(arch)(tm.config(arch))
    params = tm.flax_model(arch).params if params is None else params
    with warnings.catch_warnings():  # transformers hands torch.from_numpy read-only arrays (it copies them)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return load_flax_weights_in_pytorch_model(model, jax.device_get(params)).eval()


def torch_inputs(arch: str) -> dict[str, torch.Tensor]:
    """`tm.inputs(arch)` as torch tensors (int64 ids, float32 pixels)."""
    return {k: torch.from_numpy(v).long() if v.dtype.kind == "i" else torch.from_numpy(v)
            for k, v in tm.inputs(arch).items()}


def torch_outputs(model: torch.nn.Module, arch: str) -> np.ndarray:
    """float32 logits `(batch, ...)` of a torch (PEFT) model on `tm.inputs(arch)`."""
    with torch.no_grad():
        return model(**torch_inputs(arch)).logits.float().numpy()


def jax_outputs(model: Any, arch: str) -> np.ndarray:
    """float32 logits of a MissModel (or Flax model) on `tm.inputs(arch)`."""
    return np.asarray(model(**tm.inputs(arch)).logits, dtype=np.float32)


def randomize_trainables(model: peft.PeftModel, seed: int, scale: float = 0.5) -> None:
    """Gives every trainable tensor of a torch PEFT model random values (PEFT's zero init would prove nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # bias="all" also marks `original_module` biases trainable, but they sit outside the forward
            # while the copy is active, so training never changes them: leave them as they are.
            if p.requires_grad and ".original_module." not in name:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def perturb_trainables(miss_model: Any, seed: int, scale: float = 0.1) -> None:
    """Adds noise to a MissModel's `trainable_params()` (blocks, module copies, biases), as training would."""
    leaves, treedef = jax.tree_util.tree_flatten(miss_model.trainable_params())
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    miss_model.update_params(jax.tree_util.tree_unflatten(treedef, noisy))


def torch_peft_model(arch: str, configs: Mapping[str, peft.MissConfig], seed: int = 0) -> peft.PeftModel:
    """A torch PEFT model of `arch` with adapters `configs` (name -> config, first one active), all randomized."""
    (first, config), *rest = configs.items()
    model = peft.get_peft_model(torch_twin(arch), config, adapter_name=first)
    for name, cfg in rest:
        model.add_adapter(name, cfg)
    for i, name in enumerate(configs):
        model.set_adapter(name)  # makes `name` trainable
        randomize_trainables(model, seed + i)
    model.set_adapter(first)
    return model.eval()


def load_in_torch(arch: str, folder: str, adapters: Iterable[str] = ()) -> peft.PeftModel:
    """`PeftModel.from_pretrained(twin, folder)` plus each extra adapter from `folder/<name>`.

    Asserts PEFT finds every adapter key it expects and no key it does not know: `unexpected` must be
    empty and every `miss_block` / `modules_to_save` parameter of the model must have been loaded.
    """
    model = peft.PeftModel.from_pretrained(torch_twin(arch), folder)
    for name in adapters:
        model.load_adapter(os.path.join(folder, name), name)
    for name, sub in [("default", folder)] + [(n, os.path.join(folder, n)) for n in adapters]:
        result = peft.set_peft_model_state_dict(model, load_peft_weights(sub), adapter_name=name)
        assert result.unexpected_keys == [], result.unexpected_keys
        lost = [k for k in result.missing_keys if f".{name}" in k and (".miss_block." in k or ".modules_to_save." in k)]
        assert lost == [], lost
    return model.eval()


def file_keys(folder: str) -> dict[str, tuple[int, ...]]:
    """`{key: shape}` of `folder/adapter_model.safetensors`."""
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "np") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
