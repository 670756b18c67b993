"""The Linen transform: MiSS on the Dense layers of any Linen model, without editing its code.

Two mechanisms, both thin users of `ops`:
  * balance / mini adapters add `fold_input(x) @ D` to a layer's output through a
    `flax.linen.intercept_methods` interceptor keyed by the layer's scope path (the efficient form);
  * bat adapters, `modules_to_save` copies and trained biases are overlaid on the params the model
    is applied with (bat builds the adapted kernel; gradients reach `B` through it).

State is functional. `params` is the base model's param tree (untouched). The adapter pytree is

    {"miss":            {adapter: {<module path...>: {"miss_block": block}}},
     "modules_to_save": {adapter: {<module path...>: <param subtree>}},
     "bias":            {<module path...>: {"bias": bias}}}

with module paths as nested dicts, mirroring `params`. A `Plan` (static, hashable) says which
adapters exist, on which layers, and which are applied.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import unfreeze

from . import ops
from .config import MissConfig
from .targeting import Layer

PyTree = Any
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One adapter: its name, its (resolved) config, the layers it adapts, the module subtrees it saves."""

    name: str
    config: MissConfig
    layers: tuple[Layer, ...]
    saved_modules: tuple[Path, ...] = ()
    bias_paths: tuple[Path, ...] = ()

    @property
    def variant(self) -> str:
        return self.config.variant


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of an adapted model: every adapter, and those applied in the forward.

    `active` lists the adapters whose terms the forward adds (active, not merged, not disabled), in
    activation order. `saved` is the adapter whose `modules_to_save` copies are used (or None).
    """

    adapters: tuple[AdapterSpec, ...]
    active: tuple[str, ...] = ()
    saved: Optional[str] = None

    def spec(self, name: str) -> AdapterSpec:
        for s in self.adapters:
            if s.name == name:
                return s
        raise ValueError(f"Unknown adapter {name!r}; this model has {[s.name for s in self.adapters]}.")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.adapters)


def _flat(tree: Mapping) -> dict[Path, Any]:
    return traverse_util.flatten_dict(unfreeze(tree)) if tree else {}


def _get(tree: Mapping, path: Path) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(flat: dict[Path, Any], path: Path, value: Any) -> None:
    """Writes `value` (a leaf or a subtree) at `path` of a flattened tree."""
    if isinstance(value, Mapping):
        for sub, leaf in _flat(value).items():
            flat[path + sub] = leaf
    else:
        flat[path] = value


def _nest(flat: dict[Path, Any]) -> dict:
    return traverse_util.unflatten_dict(flat)


def is_abstract(tree: PyTree) -> bool:
    """True when some leaf is a `jax.ShapeDtypeStruct` (shapes only, e.g. `low_cpu_mem_usage` adapters)."""
    return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree_util.tree_leaves(tree))


def replace_leaves(tree: Mapping, leaves: Mapping[Path, Any]) -> dict:
    """A copy of `tree` with the leaf at each path of `leaves` replaced; only the dicts on those paths
    are copied, every other subtree is shared."""
    out = dict(tree)
    heads: dict[str, dict[Path, Any]] = {}
    for path, leaf in leaves.items():
        if len(path) == 1:
            out[path[0]] = leaf
        else:
            heads.setdefault(path[0], {})[path[1:]] = leaf
    for head, sub in heads.items():
        out[head] = replace_leaves(tree[head], sub)
    return out


def block_of(adapter_params: Mapping, name: str, layer: Layer) -> jax.Array:
    """The `miss_block` of adapter `name` on `layer`."""
    try:
        return _get(adapter_params["miss"][name], layer.path)["miss_block"]
    except KeyError:
        raise ValueError(f"Adapter params hold no miss_block for adapter {name!r} at {layer.key}.") from None


def effective_block(spec: AdapterSpec, layer: Layer, block: jax.Array) -> jax.Array:
    """Balance `(r, out)` block of a balance/mini adapter (mini tiled over `out`)."""
    return ops.expand_mini(block, layer.out_features) if spec.variant == "mini" else block


# --------------------------------------------------------------------------- creating adapters


def init_adapter(spec: AdapterSpec, params: Mapping, rng: jax.Array, abstract: bool = False) -> PyTree:
    """New adapter params for `spec`: `{"miss": {...}, "modules_to_save": {...}}` (this adapter only).

    Blocks follow `ops.init_block`; `modules_to_save` start as the base subtrees (JAX arrays are
    immutable, so no copy is made). With `abstract`, leaves are `jax.ShapeDtypeStruct`s.
    """
    c = spec.config
    miss: dict[Path, Any] = {}
    rngs = jax.random.split(rng, max(len(spec.layers), 1))
    for layer, key in zip(spec.layers, rngs):
        make = lambda key=key, layer=layer: ops.init_block(  # noqa: E731
            key, spec.variant, layer.in_features, layer.out_features, c.r, c.mini_r, random=c.init_weights is False
        )
        miss[layer.path + ("miss_block",)] = jax.eval_shape(make) if abstract else make()
    saved: dict[Path, Any] = {}
    for path in spec.saved_modules:
        sub = _get(params, path)
        _set(saved, path, jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), sub)
             if abstract else sub)
    return {"miss": _nest(miss), "modules_to_save": _nest(saved)}


def find_modules_to_save(config: MissConfig, params: Mapping) -> tuple[Path, ...]:
    """Module paths (param subtrees) whose name equals or ends with an entry of `modules_to_save`.

    Raises if no entry matches (PEFT's task wrappers add names such as "score" that a model may lack).
    """
    names = config.modules_to_save or ()
    found: list[Path] = []
    modules = sorted({path[:i] for path in _flat(params) for i in range(1, len(path))})
    for path in modules:
        key = ".".join(path)
        if any(key == n or key.endswith("." + n) for n in names) and not any(path[: len(f)] == f for f in found):
            found.append(path)
    if names and not found:  # as PEFT, names that match nothing are skipped while another one matches
        raise ValueError(
            f"modules_to_save {list(names)} not found in the model's params; top-level modules are "
            f"{sorted({p[0] for p in _flat(params)})}."
        )
    return tuple(found)


def find_bias_paths(
    config: MissConfig, params: Mapping, layers: tuple[Layer, ...], saved: tuple[Path, ...] = ()
) -> tuple[Path, ...]:
    """Module paths whose `bias` is trained: every bias ("all") or those of adapted layers ("MiSS_only").

    Biases inside `saved` (modules_to_save) modules are left out: as in PEFT, their copy trains instead.
    """
    if config.bias == "all":
        return tuple(
            path[:-1] for path in _flat(params)
            if path[-1] == "bias" and not any(path[: len(s)] == s for s in saved)
        )
    if config.bias == "MiSS_only":
        return tuple(layer.path for layer in layers if layer.has_bias)
    return ()


# --------------------------------------------------------------------------- the forward


def overlay(plan: Plan, params: Mapping, adapter_params: Mapping) -> dict:
    """The params the model runs with: trained biases, the `saved` adapter's module copies, and
    bat-adapted kernels (in activation order) over the base `params`."""
    flat = _flat(params)
    for path, leaf in _flat(adapter_params.get("bias", {})).items():
        flat[path] = leaf
    if plan.saved is not None:
        saved = adapter_params.get("modules_to_save", {}).get(plan.saved, {})
        for path, leaf in _flat(saved).items():
            flat[path] = leaf
    for name in plan.active:
        spec = plan.spec(name)
        if spec.variant != "bat":
            continue
        for layer in spec.layers:
            k = layer.path + ("kernel",)
            flat[k] = ops.bat_kernel(flat[k], block_of(adapter_params, name, layer), layer.layout)
    return _nest(flat)


def additive_terms(plan: Plan, adapter_params: Mapping) -> dict[Path, list[tuple[AdapterSpec, jax.Array]]]:
    """For each layer path, the (spec, balance block) pairs of the applied balance/mini adapters."""
    terms: dict[Path, list[tuple[AdapterSpec, jax.Array]]] = {}
    for name in plan.active:
        spec = plan.spec(name)
        if spec.variant == "bat":
            continue
        for layer in spec.layers:
            block = effective_block(spec, layer, block_of(adapter_params, name, layer))
            terms.setdefault(layer.path, []).append((spec, block))
    return terms


@contextlib.contextmanager
def intercept(plan: Plan, adapter_params: Mapping, deterministic: bool = True) -> Iterator[None]:
    """Within this context, every Linen call of an adapted layer adds its balance/mini terms.

    Dropout (`miss_dropout`) applies to the layer input on the adapter path only, in training only,
    with the `"dropout"` rng stream the caller passed to `apply`.
    """
    terms = additive_terms(plan, adapter_params)
    # Layers whose (bat-adapted) kernel the forward differentiates run on a 2-D view of their input: the
    # kernel gradient is then a plain (T, in)^T @ (T, out) matmul, where for 3-D operands XLA:CPU first
    # transposes copies of both.
    flat_input = {layer.path for n in plan.active if plan.spec(n).variant == "bat" for layer in plan.spec(n).layers}

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.method_name != "__call__" or not args:
            return next_fun(*args, **kwargs)
        x = args[0]
        if context.module.path in flat_input and x.ndim > 2:
            out = next_fun(x.reshape(-1, x.shape[-1]), *args[1:], **kwargs)
            out = out.reshape(*x.shape[:-1], out.shape[-1])
        else:
            out = next_fun(*args, **kwargs)
        entries = terms.get(context.module.path)
        if not entries:
            return out
        delta = None
        for spec, block in entries:
            rate = 0.0 if deterministic else spec.config.miss_dropout
            xi = ops.dropout(x, rate, context.module.make_rng("dropout") if rate else None)
            term = ops.balance_output(xi, block)
            delta = term if delta is None else delta + term
        return (out.astype(delta.dtype) + delta).astype(out.dtype)

    with nn.intercept_methods(interceptor):
        yield


def apply(
    plan: Plan,
    call: Callable[..., Any],
    params: Mapping,
    adapter_params: Mapping,
    *args: Any,
    deterministic: bool = True,
    **kwargs: Any,
) -> Any:
    """Runs `call(effective_params, *args, **kwargs)` with the plan's adapters applied.

    `call` is the model's own apply, e.g. `lambda p, *a, **k: hf_model(*a, params=p, **k)` or
    `lambda p, *a, **k: module.apply({"params": p}, *a, **k)`. `deterministic=False` turns on
    `miss_dropout` (Flax's convention). Pure and jit-able; differentiate with respect to `adapter_params`.
    """
    with intercept(plan, adapter_params, deterministic):
        return call(overlay(plan, params, adapter_params), *args, **kwargs)


# --------------------------------------------------------------------------- merging


def merge_order(plan: Plan, names: tuple[str, ...]) -> tuple[str, ...]:
    """The order merging applies `names` in: bat adapters first, then balance/mini, each as given.

    This is the order the unmerged forward composes them in, so merged equals unmerged.
    """
    bat = tuple(n for n in names if plan.spec(n).variant == "bat")
    return bat + tuple(n for n in names if n not in bat)


def merge(
    plan: Plan, params: Mapping, adapter_params: Mapping, names: tuple[str, ...], sign: int = 1
) -> dict:
    """Params with adapters `names` merged in (`sign=1`, in `merge_order`) or taken out (`sign=-1`).

    Unmerging undoes the same `merge_order` last-first (bat exactly, through the inverse), so the
    `names` that merged also unmerge. Float32 maths, cast back to each kernel's dtype.
    """
    flat = _flat(params)
    order = merge_order(plan, names)
    order = order if sign > 0 else order[::-1]
    for spec in (plan.spec(n) for n in order):
        for layer in spec.layers:
            k = layer.path + ("kernel",)
            block = block_of(adapter_params, spec.name, layer)
            if spec.variant == "bat":
                fn = ops.bat_kernel if sign > 0 else ops.bat_unmerge
                flat[k] = fn(flat[k], block, layer.layout)
            else:
                flat[k] = ops.merge_balance(flat[k], effective_block(spec, layer, block), layer.layout, sign)
    return _nest(flat)


def check_finite(params: Mapping, plan: Plan, names: tuple[str, ...]) -> None:
    """`safe_merge`: raises if a merged kernel of one of `names` holds NaN or inf."""
    for name in names:
        for layer in plan.spec(name).layers:
            kernel = _get(params, layer.path)["kernel"]
            if not bool(jnp.isfinite(kernel).all()):
                raise ValueError(
                    f"NaNs or infs detected in the merged weights of {layer.key}. The adapter {name!r} seems to be "
                    "broken; the model was left unmerged."
                )
