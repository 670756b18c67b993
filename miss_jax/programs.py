"""The compiled programs behind `MissModel`, cached per model configuration: the forward (and how it runs,
`ForwardOptions`) and the merge. Two models of one configuration share every program.

A configuration is `model_key(model)`: class, module attributes (config, dtype, ...) and input shape.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import jax

from . import attention, linen, remat, tree
from .adapters import Plan
from .targeting import Layer, discover
from .tree import Path

ModelKey = tuple

_KEYS: "weakref.WeakKeyDictionary[Any, ModelKey]" = weakref.WeakKeyDictionary()
_MODELS: "weakref.WeakValueDictionary[ModelKey, Any]" = weakref.WeakValueDictionary()
_UNIQUE = itertools.count()
_LAYERS: dict[ModelKey, dict[str, Layer]] = {}
_LAYERS_KEPT = 16


def model_key(model: Any) -> ModelKey:
    """A hashable key equal for two transformers Flax models that compute the same function of their params:
    class, module attributes (config, dtype, ...) and input shape. A model whose config has no JSON repr
    (e.g. a NumPy scalar in it) gets a key of its own."""
    if model not in _KEYS:
        try:  # the module's repr holds its config as JSON, which a config with non-JSON values cannot give
            key = (type(model), repr(getattr(model, "module", None)), tuple(getattr(model, "input_shape", ())))
        except (TypeError, ValueError):
            key = (type(model), "instance", next(_UNIQUE))
        _KEYS[model] = key
    return _KEYS[model]


def model_layers(model: Any) -> dict[str, Layer]:
    """Every layer of a transformers Flax model, `{key: Layer}`, from its own init traced abstractly
    (nothing is computed); cached per `model_key`, so adapting more models of one configuration traces once."""
    key = model_key(model)
    if key not in _LAYERS:
        if len(_LAYERS) >= _LAYERS_KEPT:
            _LAYERS.pop(next(iter(_LAYERS)))
        _LAYERS[key] = discover(lambda: model.init_weights(jax.random.PRNGKey(0), model.input_shape))
    return dict(_LAYERS[key])


def dropout_flags(input_names: Sequence[str], rng: jax.Array) -> dict[str, Any]:
    """The keyword arguments that turn dropout on in a transformers Flax model's `__call__`: `train=True`
    (most families) or `deterministic=False` (OPT), with `dropout_rng`."""
    if "train" in input_names:
        return {"train": True, "dropout_rng": rng}
    if "deterministic" in input_names:
        return {"deterministic": False, "dropout_rng": rng}
    raise ValueError(f"This model's __call__ takes neither `train` nor `deterministic` ({list(input_names)}).")


# transformers' own Flax attention, then `miss_jax.attention`'s kernels by name
ATTN_IMPLEMENTATIONS = ("eager", "blockwise", "sdpa", "flash")


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


def _forward(params: Mapping, adapter_params: Mapping, traced: dict, *, key: ModelKey, plan: Plan, statics: tuple,
             options: ForwardOptions):
    return run(_MODELS[key], plan, params, adapter_params, {**traced, **dict(statics)}, options)


_FORWARD = jax.jit(_forward, static_argnames=("key", "plan", "statics", "options"))


def forward(
    model: Any,
    plan: Plan,
    params: Mapping,
    adapter_params: Mapping,
    kwargs: Mapping[str, Any],
    options: ForwardOptions = ForwardOptions(),
) -> Any:
    """`run`, jitted: arrays and pytrees of `kwargs` (e.g. `past_key_values`) are traced, Python scalars and
    None static. One program per (model configuration, plan, static arguments, options, shapes): models of
    one configuration share it."""
    key = model_key(model)
    _MODELS[key] = model  # the model the program calls when it is traced (any of this configuration)
    statics = tuple(sorted((k, v) for k, v in kwargs.items() if _is_static(v)))
    traced = {k: v for k, v in kwargs.items() if not _is_static(v)}
    return _FORWARD(params, adapter_params, traced, key=key, plan=plan, statics=statics, options=options)


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
