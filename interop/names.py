"""Flax param paths <-> PEFT / PyTorch state-dict keys.

Module paths are generic: a transformers Flax model's param tree mirrors the torch module tree of
the same architecture (that is how `from_pt=True` works), so a module's torch path is its Flax
path joined with ".". This holds for every architecture the tests cover (checked both ways on every
param) and for the 35 other Flax base models of transformers 4.57 that build from a small config
(BatchNorm models keep their params under "params" beside "batch_stats", same paths inside), so
there is no per-architecture table. The two trees differ only in

  * leaf names and layouts (the table below): Dense `kernel` `(in, out)` is torch `weight` `(out, in)`
    (GPT-2's `FlaxConv1D` kernel `(out, in)` is its torch `Conv1D` weight `(in, out)`: the same
    transpose), a Conv kernel `(*window, in, out)` is torch `(out, in, *window)`, `embedding` and a
    LayerNorm `scale` are torch `weight`;
  * tied weights (`lm_head`, T5/BART `embed_tokens`) that exist only in torch's state dict;
  * an `nn.DenseGeneral` kernel `(*in_dims, *out_dims)` is the torch `Linear` weight its `KernelRule`
    flattens it to, `(out, in)`, and its bias is flattened to `(out,)` (pass the layer's rule).

PEFT's adapter files prefix every key with `base_model.model.`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from miss_jax import adapters
from miss_jax.layer_rules import KernelRule
from miss_jax.tree import Path

# PEFT's names, defined once in `miss_jax.adapters` (`MissModel.named_parameters` uses them too)
PREFIX = adapters.PEFT_PREFIX
BLOCK = adapters.BLOCK  # PEFT's parameter name; the adapter pytree uses the same leaf name
BASE_LAYER = adapters.PEFT_BASE_LAYER  # PEFT's wrapped layer: the bias of an adapted layer is `<path>.base_layer.bias`
ORIGINAL_MODULE = adapters.PEFT_ORIGINAL_MODULE  # the untouched module beside a modules_to_save copy
SAVED_COPY = "modules_to_save"

# Flax leaf name -> torch parameter name (leaves not listed keep their name: `bias`, RMSNorm `weight`).
_TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


def module_key(path: Path) -> str:
    """`("model", "layers", "0", "self_attn", "q_proj")` -> `"model.layers.0.self_attn.q_proj"`."""
    return ".".join(path)


def adapter_key(path: Path, *names: str) -> str:
    """The key of a tensor in a PEFT adapter file, e.g. `adapter_key(path, "miss_block")`."""
    return PREFIX + ".".join(path + names)


def torch_leaf(leaf: str) -> str:
    """The torch parameter name of a Flax leaf (`kernel` -> `weight`, ...)."""
    return _TORCH_LEAF.get(leaf, leaf)


def to_torch(leaf: str, value: Any, rule: Optional[KernelRule] = None) -> Any:
    """A Flax leaf in torch layout: kernels `(..., in, out)` become `(out, in, ...)`; others unchanged.

    `rule`: the `KernelRule` of the layer holding the leaf (an `nn.DenseGeneral`'s, `Layer.rule`): its kernel
    becomes the rule's flattened torch weight `(out, in)`, its bias `(*out_dims)` becomes `(out,)`.
    """
    if rule is not None and leaf in (rule.kernel, rule.bias):
        return rule.to_matrix(value).T if leaf == rule.kernel else value.reshape(-1)
    if leaf != "kernel" or value.ndim < 2:
        return value
    n = value.ndim
    return value.transpose((n - 1, n - 2, *range(n - 2)))


def from_torch(leaf: str, value: Any, rule: Optional[KernelRule] = None, shape: tuple[int, ...] = ()) -> Any:
    """The inverse of `to_torch`: torch `(out, in, ...)` back to the Flax kernel `(..., in, out)`; with `rule`,
    its kernel or bias back to the Flax leaf of `shape`."""
    if rule is not None and leaf in (rule.kernel, rule.bias):
        return rule.from_matrix(value.T, shape) if leaf == rule.kernel else value.reshape(shape)
    if leaf != "kernel" or value.ndim < 2:
        return value
    n = value.ndim
    return value.transpose((*range(2, n), 1, 0))


def torch_shape(leaf: str, shape: tuple[int, ...], rule: Optional[KernelRule] = None) -> tuple[int, ...]:
    """The torch-layout shape of a Flax leaf of `shape` (`rule` as in `to_torch`)."""
    if rule is not None and leaf in (rule.kernel, rule.bias):
        return rule.sizes(shape)[::-1] if leaf == rule.kernel else (math.prod(shape),)
    if leaf != "kernel" or len(shape) < 2:
        return tuple(shape)
    return (shape[-1], shape[-2], *shape[:-2])


def torch_param_key(path: Path) -> str:
    """A full Flax param path (module path + leaf) -> its torch state-dict key (no PEFT prefix)."""
    return module_key(path[:-1] + (torch_leaf(path[-1]),))
