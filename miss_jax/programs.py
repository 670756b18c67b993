"""The compiled programs behind `MissModel`: the forward (and how it runs, `ForwardOptions`), generation
(`miss_jax.generation`) and the merge.

A program is keyed on everything that changes what it computes: `model_key(model)`, read at every call
(class, module attributes, input shape and a snapshot of the config as it is *now*, so an edit such as
`config.output_hidden_states = True` or `config.rms_norm_eps = ...` gives a program of its own), the plan,
the static arguments, the options and the shapes of the inputs. Programs are held per model in a bounded
LRU (`ProgramCache`), freed with the model; two models with equal keys share a program.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import jax

from . import attention, linen, remat, tree
from .adapters import Plan
from .targeting import Layer, discover
from .tree import Path

ModelKey = tuple

_STATIC_KEYS: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()
_LAYERS: dict[ModelKey, dict[str, Layer]] = {}
_LAYERS_KEPT = 16


def config_snapshot(config: Any) -> str:
    """A string equal for two configs with equal public attributes (nested configs and dicts included), taken
    now: a later edit of the config gives another snapshot. Private attributes (`_name_or_path`, ...) are left
    out: they do not change what a model computes."""
    if config is None:
        return ""
    public = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    try:
        return json.dumps(public, sort_keys=True, default=_plain)
    except (TypeError, ValueError):  # keys of mixed types, which cannot be sorted: insertion order
        return repr(sorted((k, repr(v)) for k, v in public.items()))


def _plain(value: Any) -> Any:
    """A JSON stand-in for a value json cannot write: a nested config's dict, else the value's repr."""
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else repr(value)


def model_key(model: Any) -> ModelKey:
    """A hashable key equal for two transformers Flax models that compute the same function of their params,
    read now: class, the module's attributes other than its config (dtype, ...) and input shape (fixed at
    construction, cached per model), and `config_snapshot(model.config)` (read at every call)."""
    if model not in _STATIC_KEYS:
        module = getattr(model, "module", None)
        fields = dataclasses.fields(module) if dataclasses.is_dataclass(module) else ()
        attributes = repr(sorted((f.name, repr(getattr(module, f.name, None))) for f in fields
                                 if f.name not in ("config", "parent", "name")))
        _STATIC_KEYS[model] = (type(model), type(module), attributes, tuple(getattr(model, "input_shape", ())))
    return _STATIC_KEYS[model] + (config_snapshot(getattr(model, "config", None)),)


def model_layers(model: Any) -> dict[str, Layer]:
    """Every layer of a transformers Flax model, `{key: Layer}`, from its own init traced abstractly
    (nothing is computed); cached per `model_key`, so adapting more models of one configuration traces once."""
    key = model_key(model)
    if key not in _LAYERS:
        if len(_LAYERS) >= _LAYERS_KEPT:
            _LAYERS.pop(next(iter(_LAYERS)))
        _LAYERS[key] = discover(lambda: model.init_weights(jax.random.PRNGKey(0), model.input_shape))
    return dict(_LAYERS[key])


def shapes(arrays: Any) -> tuple:
    """The structure, shapes and dtypes of a pytree of arrays (part of a program's key: one program per shape)."""
    leaves, treedef = jax.tree_util.tree_flatten(arrays)
    return (treedef, tuple((tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)))
                           for x in leaves))


class _Program:
    """One jitted program and the model it traces with (`slot[0]`, a weak reference set before each call:
    any model of the program's key computes the same function)."""

    def __init__(self, build: Callable[[Callable[[], Any]], Callable]) -> None:
        slot: list = [None]
        self.slot = slot
        self.fn = build(lambda: slot[0]())


class ProgramCache:
    """Jitted programs held per model: each model keeps its `kept` most recently used (an LRU), and a program
    lives as long as a model holding it (the cache never keeps a model, its params or its programs alive).
    Models with equal keys share one program (`trace_count` counts its traces).

    `get(model, key, build)` returns the program for `key` (which must include `model_key(model)`): the one
    cached, or `build(current_model)`, where `current_model()` is the model to trace with.
    """

    def __init__(self, kept: int) -> None:
        self.kept = kept
        self._held: "weakref.WeakKeyDictionary[Any, collections.OrderedDict[tuple, _Program]]" = (
            weakref.WeakKeyDictionary())
        self._shared: "weakref.WeakValueDictionary[tuple, _Program]" = weakref.WeakValueDictionary()

    def get(self, model: Any, key: tuple, build: Callable[[Callable[[], Any]], Callable]) -> Callable:
        held = self._held.setdefault(model, collections.OrderedDict())
        program = held.get(key)
        if program is None:
            program = self._shared.get(key)
            if program is None:
                program = _Program(build)
                self._shared[key] = program
            held[key] = program
            while len(held) > self.kept:
                held.popitem(last=False)
        held.move_to_end(key)
        program.slot[0] = weakref.ref(model)
        return program.fn

    def count(self, model: Optional[Any] = None) -> int:
        """Programs held by `model` (default: distinct programs held by any live model)."""
        if model is not None:
            return len(self._held.get(model, ()))
        return len(self._shared)


PROGRAMS_KEPT = 16  # forward programs each model keeps (one per key and input shapes)
_FORWARDS = ProgramCache(PROGRAMS_KEPT)


def cached_programs(model: Optional[Any] = None) -> int:
    """How many compiled forward programs `model` holds (default: all live models together)."""
    return _FORWARDS.count(model)


def dropout_flags(input_names: Sequence[str], rng: jax.Array) -> dict[str, Any]:
    """The keyword arguments that turn dropout on in a transformers Flax model's `__call__`: `train=True`
    (most families) or `deterministic=False` (OPT), with `dropout_rng`."""
    if "train" in input_names:
        return {"train": True, "dropout_rng": rng}
    if "deterministic" in input_names:
        return {"deterministic": False, "dropout_rng": rng}
    raise ValueError(f"This model's __call__ takes neither `train` nor `deterministic` ({list(input_names)}).")


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """How the forward runs (static, part of every compiled program's key); not what it computes.

    `remat_policy`: per-layer gradient checkpointing with this `miss_jax.remat` policy (None: off).
    `attention`: the self-attention kernel (`miss_jax.attention.Blockwise`, `Sdpa` or `Flash`; None: the
    model's own attention).
    """

    remat_policy: Optional[str] = None
    attention: Optional[attention.Kernel] = None

    def context(self) -> contextlib.ExitStack:
        """The interceptors to trace the forward in."""
        stack = contextlib.ExitStack()
        if self.remat_policy is not None:
            stack.enter_context(remat.checkpointing(self.remat_policy))
        if self.attention is not None:
            stack.enter_context(attention.efficient_attention(self.attention))
        return stack


_TRACES: "collections.Counter[Plan]" = collections.Counter()


def run(
    model: Any,
    plan: Plan,
    params: Mapping,
    adapter_params: Mapping,
    kwargs: Mapping[str, Any],
    options: ForwardOptions = ForwardOptions(),
) -> Any:
    """The pure forward: `model(params=..., **kwargs)` with `plan`'s adapters applied (`linen.apply`), run
    as `options` say."""
    _TRACES[plan] += 1  # under jit this runs once per trace, not per call
    _check_positions(model, kwargs)
    deterministic = not kwargs.get("train", False) and kwargs.get("deterministic", True) is not False
    call = lambda p: model(params=p, **kwargs)  # noqa: E731  (OPT's own `deterministic` stays in kwargs)
    with options.context():
        return linen.apply(plan, call, params, adapter_params, deterministic=deterministic)


def max_positions(model: Any) -> Optional[int]:
    """The longest sequence a transformers model's position embeddings cover (None: no limit, e.g. T5)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) in ("t5", "mt5"):  # relative position buckets: any length
        return None
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _check_positions(model: Any, kwargs: Mapping[str, Any]) -> None:
    ids = kwargs.get("input_ids")
    limit = max_positions(model)
    if ids is not None and limit and getattr(ids, "ndim", 0) == 2 and ids.shape[1] > limit:
        raise ValueError(
            f"Sequences of {ids.shape[1]} tokens exceed this {type(model).__name__}'s {limit} positions (its "
            "position embeddings would be reused silently): cut or split the inputs, or build the model with a "
            "larger max_position_embeddings."
        )


def trace_count(plan: Plan) -> int:
    """How many times the forward of `plan` ran in Python: once per trace under `jit` (the model's own
    forward, a train step), so a count that stops growing means nothing recompiles."""
    return _TRACES[plan]


def forward(
    model: Any,
    plan: Plan,
    params: Mapping,
    adapter_params: Mapping,
    kwargs: Mapping[str, Any],
    options: ForwardOptions = ForwardOptions(),
) -> Any:
    """`run`, jitted: arrays and pytrees of `kwargs` (e.g. `past_key_values`) are traced, Python scalars and
    None static. One program per (`model_key` now, plan, static arguments, options, input shapes), held by the
    model (`ProgramCache`): models of one configuration share it."""
    statics = tuple(sorted((k, v) for k, v in kwargs.items() if _is_static(v)))
    traced = {k: v for k, v in kwargs.items() if not _is_static(v)}
    key = (model_key(model), plan, statics, options, shapes(traced))

    def build(current: Callable[[], Any]) -> Callable:
        return jax.jit(lambda p, a, t: run(current(), plan, p, a, {**t, **dict(statics)}, options))

    return _FORWARDS.get(model, key, build)(params, adapter_params, traced)


def _is_static(value: Any) -> bool:
    """Python scalars and None are static arguments of the forward; arrays and pytrees of them are traced."""
    return value is None or isinstance(value, (bool, int, float, str))


@functools.lru_cache(maxsize=32)
def merge_fn(plan: Plan, names: tuple[str, ...], sign: int, paths: tuple[Path, ...], shardings: tuple) -> Callable:
    """`linen.merge` of the kernels at `paths` (module paths), jitted for one (plan, names, sign): only the
    merged kernels go through the program. A kernel sharded over a mesh (`shardings` entry not None)
    keeps that sharding, so a sharded model is merged shard by shard, never gathered."""

    def merged(kernels: list, adapter_params: Mapping) -> list:
        params = tree.unflatten({path + ("kernel",): k for path, k in zip(paths, kernels)})
        out = tree.flatten(linen.merge(plan, params, adapter_params, names, sign))
        new = [out[path + ("kernel",)] for path in paths]
        return [x if s is None else jax.lax.with_sharding_constraint(x, s) for x, s in zip(new, shardings)]

    return jax.jit(merged)
