"""MiSS layers for Flax NNX: `MissLinear` wraps a layer in place, `ModulesToSave` holds module copies.

The maths is `miss_jax.ops`; which layers are adapted follows PEFT's matching rules
(`miss_jax.targeting`) on a layer's key, its path in the NNX graph joined by `.` (`layers.0.attn.q_proj`);
which layers can be adapted, and how their kernels map to `(in, out)`, is `miss_jax.layer_rules`
(`nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum`, bridged Linen `Dense` / `DenseGeneral`, and
registered einsum-style modules such as tunix's). Adapter blocks are `MissParam` variables.

Two levels:

* `apply_miss(model, config, rngs)` (here) adapts a plain NNX model in place (one named adapter; call it
  again with another name for more): `wrt=MissParam` trains the blocks.
* `miss_jax.get_peft_model(model, config)` returns a `miss_jax.nnx.MissNnxModel`, PEFT's lifecycle
  (`miss_jax.lifecycle`, shared with transformers models) over these layers.

Several adapters on one layer compose as in the Linen path (docs/DESIGN.md §1): the kernel-transforming
(bat) adapters first, in activation order, then the additive terms, summed.

Example usage::

  >>> from flax import nnx
  >>> import jax.numpy as jnp, optax
  >>> from miss_jax import MissConfig
  >>> from miss_jax.nnx_layers import MissParam, apply_miss, merge_and_unload
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

from collections.abc import Sequence
from typing import Any, Optional, TypeVar, Union

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import adapters, ops
from .config import MissConfig
from .layer_rules import KernelRule, has_rule, rule_for
from .nnx_variables import MissParam
from .targeting import Layer, matches, resolve_targets, select

M = TypeVar("M", bound=nnx.Module)
GraphPath = tuple[Union[str, int], ...]
DEFAULT = "default"


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


def graph_modules(model: nnx.Module) -> dict[GraphPath, nnx.Module]:
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
    for path, node in graph_modules(model).items():
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
    return {key_of(path): node for path, node in graph_modules(model).items() if isinstance(node, MissLinear)}


def saved_modules(model: nnx.Module) -> dict[str, ModulesToSave]:
    """The model's `ModulesToSave` wrappers by key."""
    return {key_of(path): node for path, node in graph_modules(model).items() if isinstance(node, ModulesToSave)}


_CONTAINERS = (list, dict, nnx.List, nnx.Dict)  # children by item; any other node's children are attributes


def replace_module(model: nnx.Module, path: GraphPath, new: nnx.Module) -> None:
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
    modules = graph_modules(model)
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
    modules = graph_modules(model)
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
            replace_module(model, path, module)
        else:
            module.add_adapter(adapter_name, config, rngs=rngs, block=block)
    return model


def merge_and_unload(model: M, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> M:
    """Merges adapters `adapter_names` (default: each layer's active ones) into every `MissLinear` and puts its
    base layer back (and the active copy of every `ModulesToSave`, as PEFT), in place; returns `model`.
    Adapters merged before stay merged; the others are dropped (PEFT's `merge_and_unload`)."""
    layers = miss_layers(model)
    todo = {key: [a for a in (layer.active_adapters if adapter_names is None else adapter_names)
                  if a in layer.variants and a not in layer.merged_adapters] for key, layer in layers.items()}
    for key, layer in layers.items():  # every layer first: refused, nothing is merged
        if todo[key]:
            layer.refuse("merge")
    if safe_merge:
        for key, layer in layers.items():
            problem = layer.merge_problem(todo[key])
            if problem:
                raise ValueError(f"{key} cannot be merged safely: {problem}. Nothing was merged.")
    for key, layer in layers.items():
        layer.set_adapter(todo[key])  # the layer goes away: merging all it keeps at once is always exact
        layer.merge()
    return unload(model)


def unload(model: M) -> M:
    """Puts every `MissLinear`'s base layer back (merged adapters stay merged) and every `ModulesToSave`'s module
    in use (PEFT's `unload`), in place; returns `model`."""
    for path, node in graph_modules(model).items():
        if isinstance(node, MissLinear):
            replace_module(model, path, node.base_layer)
        elif isinstance(node, ModulesToSave):
            replace_module(model, path, node.in_use())
    return model


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
