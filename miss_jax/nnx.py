"""MiSS for Flax NNX: `MissLinear` wraps an `nnx.Linear`; `apply_miss` swaps targeted layers in place.

The maths is `miss_jax.ops`; which layers are adapted follows PEFT's matching rules
(`miss_jax.targeting`), with a layer's key being its path in the NNX graph joined by `.`
(`layers.0.q_proj`). Adapter blocks are `MissParam` variables, so `wrt=MissParam` trains them alone
while the base `nnx.Param`s stay frozen.

Example usage::

  >>> from flax import nnx
  >>> import jax.numpy as jnp, optax
  >>> from miss_jax import MissConfig
  >>> from miss_jax.nnx import MissLinear, MissParam, apply_miss, merge_and_unload
  >>> class MLP(nnx.Module):
  ...   def __init__(self, rngs: nnx.Rngs):
  ...     self.up_proj = nnx.Linear(16, 32, rngs=rngs)
  ...     self.down_proj = nnx.Linear(32, 16, rngs=rngs)
  ...   def __call__(self, x):
  ...     return self.down_proj(nnx.gelu(self.up_proj(x)))
  >>> model = apply_miss(MLP(nnx.Rngs(0)), MissConfig(r=4, target_modules=["up_proj"]), nnx.Rngs(1))
  >>> type(model.up_proj).__name__, model.up_proj.miss_block.shape   # balance block (r, out)
  ('MissLinear', (4, 32))
  >>> optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=MissParam)
  >>> @nnx.jit
  ... def train_step(model, optimizer, x, y):
  ...   loss_fn = lambda model: jnp.mean((model(x) - y) ** 2)
  ...   loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, MissParam))(model)
  ...   optimizer.update(model, grads)
  ...   return loss
  >>> x, y = jnp.ones((8, 16)), jnp.zeros((8, 16))
  >>> losses = [float(train_step(model, optimizer, x, y)) for _ in range(3)]
  >>> losses[-1] < losses[0]
  True
  >>> plain = merge_and_unload(model)       # nnx.Linear again, adapter merged into its kernel
  >>> type(plain.up_proj).__name__
  'Linear'
"""

from __future__ import annotations

from typing import Any, TypeVar, Union

import jax
import jax.numpy as jnp
from flax import nnx

from . import ops
from .config import MissConfig
from .targeting import Layer, matches, resolve_targets, select

M = TypeVar("M", bound=nnx.Module)
GraphPath = tuple[Union[str, int], ...]


class MissParam(nnx.Param):
    """The variable type of MiSS blocks: filter on it to train adapters only (`wrt=MissParam`)."""


class MissLinear(nnx.Module):
    """An `nnx.Linear` with a MiSS adapter; same call signature, same output shape.

    The base layer is kept as `base_layer` (its `kernel` `(in, out)` and `bias` untouched until
    `merge`); the adapter is `miss_block`, a `MissParam` of shape balance `(r, out)`,
    mini `(r, mini_r)` or bat `(out // r, r, r)` (`config.variant`).

      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> from miss_jax import MissConfig
      >>> base = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
      >>> layer = MissLinear(base, MissConfig(r=2, init_weights=False), rngs=nnx.Rngs(1))
      >>> x = jnp.ones((3, 6))
      >>> y = layer(x); layer.merge(); layer.merged
      True
      >>> bool(jnp.allclose(layer(x), y, atol=1e-5)) and bool(jnp.allclose(base(x), y, atol=1e-5))
      True

    Args:
      base_layer: the `nnx.Linear` to adapt.
      config: r, mini_r, miss_dropout and init_weights (the variant) are read from it.
      rngs: `params` stream for a random init (`init_weights=False`); `dropout` stream for
        `miss_dropout > 0` (dropout follows `model.train()` / `model.eval()`, as `nnx.Dropout` does).
    """

    def __init__(self, base_layer: nnx.Linear, config: MissConfig, *, rngs: nnx.Rngs):
        if not isinstance(base_layer, nnx.Linear):
            raise ValueError(f"MissLinear wraps an nnx.Linear, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.variant = config.variant
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        random = config.init_weights is False
        block = ops.init_block(
            rngs.params() if random else None,
            self.variant,
            self.in_features,
            self.out_features,
            config.r,
            config.mini_r,
            random=random,
        )
        self.miss_block = MissParam(block)
        self.dropout = nnx.Dropout(config.miss_dropout, rngs=rngs if config.miss_dropout else None)
        self.merged = False

    def balance_block(self) -> jax.Array:
        """The `(r, out)` block a balance/mini adapter adds through (a mini block tiled over `out`)."""
        block = self.miss_block[...]
        return ops.expand_mini(block, self.out_features) if self.variant == "mini" else block

    def adapted_kernel(self) -> jax.Array:
        """The `(in, out)` kernel with the adapter merged in (base kernel left unchanged)."""
        kernel = self.base_layer.kernel[...]
        if self.variant == "bat":
            return ops.bat_kernel(kernel, self.miss_block[...], "flax")
        return ops.merge_balance(kernel, self.balance_block(), "flax")

    def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
        """`x` `(..., in)` -> `(..., out)`: base output plus the adapter's (or the bat-adapted layer)."""
        if self.merged:
            return self.base_layer(x, out_sharding=out_sharding)
        if self.variant == "bat":  # the base layer's own forward, run with W' (no dropout, as in PEFT)
            graphdef, state = nnx.split(self.base_layer)
            params = nnx.to_pure_dict(state)
            params["kernel"] = ops.bat_kernel(params["kernel"], self.miss_block[...], "flax")
            return nnx.merge(graphdef, params)(x, out_sharding=out_sharding)
        y = self.base_layer(x, out_sharding=out_sharding)
        delta = ops.balance_output(self.dropout(x), self.balance_block())
        return (y.astype(delta.dtype) + delta).astype(y.dtype)

    def merge(self, safe_merge: bool = False) -> None:
        """Writes the adapter into `base_layer.kernel` (in place); the forward then skips it.

        `safe_merge` checks the merged kernel is finite first (eager only, not under `nnx.jit`).
        A merged layer is left as it is.
        """
        if self.merged:
            return
        kernel = self.adapted_kernel()
        if safe_merge and not bool(jnp.isfinite(kernel).all()):
            raise ValueError(
                "Merging this MiSS adapter gives NaN or inf in the kernel; the adapter is broken "
                "(check its miss_block), so it was not merged."
            )
        self.base_layer.kernel[...] = kernel
        self.merged = True

    def unmerge(self) -> None:
        """Takes the adapter back out of `base_layer.kernel` (exact inverse, up to float32 rounding)."""
        if not self.merged:
            return
        kernel = self.base_layer.kernel[...]
        block = self.miss_block[...]
        if self.variant == "bat":
            self.base_layer.kernel[...] = ops.bat_unmerge(kernel, block, "flax")
        else:
            self.base_layer.kernel[...] = ops.merge_balance(kernel, self.balance_block(), "flax", sign=-1.0)
        self.merged = False


def _modules(model: nnx.Module) -> dict[GraphPath, nnx.Module]:
    """Every submodule by graph path, except the insides of `MissLinear`s."""
    found = {path: node for path, node in nnx.iter_graph(model) if path and isinstance(node, nnx.Module)}
    adapted = [path for path, node in found.items() if isinstance(node, MissLinear)]
    return {
        path: node
        for path, node in found.items()
        if not any(path[: len(a)] == a and len(path) > len(a) for a in adapted)
    }


def _key(path: GraphPath) -> str:
    return ".".join(map(str, path))


def discover(model: nnx.Module) -> dict[str, Layer]:
    """The model's modules as `targeting.Layer`s by key; `nnx.Linear`s carry layout 'flax' and shapes.

    >>> from flax import nnx
    >>> discover(nnx.Sequential(nnx.Linear(3, 5, rngs=nnx.Rngs(0))))["layers.0"].out_features
    5
    """
    layers = {}
    for path, node in _modules(model).items():
        names = tuple(map(str, path))
        if isinstance(node, nnx.Linear):
            layers[_key(path)] = Layer(
                names, type(node).__name__, "flax", node.in_features, node.out_features, node.bias is not None
            )
        else:
            layers[_key(path)] = Layer(names, type(node).__name__)
    return layers


def miss_layers(model: nnx.Module) -> dict[str, MissLinear]:
    """The model's `MissLinear`s by key, e.g. to merge them all: `for m in miss_layers(model).values(): m.merge()`."""
    return {_key(path): node for path, node in _modules(model).items() if isinstance(node, MissLinear)}


_CONTAINERS = (list, dict, nnx.List, nnx.Dict)  # children by item; any other node's children are attributes


def _replace(model: nnx.Module, path: GraphPath, new: nnx.Module) -> None:
    """Puts `new` at `path` (a module attribute, or an `nnx.List` / `nnx.Dict` / list / dict entry)."""
    parent: Any = model
    for name in path[:-1]:
        parent = parent[name] if isinstance(parent, _CONTAINERS) else getattr(parent, name)
    if isinstance(parent, _CONTAINERS):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def apply_miss(model: M, config: MissConfig, rngs: nnx.Rngs) -> M:
    """Replaces, in place, every `nnx.Linear` that `config` targets by a `MissLinear`; returns `model`.

    Matching follows PEFT (`target_modules` names match a key exactly or as a `.`-suffix; a string
    is a full-match regex; `"all-linear"`; `layers_to_transform`, `exclude_modules`). As in PEFT,
    `layers_to_transform` reads the layer index after a named segment: for a top-level list
    (`layers.0.q_proj`) pass `layers_pattern="layers"`. Call it again with other targets to put a
    different variant elsewhere.

    Raises ValueError, changing nothing, if a target matches nothing or a non-Linear module, a
    layer is already adapted, or a layer's shape does not suit `r` / the variant. `bias` and
    `modules_to_save` are not supported here: train those modules by adding them to the
    optimizer's `wrt` filter.
    """
    if config.bias != "none" or config.modules_to_save:
        raise ValueError(
            f"apply_miss supports bias='none' and no modules_to_save (got bias={config.bias!r}, "
            f"modules_to_save={config.modules_to_save!r}): in NNX, train biases or whole modules by "
            "adding them to the optimizer's `wrt` filter instead."
        )
    if config.target_modules is None:
        raise ValueError(
            "An NNX model has no model_type to pick PEFT's default targets from: pass `target_modules`, "
            "e.g. MissConfig(target_modules=['q_proj', 'v_proj']) or target_modules='all-linear'."
        )
    modules = _modules(model)
    paths = {_key(path): path for path in modules}
    layers = discover(model)
    config = resolve_targets(config, layers, model_type=None)
    again = [key for key in layers if isinstance(modules[paths[key]], MissLinear) and matches(config, key)]
    if again:
        raise ValueError(
            f"Already MiSS-adapted: {again}. The NNX transform holds one adapter per layer; "
            "call merge_and_unload(model) first, or target other layers."
        )
    new: dict[GraphPath, MissLinear] = {}
    for layer in select(config, layers):
        path = paths[layer.key]
        try:
            new[path] = MissLinear(modules[path], config, rngs=rngs)
        except ValueError as e:
            raise ValueError(f"Cannot adapt {layer.key} (in={layer.in_features}, out={layer.out_features}): {e}") from e
    for path, module in new.items():
        _replace(model, path, module)
    return model


def merge_and_unload(model: M, safe_merge: bool = False) -> M:
    """Merges every `MissLinear` and puts its plain `nnx.Linear` back, in place; returns `model`."""
    for path, node in _modules(model).items():
        if isinstance(node, MissLinear):
            node.merge(safe_merge)
            _replace(model, path, node.base_layer)
    return model
