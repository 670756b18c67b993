"""MiSS for Flax NNX: `MissLinear` wraps a layer in place; `MissNnxModel` is PEFT's model over it.

The maths is `miss_jax.ops`; which layers are adapted follows PEFT's matching rules
(`miss_jax.targeting`) on a layer's key, its path in the NNX graph joined by `.` (`layers.0.attn.q_proj`);
which layers can be adapted, and how their kernels map to `(in, out)`, is `miss_jax.layer_rules`
(`nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum`, bridged Linen `Dense` / `DenseGeneral`, and
registered einsum-style modules such as tunix's). Adapter blocks are `MissParam` variables.

Two levels:

* `apply_miss(model, config, rngs)` adapts a plain NNX model in place (one named adapter; call it
  again with another name for more): `wrt=MissParam` trains the blocks.
* `get_peft_model(model, config)` returns a `MissNnxModel` with PEFT's lifecycle: several named
  adapters (`add_adapter`, `set_adapter`, `delete_adapter`, `disable_adapter`), `bias`,
  `modules_to_save`, `get_nb_trainable_parameters`, merging, and `trainable` (the optimizer's filter).

Several adapters on one layer compose as in the Linen path (docs/DESIGN.md §1): the kernel-transforming
(bat) adapters first, in activation order, then the additive terms, summed.

Example usage::

  >>> from flax import nnx
  >>> import jax.numpy as jnp, optax
  >>> from miss_jax import MissConfig
  >>> from miss_jax.nnx import MissParam, apply_miss, merge_and_unload
  >>> class MLP(nnx.Module):
  ...   def __init__(self, rngs: nnx.Rngs):
  ...     self.up_proj = nnx.Linear(16, 32, rngs=rngs)
  ...     self.down_proj = nnx.Linear(32, 16, rngs=rngs)
  ...   def __call__(self, x):
  ...     return self.down_proj(nnx.gelu(self.up_proj(x)))
  >>> model = apply_miss(MLP(nnx.Rngs(0)), MissConfig(r=4, target_modules=["up_proj"]), nnx.Rngs(1))
  >>> type(model.up_proj).__name__, model.up_proj.miss_block["default"].shape   # balance block (r, out)
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

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional, TypeVar, Union

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import adapters, ops
from .config import MissConfig
from .layer_rules import KernelRule, has_rule, rule_for
from .targeting import Layer, matches, resolve_targets, select

M = TypeVar("M", bound=nnx.Module)
GraphPath = tuple[Union[str, int], ...]
DEFAULT = "default"


class MissParam(nnx.Param):
    """The variable type of MiSS blocks: filter on it to train adapters only (`wrt=MissParam`)."""


def _block_variable(kernel: nnx.Variable, rule: KernelRule, variant: ops.Variant, block: jax.Array) -> MissParam:
    """`block` as a `MissParam` sharded like `kernel`'s `out` axis (the block axis `variant.out_axis` names).

    The kernel's partitioning is its `out_sharding` annotation, else the spec of its array if that is sharded
    on a mesh. The block's `out` axis takes the kernel's entry when the kernel's `out` is sharded along its
    first `out` axis only and the block's axis is known to divide over those mesh axes: on the mesh of the
    kernel's array, else on the current abstract mesh (`jax.set_mesh`); otherwise the block is replicated,
    also when no mesh is known (`ops.Variant.partition`). A block is placed on the kernel's mesh when the
    kernel's array is. A bat block along `out // r` lines up with the kernel's shards whenever it divides:
    each shard holds whole `r`-row blocks.
    """
    names = kernel.get_metadata().get("out_sharding")
    value = kernel.get_value()
    sharding = getattr(value, "sharding", None)
    mesh = sharding.mesh if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh) else None
    if names is None and mesh is not None:
        names = sharding.spec
    if names is None:
        return MissParam(block)
    abstract = jax.sharding.get_abstract_mesh()
    mesh_shape = mesh.shape if mesh is not None else None if abstract.empty else abstract.shape
    spec = variant.partition(block.shape, ops.out_entry(names, rule.out_axes), mesh_shape)
    if mesh is not None:
        block = jax.device_put(block, NamedSharding(mesh, P(*spec)))
    return MissParam(block, out_sharding=spec, eager_sharding=False)


class MissLinear(nnx.Module):
    """A layer with MiSS adapters; same call signature, same output shape.

    The base layer is kept as `base_layer` (its kernel and bias untouched until `merge`); adapter `name`'s
    block is `miss_block[name]`, a `MissParam` of shape balance `(r, out)`, mini `(r, mini_r)` or bat
    `(out // r, r, r)`, with `in`/`out` the layer's sizes under its `KernelRule` (`rule`). As in PEFT's
    layer, `active_adapters` are those the forward applies (less `merged_adapters`; none while
    `disabled`). Attributes it lacks are read from the base layer.

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
      base_layer: the layer to adapt (one with a layer rule, see `miss_jax.layer_rules`).
      config: r, mini_r, miss_dropout and init_weights (the variant) are read from it.
      rngs: `params` stream for a random init (`init_weights=False`); `dropout` stream for
        `miss_dropout > 0` (dropout follows `model.train()` / `model.eval()`, as `nnx.Dropout` does).
      adapter_name: the adapter's name.
      param_dtype: the block's dtype.
      key: the layer's key, for messages.
    """

    def __init__(
        self,
        base_layer: nnx.Module,
        config: MissConfig,
        *,
        rngs: nnx.Rngs,
        adapter_name: str = DEFAULT,
        param_dtype: Any = jnp.float32,
        key: str = "this layer",
    ):
        self.base_layer = base_layer
        self.rule = rule_for(base_layer, key)
        self.in_features, self.out_features = self.rule.sizes(self.kernel.shape)
        self.miss_block = nnx.Dict()
        self.miss_dropout = nnx.Dict()
        self.variants: dict[str, str] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: tuple[str, ...] = ()
        self.disabled = False
        self.add_adapter(adapter_name, config, rngs=rngs, param_dtype=param_dtype)

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks come from the base layer (model code reads e.g. tunix's `o_proj.shape`)."""
        if name.startswith("_") or name == "base_layer":
            raise AttributeError(name)
        return getattr(self.base_layer, name)

    @property
    def kernel(self) -> nnx.Variable:
        """The base layer's kernel variable (the rule's `kernel`)."""
        return getattr(self.base_layer, self.rule.kernel)

    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into the kernel."""
        return bool(self.merged_adapters)

    def refuse(self, action: str) -> None:
        """ValueError if the base layer refuses `action` ("merge", or a new adapter's variant): a base whose kernel
        is not a float array (`miss_jax.quantized`) says why in its `miss_refusal(action)`."""
        reason = getattr(self.base_layer, "miss_refusal", lambda action: None)(action)
        if reason:
            raise ValueError(reason)

    def new_block(self, config: MissConfig, rngs: nnx.Rngs, param_dtype: Any = jnp.float32) -> MissParam:
        """A fresh block for `config` on this layer (ValueError if the layer's shape does not suit it)."""
        self.refuse(config.variant)
        variant = ops.variant(config.variant)
        random = config.init_weights is False
        block = variant.init(
            rngs.params() if random else None, self.in_features, self.out_features, config.r, config.mini_r,
            random=random, dtype=param_dtype,
        )
        return _block_variable(self.kernel, self.rule, variant, block)

    def add_adapter(
        self, name: str, config: MissConfig, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32,
        block: Optional[MissParam] = None,
    ) -> None:
        """Adds adapter `name` (a new `block`, or the given one), active as the others (PEFT: the first one)."""
        if name in self.variants:
            raise ValueError(f"This layer already has an adapter {name!r}.")
        block = block if block is not None else self.new_block(config, rngs, param_dtype)
        self.miss_block[name] = block
        self.miss_dropout[name] = nnx.Dropout(config.miss_dropout, rngs=rngs if config.miss_dropout else None)
        self.variants = {**self.variants, name: config.variant}
        if not self.active_adapters:
            self.active_adapters = (name,)

    def delete_adapter(self, name: str) -> None:
        """Removes adapter `name` (it must not be merged)."""
        if name in self.merged_adapters:
            raise ValueError(f"Adapter {name!r} is merged here; unmerge it before deleting it.")
        del self.miss_block[name]
        del self.miss_dropout[name]
        self.variants = {k: v for k, v in self.variants.items() if k != name}
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)

    def set_adapter(self, names: Sequence[str]) -> None:
        """Makes `names` (those this layer has) the active adapters, in that order."""
        self.active_adapters = tuple(n for n in names if n in self.variants)

    def forward_adapters(self) -> tuple[str, ...]:
        """The adapters the forward applies, in composition order."""
        if self.disabled:
            return ()
        return ops.composition_order(self.variants, [a for a in self.active_adapters if a not in self.merged_adapters])

    def adapted_kernel(self, names: Sequence[str]) -> jax.Array:
        """The kernel with adapters `names` merged in, in that order (the kernel variable left unchanged)."""
        matrix = self.rule.to_matrix(self.kernel.get_value())
        for name in names:
            matrix = ops.variant(self.variants[name]).merge(matrix, self.miss_block[name].get_value(), "flax")
        return self.rule.from_matrix(matrix, self.kernel.shape)

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """`x` `(..., *in_dims)` -> `(..., *out_dims)`: the base layer, run with the bat adapters' kernel,
        plus the additive adapters' terms."""
        names = self.forward_adapters()
        transforming = [n for n in names if not ops.variant(self.variants[n]).additive]
        additive = [n for n in names if n not in transforming]
        layer = self.base_layer
        if transforming:  # the base layer's own forward, run with W' (no dropout, as in PEFT)
            graphdef, state = nnx.split(self.base_layer)
            params = nnx.to_pure_dict(state)
            params[self.rule.kernel] = self.adapted_kernel(transforming)
            layer = nnx.merge(graphdef, params)
        y = layer(x, *args, **kwargs)
        if not additive:
            return y
        shape = self.kernel.shape
        flat = self.rule.flatten_input(x, shape)
        delta = sum(
            ops.balance_output(
                self.miss_dropout[n](flat),
                ops.variant(self.variants[n]).effective_block(self.miss_block[n].get_value(), self.out_features),
            )
            for n in additive
        )
        delta = self.rule.unflatten_output(delta, shape)
        return (y.astype(delta.dtype) + delta).astype(y.dtype)

    def merge_problem(self, names: Sequence[str]) -> Optional[str]:
        """Why merging `names` here would not be safe (eager only): a block with NaN or inf, a bat block whose
        unmerge could not restore the kernel, or a merged kernel with NaN or inf. None when it is safe."""
        for name in names:
            block = self.miss_block[name].get_value()
            if not ops.is_finite(block):
                return f"adapter {name!r}'s miss_block holds NaN or inf"
            problem = ops.variant(self.variants[name]).unmerge_problem(block)
            if problem:
                return f"adapter {name!r}: {problem}"
        _, order = ops.merge_schedule(self.variants, self.merged_adapters, names)
        return None if ops.is_finite(self.adapted_kernel(order)) else "the merged kernel holds NaN or inf"

    def merge(self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Writes adapters (default: the active ones) into the kernel, in composition order; the forward then
        skips them. `safe_merge` checks `merge_problem` first (eager only, not under `nnx.jit`)."""
        names = self.active_adapters if adapter_names is None else tuple(n for n in adapter_names if n in self.variants)
        undo, order = ops.merge_schedule(self.variants, self.merged_adapters, names)
        if not order:
            return
        self.check_merge_state(self.active_adapters, self.merged_after(names), "merge")
        if safe_merge:
            problem = self.merge_problem(order)
            if problem:
                raise ValueError(f"This MissLinear cannot be merged safely: {problem}; it was not merged.")
        if undo:  # a bat adapter joins merged additive ones: take them out, merge all in composition order
            self.unmerge()
        self.kernel.set_value(self.adapted_kernel(order))
        self.merged_adapters = self.merged_adapters + order

    def merged_after(self, names: Sequence[str]) -> tuple[str, ...]:
        """The adapters merged here, in merge order, once `names` are merged too (`ops.merge_schedule`)."""
        names = [n for n in names if n in self.variants]
        undo, order = ops.merge_schedule(self.variants, self.merged_adapters, names)
        return tuple(n for n in self.merged_adapters if n not in undo) + order

    def check_merge_state(
        self, active: Sequence[str], merged: Sequence[str], action: str, key: str = "this layer"
    ) -> None:
        """ValueError when this layer, with `active` adapters and `merged` ones merged, would not compute what
        it computes unmerged (`adapters.check_merge_state`), or merged adapters its base refuses (`refuse`)."""
        if merged:
            self.refuse("merge")
        adapters.check_merge_state({key: self.variants}, () if self.disabled else active, merged, action)

    def unmerge(self) -> None:
        """Takes every merged adapter back out of the kernel, last merged first (exact inverse, up to
        rounding). Refuses, leaving the layer merged, when that would write NaN or inf into the kernel (bat
        with a singular `I + B`; eager only)."""
        if not self.merged_adapters:
            return
        matrix = self.rule.to_matrix(self.kernel.get_value())
        for name in reversed(self.merged_adapters):
            matrix = ops.variant(self.variants[name]).unmerge(matrix, self.miss_block[name].get_value(), "flax")
        if not isinstance(matrix, jax.core.Tracer) and not ops.is_finite(matrix):
            raise ValueError(
                "Unmerging this MissLinear would write NaN or inf into its kernel (a bat adapter's I + B is "
                "singular); it stays merged."
            )
        self.kernel.set_value(self.rule.from_matrix(matrix, self.kernel.shape))
        self.merged_adapters = ()


class ModulesToSave(nnx.Module):
    """A module trained in full by adapters (PEFT's `ModulesToSaveWrapper`): `original_module` and one copy
    per adapter in `modules_to_save`; calls (and attribute look-ups such as tunix's `embedder.encode`) go to
    the `active` adapter's copy, or to the original while none is active or adapters are disabled."""

    def __init__(self, original_module: nnx.Module):
        self.original_module = original_module
        self.modules_to_save = nnx.Dict()
        self.active: Optional[str] = None
        self.disabled = False

    def in_use(self) -> nnx.Module:
        """The module calls go to."""
        if self.disabled or self.active is None:
            return self.original_module
        return self.modules_to_save[self.active]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.in_use()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("original_module", "modules_to_save", "active", "disabled"):
            raise AttributeError(name)
        return getattr(self.in_use(), name)


def _modules(model: nnx.Module) -> dict[GraphPath, nnx.Module]:
    """Every submodule by graph path, except the insides of `MissLinear`s and `ModulesToSave`s."""
    found = {path: node for path, node in nnx.iter_graph(model) if path and isinstance(node, nnx.Module)}
    wrapped = [path for path, node in found.items() if isinstance(node, (MissLinear, ModulesToSave))]
    return {
        path: node
        for path, node in found.items()
        if not any(path[: len(a)] == a and len(path) > len(a) for a in wrapped)
    }


def key_of(path: GraphPath) -> str:
    """A graph path as a layer key: `("layers", 0, "attn", "q_proj")` -> `"layers.0.attn.q_proj"`."""
    return ".".join(map(str, path))


def _children(node: nnx.Module) -> bool:
    return any(isinstance(v, nnx.Module) for _, v in nnx.iter_children(node))


def discover(model: nnx.Module) -> dict[str, Layer]:
    """The model's modules as `targeting.Layer`s by key; layers with a layer rule carry their sizes
    (`in_features`, `out_features` of the rule's `(in, out)` view) and layout 'flax'.

    >>> from flax import nnx
    >>> discover(nnx.Sequential(nnx.Linear(3, 5, rngs=nnx.Rngs(0))))["layers.0"].out_features
    5
    """
    layers = {}
    for path, node in _modules(model).items():
        names, key = tuple(map(str, path)), key_of(path)
        base = node.base_layer if isinstance(node, MissLinear) else node
        try:
            rule = rule_for(base, key) if has_rule(base) else None
        except ValueError:
            rule = None
        if rule is None:
            layers[key] = Layer(names, type(node).__name__)
            continue
        in_f, out_f = rule.sizes(getattr(base, rule.kernel).shape)
        has_bias = rule.bias is not None and isinstance(getattr(base, rule.bias, None), nnx.Variable)
        layers[key] = Layer(names, type(node).__name__, "flax", in_f, out_f, has_bias)
    return layers


def miss_layers(model: nnx.Module) -> dict[str, MissLinear]:
    """The model's `MissLinear`s by key, e.g. to merge them all: `for m in miss_layers(model).values(): m.merge()`."""
    return {key_of(path): node for path, node in _modules(model).items() if isinstance(node, MissLinear)}


def saved_modules(model: nnx.Module) -> dict[str, ModulesToSave]:
    """The model's `ModulesToSave` wrappers by key."""
    return {key_of(path): node for path, node in _modules(model).items() if isinstance(node, ModulesToSave)}


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


def _check_targets(config: MissConfig, modules: dict[GraphPath, nnx.Module], layers: dict[str, Layer]) -> None:
    """A targeted leaf module with no usable layer rule: ValueError naming it and the fix (`rule_for`'s)."""
    for path, node in modules.items():
        key = key_of(path)
        if matches(config, key) and not layers[key].is_linear and not _children(node):
            rule_for(node.base_layer if isinstance(node, MissLinear) else node, key)


def select_layers(model: nnx.Module, config: MissConfig) -> tuple[MissConfig, tuple[Layer, ...]]:
    """`config` with its targets resolved on `model`, and the layers it adapts (PEFT's rules on graph keys).

    ValueError, as `targeting.select`, for targets that match nothing or a module that is not a layer,
    and naming `miss_jax.layer_rules.register` for a targeted layer of a class with no rule.
    """
    if config.target_modules is None:
        raise ValueError(
            "An NNX model has no model_type to pick PEFT's default targets from: pass `target_modules`, "
            "e.g. MissConfig(target_modules=['q_proj', 'v_proj']) or target_modules='all-linear'."
        )
    modules = _modules(model)
    layers = discover(model)
    config = resolve_targets(config, layers, model_type=None)
    _check_targets(config, modules, layers)
    return config, select(config, layers)


def apply_miss(
    model: M,
    config: MissConfig,
    rngs: nnx.Rngs,
    adapter_name: str = DEFAULT,
    param_dtype: Any = jnp.float32,
    layers: Optional[Sequence[Layer]] = None,
) -> M:
    """Adds adapter `adapter_name` to every layer `config` targets, in place; returns `model`.

    A plain layer is replaced by a `MissLinear`; an adapted one gets one more adapter. Matching follows
    PEFT (`target_modules` names match a key exactly or as a `.`-suffix; a string is a full-match regex;
    `"all-linear"`; `layers_to_transform`, `exclude_modules`). As in PEFT, `layers_to_transform` reads
    the layer index after a named segment: for a top-level list (`layers.0.q_proj`) pass
    `layers_pattern="layers"`. `layers` (from `select_layers`) skips the matching. Blocks are created in
    `param_dtype`, sharded like their kernels' `out` axis.

    Raises ValueError, changing nothing, if a target matches nothing or a module that is not a layer, a
    targeted layer's class has no layer rule, a layer already has `adapter_name`, or a layer's shape does
    not suit `r` / the variant. `bias` and `modules_to_save` are `MissNnxModel`'s (`get_peft_model`).
    """
    if config.bias != "none" or config.modules_to_save:
        raise ValueError(
            f"apply_miss adapts layers only (got bias={config.bias!r}, modules_to_save={config.modules_to_save!r}): "
            "use miss_jax.nnx.get_peft_model(model, config), which trains biases and modules_to_save as PEFT does."
        )
    if layers is None:
        config, layers = select_layers(model, config)
    modules = _modules(model)
    paths = {key_of(path): path for path in modules}
    again = [layer.key for layer in layers if adapter_name in getattr(modules[paths[layer.key]], "variants", {})]
    if again:
        raise ValueError(
            f"Already has an adapter {adapter_name!r}: {again}. Choose another adapter name, or delete it first."
        )
    new: dict[GraphPath, tuple[nnx.Module, Optional[MissParam]]] = {}
    for layer in layers:
        path = paths[layer.key]
        node = modules[path]
        try:
            if isinstance(node, MissLinear):
                new[path] = (node, node.new_block(config, rngs, param_dtype))
            else:
                new[path] = (MissLinear(node, config, rngs=rngs, adapter_name=adapter_name,
                                        param_dtype=param_dtype, key=layer.key), None)
        except ValueError as e:
            raise ValueError(f"Cannot adapt {layer.key} (in={layer.in_features}, out={layer.out_features}): {e}") from None
    for path, (module, block) in new.items():
        if block is None:
            _replace(model, path, module)
        else:
            module.add_adapter(adapter_name, config, rngs=rngs, block=block)
    return model


def merge_and_unload(model: M, safe_merge: bool = False) -> M:
    """Merges the active adapters of every `MissLinear` and puts its base layer back (and the active copy of
    every `ModulesToSave`, as PEFT), in place; returns `model`."""
    layers = miss_layers(model)
    for key, layer in layers.items():  # every layer first: refused, nothing is merged
        layer.check_merge_state(layer.active_adapters, layer.merged_after(layer.active_adapters), "merge", key)
    if safe_merge:
        for key, layer in layers.items():
            problem = layer.merge_problem([a for a in layer.active_adapters if a not in layer.merged_adapters])
            if problem:
                raise ValueError(f"{key} cannot be merged safely: {problem}. Nothing was merged.")
    for path, node in _modules(model).items():
        if isinstance(node, MissLinear):
            node.merge()
            _replace(model, path, node.base_layer)
        elif isinstance(node, ModulesToSave):
            _replace(model, path, node.in_use())
    return model


# --------------------------------------------------------------------------- PEFT's model


@dataclasses.dataclass(frozen=True)
class AdapterState:
    """One adapter of a `MissNnxModel`: its config (targets resolved), the keys of its layers, of its saved
    modules and of the layers whose bias it trains, and whether it trains (`trainable`, PEFT's
    `requires_grad`; False in inference mode: loaded with `is_trainable=False`, or frozen)."""

    config: MissConfig
    layers: tuple[str, ...]
    saved: tuple[str, ...] = ()
    biases: tuple[str, ...] = ()
    trainable: bool = True


class MissNnxModel(nnx.Module):
    """An NNX model with MiSS adapters (PEFT's `PeftModel` + `MissModel` API); call it as the model.

    `base_model` is the model itself, adapted in place. Train with the `trainable` filter::

      optimizer = nnx.Optimizer(peft_model, optax.adamw(1e-3), wrt=peft_model.trainable)
      grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, peft_model.trainable))(peft_model)

    (`trainable` is a snapshot: take it again after `set_adapter` or `set_requires_grad`).

    Args:
      model: the NNX model (changed in place).
      config: the first adapter's config (`target_modules` is required: NNX models have no model_type).
      adapter_name: its name.
      rngs: for random inits and dropout (default `nnx.Rngs(0)`).
      param_dtype: the blocks' dtype (default float32, as PEFT); copies and biases keep their own.
      layers: the layers to adapt (e.g. those a PEFT folder names), instead of matching `config`'s targets.
      saved: the keys of the modules to save (e.g. those a PEFT folder holds), instead of matching
        `config.modules_to_save`.
    """

    def __init__(
        self,
        model: nnx.Module,
        config: MissConfig,
        adapter_name: str = DEFAULT,
        rngs: Optional[nnx.Rngs] = None,
        param_dtype: Any = jnp.float32,
        layers: Optional[Sequence[Layer]] = None,
        saved: Optional[Sequence[str]] = None,
    ):
        self.base_model = model
        self.adapters: dict[str, AdapterState] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.disabled = False
        self.rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.add_adapter(adapter_name, config, param_dtype=param_dtype, layers=layers, saved=saved)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    @property
    def peft_config(self) -> dict[str, MissConfig]:
        """Each adapter's config (targets resolved), by name, in the order they were added."""
        return {name: a.config for name, a in self.adapters.items()}

    @property
    def active_adapter(self) -> str:
        """The first active adapter (PEFT's `active_adapter`)."""
        if not self.active_adapters:
            raise ValueError("No adapter is active: every adapter was deleted. Add one with add_adapter().")
        return self.active_adapters[0]

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        """The adapters merged into the kernels."""
        merged = {a for layer in miss_layers(self.base_model).values() for a in layer.merged_adapters}
        return tuple(a for a in self.adapters if a in merged)

    # ------------------------------------------------------------------ adapters

    def check_new_name(self, adapter_name: Any) -> None:
        """ValueError unless `adapter_name` can name a new adapter (and its PEFT sub-folder):
        `adapters.check_new_name`, the Linen model's rule."""
        adapters.check_new_name(adapter_name, self.adapters)

    def add_adapter(
        self,
        adapter_name: str,
        config: MissConfig,
        param_dtype: Any = jnp.float32,
        layers: Optional[Sequence[Layer]] = None,
        saved: Optional[Sequence[str]] = None,
    ) -> None:
        """Adds an adapter (inactive unless it is the first; activate it with `set_adapter`); as PEFT, one added
        with `config.inference_mode` is frozen (`frozen_adapters`).

        `layers` (e.g. those a PEFT folder names) replaces the matching of `config`'s targets, `saved` (module
        keys) that of its `modules_to_save` (PEFT's rule, `adapters.match_modules_to_save`). Raises
        ValueError, changing nothing, on any target, shape or module that does not fit.
        """
        if not isinstance(config, MissConfig):
            raise ValueError(f"Expected a miss_jax.MissConfig, got {type(config).__name__}.")
        self.check_new_name(adapter_name)
        adapters.check_bias_owner(type(self).__name__, self.peft_config, config)
        model = self.base_model
        if layers is None:
            config, layers = select_layers(model, config)
        modules = {key_of(p): (p, n) for p, n in _modules(model).items()}
        if saved is None:
            saved = adapters.match_modules_to_save(config.modules_to_save, modules, strict=True)
        saved = tuple(saved)
        unknown = [k for k in saved if k not in modules]
        if unknown:
            raise ValueError(f"saved names {unknown}, which are not modules of the model; pass keys of its modules "
                             "(those of miss_jax.nnx.discover(model)).")
        inside = [layer.key for layer in layers if any(layer.key.startswith(s + ".") for s in saved)]
        if inside:
            raise ValueError(f"Layers {inside} sit inside modules_to_save {list(saved)}; exclude one or the other.")
        biases = self._find_biases(config, layers, modules, saved)
        apply_miss(model, dataclasses.replace(config, bias="none", modules_to_save=None), self.rngs, adapter_name,
                   param_dtype, layers)
        for key in saved:  # after apply_miss: nothing below can fail
            path, node = modules[key]
            wrapper = node if isinstance(node, ModulesToSave) else ModulesToSave(node)
            wrapper.modules_to_save[adapter_name] = nnx.clone(wrapper.original_module)
            if node is not wrapper:
                _replace(model, path, wrapper)
        state = AdapterState(config, tuple(l.key for l in layers), saved, biases, not config.inference_mode)
        self.adapters = {**self.adapters, adapter_name: state}
        if not self.active_adapters:
            self.set_adapter(adapter_name, inference_mode=config.inference_mode)
        else:
            self._sync()

    @staticmethod
    def _find_biases(
        config: MissConfig, layers: Sequence[Layer], modules: dict[str, tuple[GraphPath, nnx.Module]],
        saved: tuple[str, ...],
    ) -> tuple[str, ...]:
        if config.bias == "MiSS_only":
            return tuple(layer.key for layer in layers if layer.has_bias)
        if config.bias == "all":
            found = [k for k, (_, node) in modules.items() if bias_leaf(node, k) is not None]
            return tuple(k for k in found if not any(k == s or k.startswith(s + ".") for s in saved))
        return ()

    @property
    def frozen_adapters(self) -> tuple[str, ...]:
        """Adapters in inference mode (PEFT's `requires_grad=False`): loaded with `is_trainable=False`, added
        with `inference_mode=True`, or frozen by `set_adapter(..., inference_mode=True)` / `set_requires_grad`."""
        return tuple(n for n, a in self.adapters.items() if not a.trainable)

    def _names(self, adapter_names: Union[str, Sequence[str]]) -> list[str]:
        """`adapter_names` as a list; ValueError for an unknown or repeated name."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            if n not in self.adapters:
                raise adapters.unknown_adapter(n, list(self.adapters))
        if len(set(names)) != len(names):
            raise ValueError(f"Adapter names repeat in {names}.")
        return names

    def _set_trainable(self, names: Sequence[str], trainable: bool) -> None:
        """Marks adapters `names` trainable or frozen."""
        self.adapters = {n: dataclasses.replace(a, trainable=trainable) if n in names else a
                         for n, a in self.adapters.items()}

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Activates one adapter or several (their terms combine, see docs/DESIGN.md §1).

        As in PEFT, adapters active together must save disjoint `modules_to_save` (each `ModulesToSave`
        then uses the active adapter that has a copy of it), and this makes them trainable, or frozen with
        `inference_mode=True`. ValueError, changing nothing, for unknown names or overlapping saved modules.
        """
        names = self._names(adapter_name)
        saved = {n: tuple(tuple(k.split(".")) for k in self.adapters[n].saved) for n in names}  # keys as paths
        adapters.check_saved_modules(adapters.AdapterSpec(n, self.adapters[n].config, (), saved[n]) for n in names)
        for key, layer in miss_layers(self.base_model).items():
            layer.check_merge_state(names, layer.merged_adapters, "set_adapter", key)
        self.active_adapters = tuple(names)
        self._set_trainable(names, not inference_mode)
        self._sync()

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Unfreezes (`requires_grad=True`) or freezes (False: inference mode) adapters, as PEFT's; a frozen
        adapter's blocks, module copies and biases leave `trainable`.

        miss-jax trains active adapters only, so unfreezing an inactive adapter is refused, naming
        `set_adapter` (PEFT would count it trainable although no forward uses it).
        """
        names = self._names(adapter_names)
        inactive = [n for n in names if n not in self.active_adapters]
        if requires_grad and inactive:
            raise ValueError(
                f"Adapters {inactive} are not active: miss-jax trains active adapters only. Call "
                f"set_adapter({list(self.active_adapters) + inactive!r}) to activate (and unfreeze) them."
            )
        self._set_trainable(names, requires_grad)

    def _sync(self) -> None:
        """Tells every layer and saved module which adapters are active, and whether they are disabled; a saved
        module uses the active adapter that has a copy of it (one at most: `set_adapter`)."""
        for layer in miss_layers(self.base_model).values():
            layer.set_adapter(self.active_adapters)
            layer.disabled = self.disabled
        for wrapper in saved_modules(self.base_model).values():
            wrapper.active = next((a for a in self.active_adapters if a in wrapper.modules_to_save), None)
            wrapper.disabled = self.disabled

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Runs the base model inside the context (merged adapters are unmerged, then merged back)."""
        merged = self.merged_adapters
        if merged:
            self.unmerge_adapter()
        was = self.disabled
        self.disabled = True
        self._sync()
        try:
            yield
        finally:
            self.disabled = was
            self._sync()
            if merged:
                self.merge_adapter(merged)

    def delete_adapter(self, adapter_name: str) -> None:
        """Deletes an adapter, its blocks and module copies (it must not be merged). Biases it trained keep
        their values. If it was active, the other active adapters (else the first by name) stay or become
        active, and trainable (all as in PEFT)."""
        if adapter_name not in self.adapters:
            raise adapters.unknown_adapter(adapter_name, list(self.adapters))
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it.")
        modules = _modules(self.base_model)
        for path, node in modules.items():
            if isinstance(node, MissLinear) and adapter_name in node.variants:
                node.delete_adapter(adapter_name)
                if not node.variants:
                    _replace(self.base_model, path, node.base_layer)
            elif isinstance(node, ModulesToSave) and adapter_name in node.modules_to_save:
                del node.modules_to_save[adapter_name]
                if not len(node.modules_to_save):
                    _replace(self.base_model, path, node.original_module)
        self.adapters = {k: v for k, v in self.adapters.items() if k != adapter_name}
        if adapter_name in self.active_adapters:  # as PEFT: the other active ones, else the first by name
            remaining = [a for a in self.active_adapters if a != adapter_name] or sorted(self.adapters)[:1]
            if remaining and len(self.active_adapters) == 1:
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter "
                              f"to {remaining[0]}.")
            self.active_adapters = tuple(remaining)
            self._set_trainable(remaining, True)  # as PEFT's layers, set_adapter on the remaining ones
        self._sync()

    # ------------------------------------------------------------------ merging

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Merges adapters (default: the active ones) into the kernels, in composition order.

        `safe_merge=True` first checks every layer (finite blocks; bat `I + B` well conditioned; finite
        merged kernels) and merges nothing if one fails.
        """
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        for n in names:
            if n not in self.adapters:
                raise adapters.unknown_adapter(n, list(self.adapters))
        layers = miss_layers(self.base_model)
        for key, layer in layers.items():  # every layer first: refused, nothing is merged
            layer.check_merge_state(layer.active_adapters, layer.merged_after(names), "merge_adapter", key)
        if safe_merge:
            for key, layer in layers.items():
                problem = layer.merge_problem([n for n in names if n in layer.variants and n not in layer.merged_adapters])
                if problem:
                    raise ValueError(f"Cannot merge safely at {key}: {problem}. The model was left unmerged.")
        for layer in layers.values():
            layer.merge(adapter_names=names)

    def unmerge_adapter(self) -> None:
        """Takes every merged adapter back out of the kernels."""
        for layer in miss_layers(self.base_model).values():
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False) -> nnx.Module:
        """The base model with the active adapters merged and the wrappers removed (in place)."""
        return merge_and_unload(self.base_model, safe_merge)

    # ------------------------------------------------------------------ training

    def trainable_paths(self) -> frozenset[GraphPath]:
        """Graph paths (from this model) of the variables a train step updates: the active adapters' blocks,
        their module copies, and the trained biases (the bias of an adapted layer sits in its `base_layer`);
        none of a frozen adapter's (`frozen_adapters`), none while adapters are disabled. Refused while an
        adapter is merged (as the Linen model's `trainable_params`)."""
        merged = self.merged_adapters
        if merged:
            raise ValueError(
                f"Adapters {list(merged)} are merged; call unmerge_adapter() before training (a merged block gets no "
                "gradient, but an optimizer's weight decay would still move it, and unmerging would then corrupt the "
                "base kernel)."
            )
        return self._trainable_paths()

    def _trainable_paths(self) -> frozenset[GraphPath]:
        if self.disabled:
            return frozenset()
        modules = {key_of(p): p for p in _modules(self.base_model)}
        wanted: set[GraphPath] = set()
        for name in self.active_adapters:
            a = self.adapters[name]
            if not a.trainable:
                continue
            for key in a.layers:
                wanted.add(("base_model",) + modules[key] + ("miss_block", name))
            for key in a.saved:
                wanted.add(("base_model",) + modules[key] + ("modules_to_save", name))
        nodes = _modules(self.base_model)
        for a in self.adapters.values():
            for key in a.biases if a.trainable else ():
                leaf = bias_leaf(nodes[modules[key]], key)
                if leaf is not None:
                    wanted.add(("base_model",) + modules[key] + leaf)
        return frozenset(wanted)

    @property
    def trainable(self) -> Callable[[Any, Any], bool]:
        """The filter of the trainable variables (`wrt=` of `nnx.Optimizer`, `nnx.DiffState`). Refused while an
        adapter is merged; a filter taken before a merge refuses each block of a layer merged since (a train
        step traced after the merge, an optimizer update)."""
        return self._filter(self.trainable_paths(), check_merged=True)

    def _filter(self, paths: frozenset[GraphPath], check_merged: bool) -> Callable[[Any, Any], bool]:
        layers = {("base_model",) + p: node for p, node in _modules(self.base_model).items()
                  if isinstance(node, MissLinear)} if check_merged else {}

        def is_trainable(path: Any, value: Any) -> bool:
            path = tuple(path)
            if not isinstance(value, nnx.Param) or not any(path[: len(p)] == p for p in paths):
                return False
            layer = layers.get(path[:-2]) if len(path) > 2 and path[-2] == "miss_block" else None
            if layer is not None and path[-1] in layer.merged_adapters:
                raise ValueError(
                    f"Adapter {path[-1]!r} was merged at {key_of(path[1:-2])} after this trainable filter was taken; "
                    "call unmerge_adapter() before training."
                )
            return True

        return is_trainable

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all): all counts the base params plus every adapter's blocks and module copies."""
        trainable = self._filter(self._trainable_paths(), check_merged=False)  # merged blocks count, as PEFT's
        flat = nnx.to_flat_state(nnx.state(self, nnx.Param))
        sizes = [(path, var, int(math.prod(var.shape))) for path, var in flat]
        return sum(s for p, v, s in sizes if trainable(p, v)), sum(s for _, _, s in sizes)

    def print_trainable_parameters(self) -> None:
        """Prints PEFT's line: trainable params, all params, trainable%."""
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")


def bias_leaf(node: nnx.Module, key: str) -> Optional[GraphPath]:
    """Where `node`'s bias variable sits below it (`("base_layer", "bias")` in a `MissLinear`), or None: a
    layer's bias is its rule's; any other module's is its `bias` attribute."""
    if isinstance(node, MissLinear):
        name = node.rule.bias
        return ("base_layer", name) if name and isinstance(getattr(node.base_layer, name, None), nnx.Param) else None
    if isinstance(node, ModulesToSave):
        return None
    name = rule_for(node, key).bias if has_rule(node) else "bias"
    return (name,) if name and isinstance(getattr(node, name, None), nnx.Param) else None


def get_peft_model(
    model: nnx.Module,
    config: MissConfig,
    adapter_name: str = DEFAULT,
    rngs: Optional[nnx.Rngs] = None,
    param_dtype: Any = jnp.float32,
    layers: Optional[Sequence[Layer]] = None,
    saved: Optional[Sequence[str]] = None,
) -> MissNnxModel:
    """PEFT's entry point for an NNX model: a `MissNnxModel` around `model` (adapted in place)."""
    return MissNnxModel(model, config, adapter_name, rngs, param_dtype, layers, saved)
