"""PEFT's custom test models, three twins with the same weights: the torch module PEFT adapts, a
transformers-style Flax Linen model (`MissModel`'s path) and an NNX model (the NNX path).

The torch models are those of huggingface/peft `tests/test_custom_models.py` (commit
5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40): `MLP` (lin0 10->20, ReLU, Dropout(0.5), lin1 20->2, LogSoftmax)
and `DeepMLP` (12 `Block`s of lin0 / ReLU / Dropout / lin1 at `size`, then `out` Linear(10, 2) and
LogSoftmax). `MODELS` builds them as PEFT's `MockTransformerWrapper.from_pretrained` does (seed 0); the twins
copy their weights (a torch `weight (out, in)` is a Flax `kernel (in, out)`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

X = np.arange(90, dtype=np.float32).reshape(9, 10)  # PEFT's `prepare_inputs_for_testing`: arange(90).view(9, 10)
DEEP_SIZE = 256  # PEFT's DeepMLP(size=256), "a size that works with all adapters" (MiSS's default r is 64)


# --------------------------------------------------------------------------- torch (PEFT's models)


class TorchMLP(torch.nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(10, 20, bias=bias)
        self.relu = torch.nn.ReLU()
        self.drop = torch.nn.Dropout(0.5)
        self.lin1 = torch.nn.Linear(20, 2, bias=bias)
        self.sm = torch.nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.to(self.dtype))))))


class TorchBlock(torch.nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(size, size)
        self.relu = torch.nn.ReLU()
        self.drop = torch.nn.Dropout(0.5)
        self.lin1 = torch.nn.Linear(size, size)


class TorchDeepMLP(torch.nn.Module):
    """PEFT's DeepMLP; its forward cannot run at `size != 10` (`out` is Linear(10, 2)), nor do its tests call it."""

    def __init__(self, size: int = DEEP_SIZE, num_hidden_layers: int = 12) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([TorchBlock(size) for _ in range(num_hidden_layers)])
        self.out = torch.nn.Linear(10, 2)
        self.sm = torch.nn.LogSoftmax(dim=-1)


def torch_model(model_id: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """PEFT's `MockTransformerWrapper.from_pretrained(model_id, dtype)`: seed 0, then the model, in eval mode."""
    torch.manual_seed(0)
    model = {"MLP": TorchMLP, "DeepMLP": TorchDeepMLP}[model_id]().to(dtype).eval()
    model.dtype = dtype  # as PEFT's half-precision tests set it
    return model


def torch_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A torch module's state dict as float32 numpy arrays."""
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- Flax Linen (transformers-style)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, X: jax.Array, deterministic: bool = True) -> jax.Array:
        h = nn.relu(nn.Dense(20, name="lin0")(X))
        h = nn.Dropout(0.5)(h, deterministic=deterministic)
        return jax.nn.log_softmax(nn.Dense(2, name="lin1")(h), axis=-1)


class LinenBlock(nn.Module):
    size: int

    @nn.compact
    def __call__(self, X: jax.Array, deterministic: bool = True) -> jax.Array:
        h = nn.Dropout(0.5)(nn.relu(nn.Dense(self.size, name="lin0")(X)), deterministic=deterministic)
        return nn.Dense(self.size, name="lin1")(h)


class LinenLayers(nn.Module):
    size: int
    count: int

    @nn.compact
    def __call__(self, X: jax.Array, deterministic: bool = True) -> jax.Array:
        for i in range(self.count):  # named "0", "1", ... as transformers' Flax layer collections
            X = LinenBlock(self.size, name=str(i))(X, deterministic)
        return X


class LinenDeepMLP(nn.Module):
    size: int = DEEP_SIZE
    count: int = 12

    @nn.compact
    def __call__(self, X: jax.Array, deterministic: bool = True) -> jax.Array:
        h = LinenLayers(self.size, self.count, name="layers")(X, deterministic)
        return jax.nn.log_softmax(nn.Dense(2, name="out")(h[..., :10]), axis=-1)  # `out` is (10 -> 2), as torch's


class FlaxCustomModel:
    """What `MissModel` uses of a transformers Flax model, around a Linen module of `X`: `module`, `params`,
    `config` (None: a custom model), `input_shape`, `init_weights` and `__call__(X, params=, train=, dropout_rng=)`."""

    config = None

    def __init__(self, module: nn.Module, params: Mapping, input_shape: tuple[int, ...]) -> None:
        self.module, self.params, self.input_shape = module, params, input_shape

    def init_weights(self, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
        return self.module.init(rng, jnp.zeros(input_shape))["params"]

    def __call__(self, X: Any, params: Optional[Mapping] = None, train: bool = False,
                 dropout_rng: Optional[jax.Array] = None) -> jax.Array:
        rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
        return self.module.apply({"params": self.params if params is None else params}, jnp.asarray(X, jnp.float32),
                                 deterministic=not train, rngs=rngs)


def _flax_tree(state: Mapping[str, np.ndarray], dtype: Any) -> dict:
    """A torch state dict of Linear layers as a Flax param tree (`a.b.weight` -> `a/b/kernel`, transposed)."""
    out: dict = {}
    for name, value in state.items():
        *path, leaf = name.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node["kernel" if leaf == "weight" else leaf] = jnp.asarray(value.T if leaf == "weight" else value, dtype)
    return out


def linen_model(model_id: str, dtype: Any = jnp.float32) -> FlaxCustomModel:
    """The Linen twin of `torch_model(model_id)`, holding its weights in `dtype`."""
    module = {"MLP": LinenMLP, "DeepMLP": LinenDeepMLP}[model_id]()
    shape = X.shape if model_id == "MLP" else (9, DEEP_SIZE)
    return FlaxCustomModel(module, _flax_tree(torch_state(torch_model(model_id)), dtype), shape)


# --------------------------------------------------------------------------- NNX


class NnxMLP(nnx.Module):
    def __init__(self, dtype: Any, rngs: nnx.Rngs) -> None:
        self.lin0 = nnx.Linear(10, 20, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)
        self.lin1 = nnx.Linear(20, 2, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, X: Any) -> jax.Array:
        h = self.drop(nnx.relu(self.lin0(jnp.asarray(X, self.dtype))))
        return jax.nn.log_softmax(self.lin1(h), axis=-1)


class NnxBlock(nnx.Module):
    def __init__(self, size: int, dtype: Any, rngs: nnx.Rngs) -> None:
        self.lin0 = nnx.Linear(size, size, param_dtype=dtype, rngs=rngs)
        self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)
        self.lin1 = nnx.Linear(size, size, param_dtype=dtype, rngs=rngs)


class NnxDeepMLP(nnx.Module):
    def __init__(self, dtype: Any, rngs: nnx.Rngs, size: int = DEEP_SIZE, count: int = 12) -> None:
        self.layers = nnx.List([NnxBlock(size, dtype, rngs) for _ in range(count)])
        self.out = nnx.Linear(10, 2, param_dtype=dtype, rngs=rngs)


def child(node: Any, key: Any) -> Any:
    """`node`'s child `key` in an NNX graph (an attribute, or an item of an `nnx.List` / `nnx.Dict`)."""
    return node[key] if isinstance(node, (nnx.List, nnx.Dict)) else getattr(node, str(key))


def set_variable(root: Any, path: tuple, value: Any) -> None:
    """Sets the NNX variable at graph `path` below `root` to `value` (in its own dtype)."""
    node = root
    for key in path[:-1]:
        node = child(node, key)
    var = child(node, path[-1])
    var.set_value(jnp.asarray(value, var.get_value().dtype))  # a Variable keeps its dtype


def nnx_model(model_id: str, dtype: Any = jnp.float32) -> nnx.Module:
    """The NNX twin of `torch_model(model_id)`, holding its weights in `dtype`."""
    cls: Callable[..., nnx.Module] = {"MLP": NnxMLP, "DeepMLP": NnxDeepMLP}[model_id]
    model = cls(dtype, nnx.Rngs(0))
    for name, value in torch_state(torch_model(model_id)).items():
        *path, leaf = name.split(".")
        path = tuple(int(p) if p.isdigit() else p for p in path)
        set_variable(model, path + ("kernel" if leaf == "weight" else leaf,), value.T if leaf == "weight" else value)
    return model
