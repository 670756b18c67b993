"""What an adapted model holds: adapter specs, the static `Plan`, and the adapter pytree.

The adapter pytree (one definition, used by every module) is

    {"miss":            {adapter: {<module path...>: {"miss_block": block}}},
     "modules_to_save": {adapter: {<module path...>: <param subtree>}},
     "bias":            {<module path...>: {"bias": bias}}}

with module paths as nested dicts mirroring the base `params`. Blocks are shaped as
`ops.variant(...).block_shape` says; `modules_to_save` copies and biases like the params they copy.
Trained biases belong to the one adapter of a model that may train them (`bias != "none"`, as PEFT);
deleting that adapter writes them into the base params, as PEFT keeps biases it trained in place.

>>> tree = empty()
>>> sorted(tree)
['bias', 'miss', 'modules_to_save']
>>> locate(("miss", "default", "model", "q_proj", BLOCK))
LeafRef(group='miss', adapter='default', module=('model', 'q_proj'), leaf='miss_block')
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import jax

from . import ops, tree
from .config import MissConfig
from .targeting import Layer
from .tree import Path

PyTree = Any

MISS = "miss"
MODULES_TO_SAVE = "modules_to_save"
BIAS = "bias"
GROUPS = (MISS, MODULES_TO_SAVE, BIAS)
BLOCK = "miss_block"  # the leaf name of a block (PEFT's parameter name too)
RESERVED_NAMES = GROUPS + ("base_model",)  # names an adapter cannot take
# PEFT's names around an adapted model, in its parameter and state-dict keys (`MissModel.named_parameters`,
# `interop.names`)
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (the tuner), whose .model is the wrapped model
PEFT_BASE_LAYER = "base_layer"  # the layer a MiSS layer wraps: an adapted layer's bias is `<path>.base_layer.bias`
PEFT_ORIGINAL_MODULE = "original_module"  # the untouched module beside its modules_to_save copies


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One adapter: its name, its (resolved) config, the layers it adapts, the module subtrees it saves
    and the module paths whose bias it trains."""

    name: str
    config: MissConfig
    layers: tuple[Layer, ...]
    saved_modules: tuple[Path, ...] = ()
    bias_paths: tuple[Path, ...] = ()

    @property
    def variant(self) -> ops.Variant:
        """The variant's entry of `ops.VARIANTS`."""
        return ops.variant(self.config.variant)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of an adapted model: every adapter, and those applied in the forward.

    `active` lists the adapters whose terms the forward adds (active, not merged, not disabled), in
    activation order. `saved` lists the active adapters whose `modules_to_save` copies are used (several
    when their modules do not overlap: `check_saved_modules`).
    """

    adapters: tuple[AdapterSpec, ...]
    active: tuple[str, ...] = ()
    saved: tuple[str, ...] = ()

    def spec(self, name: str) -> AdapterSpec:
        """The spec of adapter `name`; ValueError naming the adapters there are."""
        for s in self.adapters:
            if s.name == name:
                return s
        raise unknown_adapter(name, self.names)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.adapters)

    @property
    def applied(self) -> tuple[str, ...]:
        """Every adapter whose weights the forward reads: the `active` ones, then the other `saved` ones."""
        return self.active + tuple(n for n in self.saved if n not in self.active)


def check_bias_owner(model_name: str, configs: Mapping[str, MissConfig], config: MissConfig) -> None:
    """PEFT's rule: only one adapter of a model may train biases. ValueError (PEFT's message) when `config`
    has `bias != "none"` and one of the model's adapters `configs` already does."""
    owners = [n for n, c in configs.items() if c.bias != "none"]
    if config.bias != "none" and owners:
        raise ValueError(
            f"{model_name} supports only 1 adapter with bias (adapter {owners[0]!r} has bias="
            f"{configs[owners[0]].bias!r}). When using multiple adapters, set bias to 'none' for all adapters."
        )


def check_saved_modules(specs: Iterable[AdapterSpec]) -> None:
    """ValueError if two of `specs` (adapters to activate together) save the same module (or one inside the
    other): as PEFT, each module's copy can come from one active adapter only; disjoint ones combine."""
    owner: dict[Path, str] = {}
    for spec in specs:
        for path in spec.saved_modules:
            clash = next((p for p in owner if p[: len(path)] == path or path[: len(p)] == p), None)
            if clash is not None:
                raise ValueError(
                    "Only one adapter can be set at a time for ModulesToSaveWrapper (PEFT's words), the "
                    f"modules_to_save module {'.'.join(path)}: adapters {owner[clash]!r} and {spec.name!r} both save "
                    "it. Activate them one at a time."
                )
            owner[path] = spec.name


def check_new_name(adapter_name: Any, existing: Collection[str]) -> None:
    """ValueError unless `adapter_name` can name a new adapter of a model holding `existing` (Linen and NNX):
    a non-empty string, not taken, not reserved, and usable as the folder `save_pretrained` writes it into
    (no path separator, no leading '.', no NUL, at most 255 bytes)."""
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"Adapter names are non-empty strings, got {adapter_name!r}.")
    if adapter_name in existing:
        raise ValueError(f"Adapter with name {adapter_name!r} already exists; choose another name or delete it first.")
    if adapter_name.startswith(".") or os.sep in adapter_name or (os.altsep or os.sep) in adapter_name:
        raise ValueError(
            f"Adapter name {adapter_name!r} cannot hold a path separator or start with '.': save_pretrained "
            "writes each adapter into a sub-folder named after it."
        )
    if adapter_name in RESERVED_NAMES:
        raise ValueError(f"Adapter name {adapter_name!r} is reserved; choose another name.")
    if "\0" in adapter_name or len(adapter_name.encode()) > 255:
        raise ValueError(
            f"Adapter name {adapter_name[:40]!r}... cannot be a folder name (a NUL character, or over 255 bytes): "
            "save_pretrained writes each adapter into a sub-folder named after it; choose a shorter name."
        )


class MergeStateError(ValueError):
    """A merge (or activation) refused because the merged model would not compute what the unmerged one does."""


def check_merge_state(
    layers: Mapping[str, Mapping[str, str]], active: Sequence[str], merged: Sequence[str], action: str
) -> None:
    """ValueError, before `action` changes anything, when a layer would then hold merged adapters that change
    what its unmerged active adapters compute (`ops.partial_merge_problem`; Linen and NNX).

    `layers`: `{layer key: {adapter name: variant name}}` for the adapters on each layer; `active`: the active
    adapters in activation order (empty while adapters are disabled); `merged`: the merged ones in merge order.
    """
    for key, variants in layers.items():
        problem = ops.partial_merge_problem(variants, active, merged)
        if problem:
            together = [n for n in dict.fromkeys(list(merged) + list(active)) if n in variants]
            raise MergeStateError(
                f"{action} refused, the model is unchanged: at {key}, {problem}, so the merged model would not "
                f"compute what the unmerged one does. Merge them together (merge_adapter({together!r})), or "
                "unmerge_adapter() first, or leave the bat adapters inactive."
            )


def unknown_adapter(name: Any, names: Sequence[str]) -> ValueError:
    """The error for an adapter name that is not one of `names` (with PEFT's words, "Adapter x does not exist")."""
    return ValueError(f"Unknown adapter {name!r} (Adapter {name} does not exist); this model has {list(names)}.")


class LeafRef(NamedTuple):
    """Where a leaf of the adapter pytree sits: its group, adapter (None for biases), module path and leaf name."""

    group: str
    adapter: Optional[str]
    module: Path
    leaf: str


def locate(path: Path) -> LeafRef:
    """Decodes the path of a leaf of the adapter pytree (or of `trainable_params()`)."""
    if path and path[0] in (MISS, MODULES_TO_SAVE) and len(path) >= 3:
        return LeafRef(path[0], path[1], tuple(path[2:-1]), path[-1])
    if path and path[0] == BIAS and len(path) >= 2:
        return LeafRef(BIAS, None, tuple(path[1:-1]), path[-1])
    raise ValueError(f"{tree.path_str(path)!r} is not a leaf of the adapter pytree; its groups are {list(GROUPS)}.")


def empty() -> dict:
    """An adapter pytree with no adapters."""
    return {group: {} for group in GROUPS}


def block(adapter_params: Mapping, name: str, layer: Layer) -> jax.Array:
    """The `miss_block` of adapter `name` on `layer`."""
    try:
        return tree.get(adapter_params[MISS][name], layer.path)[BLOCK]
    except KeyError:
        raise ValueError(f"Adapter params hold no {BLOCK} for adapter {name!r} at {layer.key}.") from None


def own(adapter_params: Mapping, name: str) -> dict:
    """Adapter `name`'s own part of the pytree: `{"miss": ..., "modules_to_save": ...}` (no biases)."""
    return {MISS: adapter_params[MISS][name], MODULES_TO_SAVE: adapter_params[MODULES_TO_SAVE].get(name, {})}


def with_adapter(adapter_params: Mapping, name: str, new: Mapping, biases: Mapping[Path, Any]) -> dict:
    """A new pytree with adapter `name`'s `own` part `new`, and the bias leaves `biases` (module path ->
    bias) added where none is trained yet."""
    out = {MISS: {**adapter_params[MISS], name: new[MISS]}, MODULES_TO_SAVE: dict(adapter_params[MODULES_TO_SAVE])}
    if new[MODULES_TO_SAVE]:
        out[MODULES_TO_SAVE][name] = new[MODULES_TO_SAVE]
    flat = tree.flatten(adapter_params[BIAS])
    for path, bias in biases.items():
        flat.setdefault(path + ("bias",), bias)
    out[BIAS] = tree.unflatten(flat)
    return out


def without_adapter(adapter_params: Mapping, name: str, kept_bias_paths: set[Path]) -> dict:
    """A new pytree without adapter `name`; biases stay only at `kept_bias_paths` (those other adapters train)."""
    bias = {k: v for k, v in tree.flatten(adapter_params[BIAS]).items() if k[:-1] in kept_bias_paths}
    return {
        MISS: {k: v for k, v in adapter_params[MISS].items() if k != name},
        MODULES_TO_SAVE: {k: v for k, v in adapter_params[MODULES_TO_SAVE].items() if k != name},
        BIAS: tree.unflatten(bias),
    }


def trainable(adapter_params: Mapping, plan: Plan) -> dict:
    """What a train step differentiates for `plan`: the active blocks, the `saved` adapters' module copies,
    and the trained biases."""
    return {
        MISS: {n: adapter_params[MISS][n] for n in plan.active},
        MODULES_TO_SAVE: {n: adapter_params[MODULES_TO_SAVE][n] for n in plan.saved},
        BIAS: adapter_params[BIAS],
    }


def frozen_part(trainable_tree: Mapping, plan: Plan, frozen: Collection[str]) -> dict:
    """The part of `trainable_tree` (a `trainable(..., plan)` pytree, or one shaped like it: gradients,
    updates) that belongs to the adapters `frozen`: their blocks, their module copies, and the biases one of
    them trains (PEFT 0.21 leaves a frozen adapter's biases trainable; miss-jax freezes them with it).
    Same groups as the adapter pytree; train steps never update these leaves."""
    bias_paths = {path for name in frozen for path in plan.spec(name).bias_paths}
    return {
        MISS: {n: v for n, v in trainable_tree.get(MISS, {}).items() if n in frozen},
        MODULES_TO_SAVE: {n: v for n, v in trainable_tree.get(MODULES_TO_SAVE, {}).items() if n in frozen},
        BIAS: tree.unflatten({p: v for p, v in tree.flatten(trainable_tree.get(BIAS, {})).items()
                              if p[:-1] in bias_paths}),
    }


# --------------------------------------------------------------------------- creating adapters


def match_modules_to_save(
    names: Optional[Sequence[str]], keys: Iterable[str], strict: bool = False
) -> tuple[str, ...]:
    """The module keys (dotted paths, `model.layers.0.norm`) among `keys` that `modules_to_save` `names`
    select, in the order of `keys`: PEFT's rule (`key.endswith(name)`, so `"lm_head"` selects `my_lm_head`
    too), less those inside another selected module (its copy holds them).

    With `strict`, ValueError when `names` select nothing (PEFT's task wrappers add names such as "score"
    that a model may lack; as PEFT, names that match nothing are skipped while another one matches).

    >>> match_modules_to_save(["lm_head", "norm"], ["lm_head", "my_lm_head", "norm", "norm.inner", "layer_norms"])
    ('lm_head', 'my_lm_head', 'norm')
    """
    names = tuple(names or ())
    keys = list(keys)
    picked = [k for k in keys if any(k.endswith(n) for n in names)]
    found = tuple(k for k in picked if not any(k.startswith(p + ".") for p in picked))
    if strict and names and not found:
        raise ValueError(
            f"modules_to_save {list(names)} not found in the model: no module path ends with one of them. Its "
            f"top-level modules are {sorted({k.split('.')[0] for k in keys})}."
        )
    return found


def find_modules_to_save(config: MissConfig, params: Mapping) -> tuple[Path, ...]:
    """Module paths (param subtrees) that `config.modules_to_save` selects (`match_modules_to_save`);
    ValueError if it names modules and selects none."""
    modules = {".".join(p[:i]): p[:i] for p in tree.flatten(params) for i in range(1, len(p))}
    found = match_modules_to_save(config.modules_to_save, sorted(modules, key=modules.get), strict=True)
    return tuple(modules[k] for k in found)


def find_bias_paths(
    config: MissConfig, params: Mapping, layers: tuple[Layer, ...], saved: tuple[Path, ...] = ()
) -> tuple[Path, ...]:
    """Module paths whose `bias` is trained: every bias ("all") or those of adapted layers ("MiSS_only").

    Biases inside `saved` (modules_to_save) modules are left out: as in PEFT, their copy trains instead.
    """
    if config.bias == "all":
        return tuple(
            path[:-1] for path in tree.flatten(params)
            if path[-1] == "bias" and not any(path[: len(s)] == s for s in saved)
        )
    if config.bias == "MiSS_only":
        return tuple(layer.path for layer in layers if layer.has_bias)
    return ()


def make_spec(name: str, config: MissConfig, layers: tuple[Layer, ...], params: Mapping) -> AdapterSpec:
    """The spec of adapter `name` with `config` (targets resolved) on `layers` of a model with `params`."""
    saved = find_modules_to_save(config, params)
    return AdapterSpec(name, config, layers, saved, find_bias_paths(config, params, layers, saved))


def init(spec: AdapterSpec, params: Mapping, rng: jax.Array, abstract: bool = False) -> dict:
    """New `own` params of `spec`: `{"miss": {...}, "modules_to_save": {...}}`.

    Blocks follow `spec.variant.init` (validated against each layer's shape); `modules_to_save` start
    as the base subtrees (JAX arrays are immutable, so no copy is made). With `abstract`, leaves are
    `jax.ShapeDtypeStruct`s.
    """
    c, variant = spec.config, spec.variant
    miss: dict[Path, Any] = {}
    rngs = jax.random.split(rng, max(len(spec.layers), 1))
    for layer, key in zip(spec.layers, rngs):
        make = lambda key=key, layer=layer: variant.init(  # noqa: E731
            key, layer.in_features, layer.out_features, c.r, c.mini_r, random=c.init_weights is False
        )
        try:
            miss[layer.path + (BLOCK,)] = jax.eval_shape(make) if abstract else make()
        except ValueError as e:
            raise ValueError(f"Cannot adapt {layer.key} (in={layer.in_features}, out={layer.out_features}): {e}") from None
    saved: dict[Path, Any] = {}
    for path in spec.saved_modules:
        sub = tree.get(params, path)
        tree.put(saved, path, tree.shapes(sub) if abstract else sub)
    return {MISS: tree.unflatten(miss), MODULES_TO_SAVE: tree.unflatten(saved)}
