"""PEFT state dicts of a `MissModel` adapter: which tensors it stores under which keys, both ways, and its
`adapter_config.json` object (PEFT's `get_peft_model_state_dict` / `set_peft_model_state_dict`).

Keys are exactly PEFT 0.21's (checked against peft 0.21.2 in the tests): `base_model.model.<torch
path>.miss_block`, torch layout; `modules_to_save` copies whole under their plain path; trained biases
by bias mode (`<path>.base_layer.bias` for adapted layers). Which tensors an adapter has is listed once
(`_entries`): saving reads those leaves, loading fills them (`MissModel.update_params`), so the two
directions agree by construction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp

from miss_jax import adapters, tree
from miss_jax.layer_rules import KernelRule
from miss_jax.tree import Path

from . import names

MissModel = Any  # a `miss_jax.MissModel`, duck-typed: the folder format sits below the model classes

MAX_LISTED = 12  # keys an error message lists before "... and N more"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of an adapter: its key in the adapter file and its leaf in `MissModel.adapter_params`.

    `path` is the leaf's full path in the adapter pytree (`miss_jax.adapters`). `aliases` are other keys
    PEFT writes for the same tensor; they are accepted when loading and never written. `rule`: the
    `KernelRule` of the layer holding the leaf when its kernel is not a matrix (an `nn.DenseGeneral`'s), whose
    kernel and bias PEFT stores flattened (`names.to_torch`).
    """

    key: str
    path: Path
    aliases: tuple[str, ...] = ()
    rule: Optional[KernelRule] = None

    @property
    def leaf(self) -> str:
        return self.path[-1]


def _entries(model: MissModel, adapter_name: str) -> list[Entry]:
    """Every tensor adapter `adapter_name` stores, with PEFT 0.21's key for it.

    * `<layer>.miss_block` for each adapted layer (PEFT's block shape; no layout change);
    * `<module>.<param>` for each param of a `modules_to_save` copy (torch names and layout; a DenseGeneral's
      kernel as its flattened torch weight);
    * trained biases: `<layer>.base_layer.bias` for adapted layers, `<path>.bias` for the others.
    """
    spec = model.plan.spec(adapter_name)
    adapted = {layer.path for layer in spec.layers}
    rules = {layer.path: layer.rule for layer in model.layers.values() if layer.rule is not None}
    out = [
        Entry(names.adapter_key(layer.path, names.BLOCK), (adapters.MISS, adapter_name, *layer.path, adapters.BLOCK))
        for layer in spec.layers
    ]
    saved = tree.flatten(adapters.own(model.adapter_params, adapter_name)[adapters.MODULES_TO_SAVE])
    out += [
        Entry(names.PREFIX + names.torch_param_key(p), (adapters.MODULES_TO_SAVE, adapter_name, *p),
              rule=rules.get(p[:-1]))
        for p in saved
    ]
    for path in spec.bias_paths:
        if path in adapted:
            out.append(Entry(names.adapter_key(path, names.BASE_LAYER, "bias"), (adapters.BIAS, *path, "bias"),
                             rule=rules.get(path)))
        else:
            # A torch model whose *other* adapters wrap this layer names it `<path>.base_layer.bias`.
            alias = names.adapter_key(path, names.BASE_LAYER, "bias")
            entry = Entry(names.adapter_key(path, "bias"), (adapters.BIAS, *path, "bias"), (alias,), rules.get(path))
            out.append(entry)
    return out


def _peft_extras(model: MissModel, adapter_name: str) -> set[str]:
    """Keys PEFT's `bias="all"` also writes for biases inside a `modules_to_save` module, read and dropped.

    PEFT selects every state-dict key ending in `.bias`, so beside the copy's `<module>.<...>.bias` it
    writes `<module>.modules_to_save.<...>.bias` (the same tensor; its own loader reports the key as
    unexpected) and `<module>.original_module.<...>.bias` (the base bias: unused while the copy is
    active, so it receives no gradient and keeps the base value, which miss-jax keeps too).
    """
    spec = model.plan.spec(adapter_name)
    if spec.config.bias != "all":
        return set()
    saved = tree.flatten(adapters.own(model.adapter_params, adapter_name)[adapters.MODULES_TO_SAVE])
    extras = set()
    for path in (p for p in saved if p[-1] == "bias"):
        module = next(m for m in spec.saved_modules if path[: len(m)] == m)
        for wrapper in (names.SAVED_COPY, names.ORIGINAL_MODULE):
            extras.add(names.adapter_key(module + (wrapper,) + path[len(module) : -1], "bias"))
    return extras


def _leaf(adapter_params: Mapping, entry: Entry) -> Any:
    return tree.get(adapter_params, entry.path)


# --------------------------------------------------------------------------- state dicts


def get_peft_model_state_dict(
    model: MissModel, adapter_name: str = "default", dtype: Optional[Any] = jnp.float32,
    adapter_params: Optional[Mapping] = None,
) -> dict[str, jax.Array]:
    """The tensors PEFT stores for `adapter_name`: `{key: array}`, torch layout, cast to `dtype` (None: as is).

    `adapter_params` (default: the model's) is the adapter pytree to read, e.g. one gathered from several hosts.
    """
    model.plan.spec(adapter_name)
    model.require_weights([adapter_name])
    source = model.adapter_params if adapter_params is None else adapter_params
    out = {}
    for e in _entries(model, adapter_name):
        value = names.to_torch(e.leaf, jnp.asarray(_leaf(source, e)), e.rule)
        out[e.key] = value if dtype is None else value.astype(dtype)
    return out


def listed(keys: Sequence[str]) -> str:
    """`keys` sorted and joined, at most `MAX_LISTED` of them."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


def set_peft_model_state_dict(
    model: MissModel, state_dict: Mapping[str, Any], adapter_name: str = "default", source: str = "state_dict"
) -> None:
    """Fills adapter `adapter_name` (abstract or not) from a PEFT state dict (`get_peft_model_state_dict`'s inverse).

    Every key must be present with its exact shape (ValueError listing missing/unexpected keys, or
    naming a key and both shapes, otherwise; the model is then unchanged). PEFT's own redundant
    keys (`_peft_extras`) are accepted and dropped. Values are cast to the adapter's dtypes (float32
    blocks; the base dtype for module copies and biases), as PEFT's `autocast_adapter_dtype`.
    """
    model.plan.spec(adapter_name)
    entries = _entries(model, adapter_name)
    by_key = {k: e for e in entries for k in (e.key,) + e.aliases}
    extras = _peft_extras(model, adapter_name)
    unexpected = [k for k in state_dict if k not in by_key and k not in extras]
    found = {by_key[k].key: v for k, v in state_dict.items() if k in by_key}
    missing = [e.key for e in entries if e.key not in found]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match adapter {adapter_name!r} as its config places it on this model."
            + (f" Missing keys: {listed(missing)}." if missing else "")
            + (f" Unexpected keys: {listed(unexpected)}." if unexpected else "")
            + " Check that the folder was saved from this architecture with this adapter config."
        )
    values, wrong = {}, []
    for e in entries:
        like, tensor = _leaf(model.adapter_params, e), found[e.key]
        want = names.torch_shape(e.leaf, tuple(like.shape), e.rule)
        if tuple(tensor.shape) != want:
            wrong.append(f"{e.key}: {tuple(tensor.shape)} in {source}, {want} expected by the model")
        else:
            values[e] = names.from_torch(e.leaf, jnp.asarray(tensor), e.rule, tuple(like.shape)).astype(like.dtype)
    if wrong:
        raise ValueError(f"Tensors of the wrong shape for adapter {adapter_name!r}: " + "; ".join(wrong) + ".")
    model.update_params(tree.unflatten({e.path: v for e, v in values.items()}))


# --------------------------------------------------------------------------- saving


def _auto_mapping(model: MissModel) -> dict[str, str]:
    """PEFT's `auto_mapping` for the PyTorch twin of the Flax class (what AutoPeftModel needs)."""
    cls = type(model.base_model)
    return {
        "base_model_class": cls.__name__.removeprefix("Flax"),
        "parent_library": cls.__module__.replace(".modeling_flax_", ".modeling_"),
    }


def adapter_config_dict(model: MissModel, adapter_name: str) -> dict[str, Any]:
    """The `adapter_config.json` object PEFT writes for this adapter (`inference_mode: true`, as PEFT)."""
    config = model.peft_config[adapter_name]
    d = config.to_dict()
    d["inference_mode"] = True
    if config.base_model_name_or_path is None:
        d["base_model_name_or_path"] = getattr(getattr(model.base_model, "config", None), "name_or_path", "") or None
    if config.task_type is None:
        d["auto_mapping"] = _auto_mapping(model)
    return d
