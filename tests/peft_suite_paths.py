"""The two paths PEFT's MiSS tests run on (`test_peft_suite.py`), behind one small interface: the Linen path
(`MissModel` over `peft_suite_models.FlaxCustomModel`) and the NNX path (the NNX twin). Each gives a model's
parameters by PEFT's names (`base_model.model.lin0.miss_block.default`, `...base_layer.weight`; torch
layouts), writes adapter values given by those names, lists the trainable ones, and trains with optax.

Everything else the tests call is the model's own API (`get_peft_model`, `save_pretrained`,
`MissModel.from_pretrained`, `merge_adapter`, ...), the same on both paths: what the NNX model lacks
today fails there (issue 23 item 1, "one lifecycle").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import peft_suite_models as S
from interop.names import torch_leaf
from miss_jax import MissModel, adapters, tree

PREFIX = "base_model.model."


def _leaf_to_torch(leaf: str, value: Any) -> tuple[str, np.ndarray]:
    value = np.asarray(value, np.float32)
    return torch_leaf(leaf), (value.T if leaf == "kernel" and value.ndim == 2 else value)


def _leaf_from_torch(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    return ("kernel", value.T) if leaf == "weight" else (leaf, value)


def _parts(name: str) -> list[str]:
    return name.removeprefix(PREFIX).split(".")


def adapter_of(name: str) -> str | None:
    """The adapter a PEFT parameter name belongs to (None for a base parameter)."""
    parts = _parts(name)
    for marker in ("miss_block", "modules_to_save"):
        if marker in parts:
            return parts[parts.index(marker) + 1]
    return None


class Linen:
    """`MissModel` over the transformers-style Linen twin."""

    name = "linen"

    @staticmethod
    def base(model_id: str, dtype: Any = jnp.float32) -> S.FlaxCustomModel:
        return S.linen_model(model_id, dtype)

    @staticmethod
    def run(model: Any) -> np.ndarray:
        """The output of a PEFT model, a base model, or what `merge_and_unload()` returned, on PEFT's X."""
        return np.asarray(model(S.X), np.float32)

    @staticmethod
    def state(pm: MissModel) -> dict[str, np.ndarray]:
        out = {}
        for name, value in pm.named_parameters():
            head, leaf = name.rsplit(".", 1)
            if head.endswith(".miss_block"):
                out[name] = np.asarray(value, np.float32)
            else:
                leaf, value = _leaf_to_torch(leaf, value)
                out[f"{head}.{leaf}"] = value
        return out

    @staticmethod
    def set_values(pm: MissModel, values: Mapping[str, np.ndarray]) -> None:
        flat = {}
        for name, value in values.items():
            parts = _parts(name)
            if "miss_block" in parts:
                i = parts.index("miss_block")
                flat[(adapters.MISS, parts[i + 1], *parts[:i], adapters.BLOCK)] = value
            elif "modules_to_save" in parts:
                i = parts.index("modules_to_save")
                leaf, value = _leaf_from_torch(parts[-1], value)
                flat[(adapters.MODULES_TO_SAVE, parts[i + 1], *parts[:i], *parts[i + 2:-1], leaf)] = value
        current = tree.flatten(pm.adapter_params)
        pm.update_params(tree.unflatten({k: jnp.asarray(v, current[k].dtype) for k, v in flat.items()}))

    @staticmethod
    def named(pm: MissModel, trainable: Mapping) -> dict[str, np.ndarray]:
        """A `trainable_params()`-shaped pytree (the params, or their gradients) by PEFT's names, torch layouts."""
        out = {}
        for path, value in tree.flatten(trainable).items():
            group, rest = path[0], path[1:]
            if group == adapters.MISS:
                out[PREFIX + ".".join((*rest[1:-1], "miss_block", rest[0]))] = np.asarray(value, np.float32)
            elif group == adapters.MODULES_TO_SAVE:
                adapter, inner = rest[0], rest[1:]
                module = next(m for m in pm.plan.spec(adapter).saved_modules if inner[: len(m)] == m)
                leaf, value = _leaf_to_torch(inner[-1], value)
                out[PREFIX + ".".join((*module, "modules_to_save", adapter, *inner[len(module):-1], leaf))] = value
        return out

    @staticmethod
    def trainable_names(pm: MissModel) -> set[str]:
        try:
            trainable = pm.trainable_params()
        except ValueError:  # every active adapter is frozen
            return set()
        return {n for n in Linen.named(pm, trainable) if adapter_of(n) not in pm.frozen_adapters}

    @staticmethod
    def train(pm: MissModel, loss: Callable[[jax.Array], jax.Array], tx: optax.GradientTransformation,
              steps: int) -> None:
        forward = pm.apply_fn()
        params = pm.trainable_params()
        opt = tx.init(params)
        for _ in range(steps):
            grads = jax.grad(lambda t: loss(forward(pm.params, t, S.X)))(params)
            updates, opt = tx.update(grads, opt, params)
            params = optax.apply_updates(params, updates)
        pm.update_params(params)

    @staticmethod
    def grads(pm: MissModel, loss: Callable[[jax.Array], jax.Array]) -> dict[str, np.ndarray]:
        forward = pm.apply_fn()
        return Linen.named(pm, jax.grad(lambda t: loss(forward(pm.params, t, S.X)))(pm.trainable_params()))

    @staticmethod
    def is_abstract(pm: MissModel, adapter: str) -> bool:
        return tree.is_abstract(adapters.own(pm.adapter_params, adapter))

    @staticmethod
    def layer_sizes(pm: MissModel) -> dict[str, tuple[int, int]]:
        paths = {layer.path for spec in pm.plan.adapters for layer in spec.layers}
        return {".".join(l.path): (l.in_features, l.out_features) for l in pm.layers.values() if l.path in paths}

    @staticmethod
    def has_adapter_layers(model: Any) -> bool:
        """Whether a model `merge_and_unload()` / `unload()` returned still holds adapter layers."""
        return isinstance(model, MissModel) or "miss_block" in str(tree.flatten(model.params))


def _nnx_flat(pm: Any, what: Any = nnx.Param) -> list[tuple[tuple, Any]]:
    return [(tuple(p), v) for p, v in nnx.to_flat_state(nnx.state(pm, what))]


def _value(leaf: Any) -> Any:
    """The array an NNX state leaf holds (a `Variable`, a `VariableState`, or the array itself)."""
    if hasattr(leaf, "get_value"):
        return leaf.get_value()
    return getattr(leaf, "value", leaf)


def _nnx_name(path: tuple, value: Any) -> tuple[str, np.ndarray]:
    *head, leaf = (str(p) for p in path)
    value = _value(value)
    if head and head[-1] == "miss_block":
        return PREFIX + ".".join((*head, leaf)), np.asarray(value, np.float32)
    leaf, value = _leaf_to_torch(leaf, value)
    return PREFIX + ".".join((*head, leaf)), value


class Nnx:
    """The NNX twin, adapted in place (`miss_jax.get_peft_model` on an NNX model)."""

    name = "nnx"

    @staticmethod
    def base(model_id: str, dtype: Any = jnp.float32) -> nnx.Module:
        return S.nnx_model(model_id, dtype)

    @staticmethod
    def run(model: Any) -> np.ndarray:
        return np.asarray(model(S.X), np.float32)

    @staticmethod
    def state(pm: Any) -> dict[str, np.ndarray]:
        return dict(_nnx_name(p, v) for p, v in _nnx_flat(pm.base_model))

    @staticmethod
    def set_values(pm: Any, values: Mapping[str, np.ndarray]) -> None:
        for name, value in values.items():
            parts = _parts(name)
            leaf, value = (parts[-1], value) if "miss_block" in parts else _leaf_from_torch(parts[-1], value)
            path = tuple(int(p) if p.isdigit() else p for p in parts[:-1]) + (leaf,)
            S.set_variable(pm.base_model, path, value)

    @staticmethod
    def trainable_names(pm: Any) -> set[str]:
        return {_nnx_name(p[1:], v)[0] for p, v in _nnx_flat(pm, pm.trainable)}

    @staticmethod
    def train(pm: Any, loss: Callable[[jax.Array], jax.Array], tx: optax.GradientTransformation, steps: int) -> None:
        wrt = pm.trainable
        optimizer = nnx.Optimizer(pm, tx, wrt=wrt)
        for _ in range(steps):
            grads = nnx.grad(lambda m: loss(m(S.X)), argnums=nnx.DiffState(0, wrt))(pm)
            optimizer.update(pm, grads)

    @staticmethod
    def grads(pm: Any, loss: Callable[[jax.Array], jax.Array]) -> dict[str, np.ndarray]:
        grads = nnx.grad(lambda m: loss(m(S.X)), argnums=nnx.DiffState(0, pm.trainable))(pm)
        out = {}
        for path, g in nnx.to_flat_state(grads):
            name, value = _nnx_name(tuple(path)[1:], g)
            out[name] = value
        return out

    @staticmethod
    def is_abstract(pm: Any, adapter: str) -> bool:
        return any(isinstance(_value(v), jax.ShapeDtypeStruct) for p, v in _nnx_flat(pm.base_model) if adapter in p)

    @staticmethod
    def layer_sizes(pm: Any) -> dict[str, tuple[int, int]]:
        from miss_jax.nnx import miss_layers

        return {key: (layer.in_features, layer.out_features) for key, layer in miss_layers(pm.base_model).items()}

    @staticmethod
    def has_adapter_layers(model: Any) -> bool:
        from miss_jax.nnx import MissLinear, ModulesToSave

        return any(isinstance(node, (MissLinear, ModulesToSave)) for _, node in nnx.iter_graph(model))
