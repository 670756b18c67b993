"""`MissModel`: PEFT's adapter lifecycle over a transformers Flax model, on the functional core.

The object holds the base model, its params (merged adapters included), the adapter pytree and the
adapter configs; every computation goes through `miss_jax.linen`'s pure functions, jit-compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from . import linen
from .config import MissConfig
from .linen import AdapterSpec, Path, Plan, _flat, _nest
from .targeting import Layer, discover, resolve_targets, select

PyTree = Any


def _count(tree: PyTree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "__jax_array__")


@functools.lru_cache(maxsize=32)
def _merge_fn(plan: Plan, names: tuple[str, ...], sign: int, paths: tuple[Path, ...], shardings: tuple) -> Callable:
    """`linen.merge` of the kernels at `paths` (module paths), jitted for one (plan, names, sign): only the
    merged kernels go through the program. A kernel sharded over a mesh (`shardings` entry not None)
    keeps that sharding, so a sharded model is merged shard by shard, never gathered."""

    def merged(kernels: list, adapter_params: Mapping) -> list:
        tree = _nest({path + ("kernel",): k for path, k in zip(paths, kernels)})
        out = _flat(linen.merge(plan, tree, adapter_params, names, sign))
        new = [out[path + ("kernel",)] for path in paths]
        return [x if s is None else jax.lax.with_sharding_constraint(x, s) for x, s in zip(new, shardings)]

    return jax.jit(merged)


_LAYERS: dict[tuple, dict[str, Layer]] = {}
_LAYERS_KEPT = 16


def _model_layers(model: Any) -> dict[str, Layer]:
    """Every layer of a transformers Flax model, `{key: Layer}`, from its own init traced abstractly
    (nothing is computed). Cached per model class, module attributes (config, dtype, ...) and input
    shape, so adapting more models of one configuration traces once."""
    trace = lambda: discover(lambda: model.init_weights(jax.random.PRNGKey(0), model.input_shape))  # noqa: E731
    try:  # the module's repr holds its config as JSON, which a config with non-JSON values cannot give
        key = (type(model), repr(getattr(model, "module", None)), tuple(getattr(model, "input_shape", ())))
    except (TypeError, ValueError):
        return trace()
    if key not in _LAYERS:
        if len(_LAYERS) >= _LAYERS_KEPT:
            _LAYERS.pop(next(iter(_LAYERS)))
        _LAYERS[key] = trace()
    return dict(_LAYERS[key])


class MissModel:
    """A transformers Flax model with MiSS adapters (PEFT's `PeftModel` + `MissModel` API).

    Args:
      model: a transformers 4.x `Flax*` model (e.g. `FlaxLlamaForCausalLM(config)`).
      config: the first adapter's `MissConfig`.
      adapter_name: its name (PEFT's default is "default").
      params: the base params, when the model was made with `_do_init=False` (default `model.params`).
      low_cpu_mem_usage: create the adapter abstractly (shapes only), to be filled by `load_adapter`.
      seed: seeds the random init (`init_weights=False`).

    Calling the object runs the model with the active adapters (jit-compiled) and returns the
    wrapped model's own output type; `train=True` and `dropout_rng=` enable dropout as in transformers.
    """

    def __init__(
        self,
        model: Any,
        config: MissConfig,
        adapter_name: str = "default",
        *,
        params: Optional[Mapping] = None,
        low_cpu_mem_usage: bool = False,
        seed: int = 0,
    ) -> None:
        params = params if params is not None else getattr(model, "params", None)
        if params is None:
            raise ValueError("The model has no params: pass `params=` (models made with `_do_init=False`).")
        self.base_model = model
        self.params: dict = unfreeze(params)
        self.model_type: Optional[str] = getattr(getattr(model, "config", None), "model_type", None)
        self.layers: dict[str, Layer] = _model_layers(model)
        self.peft_config: dict[str, MissConfig] = {}
        self.adapter_params: dict = {"miss": {}, "modules_to_save": {}, "bias": {}}
        self._specs: dict[str, AdapterSpec] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._disabled = False
        self._frozen: set[str] = set()  # adapters in inference mode (PEFT: requires_grad=False)
        self._rng = jax.random.PRNGKey(seed)
        self._signature = inspect.signature(model.__call__)
        self._forward = jax.jit(self._forward_impl, static_argnums=(0, 1))
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
        self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    # ------------------------------------------------------------------ plan

    @property
    def active_adapter(self) -> str:
        """The first active adapter (PEFT's `active_adapter`)."""
        if not self.active_adapters:
            raise ValueError("No adapter is active: every adapter was deleted. Add one with add_adapter().")
        return self.active_adapters[0]

    @property
    def plan(self) -> Plan:
        """The static plan of the current state: what the forward applies."""
        active = () if self._disabled else tuple(a for a in self.active_adapters if a not in self.merged_adapters)
        saved = None
        if not self._disabled:
            saved = next((a for a in self.active_adapters if self._specs[a].saved_modules), None)
        return Plan(tuple(self._specs.values()), active, saved)

    def _check_name(self, name: str) -> None:
        if name not in self._specs:
            raise ValueError(f"Unknown adapter {name!r}; this model has {list(self._specs)}.")

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, adapter_name: str, config: MissConfig, low_cpu_mem_usage: bool = False) -> None:
        """Adds an adapter (inactive unless it is the first; activate it with `set_adapter`)."""
        if not isinstance(config, MissConfig):
            raise ValueError(f"Expected a miss_jax.MissConfig, got {type(config).__name__}.")
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"Adapter names are non-empty strings, got {adapter_name!r}.")
        if adapter_name in self._specs:
            raise ValueError(f"Adapter {adapter_name!r} already exists; choose another name or delete it first.")
        if adapter_name.startswith(".") or os.sep in adapter_name or (os.altsep or os.sep) in adapter_name:
            raise ValueError(
                f"Adapter name {adapter_name!r} cannot hold a path separator or start with '.': save_pretrained "
                "writes each adapter into a sub-folder named after it."
            )
        if adapter_name in ("miss", "modules_to_save", "bias", "base_model"):
            raise ValueError(f"Adapter name {adapter_name!r} is reserved; choose another name.")
        config = resolve_targets(config, self.layers, self.model_type)
        layers = select(config, self.layers)
        saved = linen.find_modules_to_save(config, self.params)
        bias_paths = linen.find_bias_paths(config, self.params, layers, saved)
        spec = AdapterSpec(adapter_name, config, layers, saved, bias_paths)
        self._rng, key = jax.random.split(self._rng)
        new = linen.init_adapter(spec, self.params, key, abstract=low_cpu_mem_usage)  # validates shapes
        self._specs[adapter_name] = spec
        self.peft_config[adapter_name] = config
        if config.inference_mode:  # as PEFT: an adapter added in inference mode starts frozen
            self._frozen = self._frozen | {adapter_name}
        self.adapter_params["miss"][adapter_name] = new["miss"]
        if spec.saved_modules:
            self.adapter_params["modules_to_save"][adapter_name] = new["modules_to_save"]
        bias = _flat(self.adapter_params["bias"])
        for path in spec.bias_paths:
            bias.setdefault(path + ("bias",), linen._get(self.params, path)["bias"])
        self.adapter_params["bias"] = _nest(bias)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Activates one adapter or several (their terms combine, see DESIGN §1).

        As in PEFT, this makes them trainable, or frozen with `inference_mode=True` (the state of adapters
        loaded with `is_trainable=False`): `trainable_params()` refuses frozen active adapters.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            self._check_name(n)
        if len(set(names)) != len(names):
            raise ValueError(f"Adapter names repeat in {names}.")
        owners = [n for n in names if self._specs[n].saved_modules]
        if len(owners) > 1:
            raise ValueError(
                f"Adapters {owners} each have modules_to_save; only one of them can be active at a time."
            )
        self.active_adapters = names
        self._frozen = (self._frozen | set(names)) if inference_mode else (self._frozen - set(names))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Runs the base model inside the context (merged adapters are unmerged, then merged back)."""
        merged = list(self.merged_adapters)
        if merged:
            self.unmerge_adapter()
        was = self._disabled
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = was
            if merged:
                self.merge_adapter(merged)

    def delete_adapter(self, adapter_name: str) -> None:
        """Deletes an adapter and its params (it must not be merged)."""
        self._check_name(adapter_name)
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it.")
        del self._specs[adapter_name], self.peft_config[adapter_name]
        self._frozen = self._frozen - {adapter_name}
        self.adapter_params["miss"].pop(adapter_name)
        self.adapter_params["modules_to_save"].pop(adapter_name, None)
        still = {p for s in self._specs.values() for p in s.bias_paths}
        bias = {k: v for k, v in _flat(self.adapter_params["bias"]).items() if k[:-1] in still}
        self.adapter_params["bias"] = _nest(bias)
        if adapter_name in self.active_adapters:  # as PEFT: the other active ones, else the first by name
            remaining = [a for a in self.active_adapters if a != adapter_name] or sorted(self._specs)[:1]
            if remaining and len(self.active_adapters) == 1:
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                              f"{remaining[0]}.")
            self.set_adapter(remaining)

    # ------------------------------------------------------------------ merging

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Merges adapters (default: the active ones) into the base params."""
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        for n in names:
            self._check_name(n)
        todo = tuple(n for n in names if n not in self.merged_adapters)
        if len(todo) < len(names):
            warnings.warn(f"Already merged: {[n for n in names if n in self.merged_adapters]}; skipping them.")
        if not todo:
            return
        self._require_weights(todo)
        plan = self.plan
        merged = tuple(self.merged_adapters)
        order = linen.merge_order(plan, merged + todo)
        params = self.params
        if order[: len(merged)] != merged:  # a bat adapter joins merged balance/mini ones: redo in merge order
            params, todo = self._merged(params, merged, -1), order
        new = self._merged(params, todo, 1)
        if safe_merge:
            linen.check_finite(new, plan, todo)
        self.params = new
        self.merged_adapters = list(order)

    def unmerge_adapter(self) -> None:
        """Takes every merged adapter out of the base params (bat exactly, through the inverse)."""
        if not self.merged_adapters:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.params = self._merged(self.params, tuple(self.merged_adapters), -1)
        self.merged_adapters = []

    def _merged(self, params: Mapping, names: tuple[str, ...], sign: int) -> dict:
        """`params` with `names` merged in (`sign=1`) or taken out (-1): `linen.merge` in one jitted pass
        over the adapted kernels; every other param is shared with `params`, not copied."""
        paths = tuple(sorted({layer.path for n in names for layer in self.plan.spec(n).layers}))
        kernels = [jnp.asarray(linen._get(params, path)["kernel"]) for path in paths]
        shardings = tuple(k.sharding if len(k.sharding.device_set) > 1 else None for k in kernels)
        blocks = {"miss": {n: self.adapter_params["miss"][n] for n in names}}
        new = _merge_fn(self.plan, names, sign, paths, shardings)(kernels, blocks)
        return linen.replace_leaves(params, {path + ("kernel",): k for path, k in zip(paths, new)})

    def _unloaded_params(self) -> dict:
        plan = dataclasses.replace(self.plan, active=())
        return linen.overlay(plan, self.params, self.adapter_params)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[Sequence[str]] = None,
        return_params: bool = False,
    ) -> Any:
        """Merges the adapters and returns the base model (a plain Flax model) with the merged params.

        `modules_to_save` copies of the active adapter and trained biases replace the base ones. With
        `return_params=True` it returns `(model, params)` and leaves `model.params` alone: the form for
        models made with `_do_init=False` (e.g. sharded ones), whose params live outside the model.
        """
        del progressbar  # one fused jit pass; nothing to report per layer
        if not return_params:
            self._check_settable()
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self.unload(return_params=return_params)

    def unload(self, return_params: bool = False) -> Any:
        """Returns the base model with its current params (merged adapters stay merged, as in PEFT).

        `return_params=True` returns `(model, params)` instead of setting `model.params`.
        """
        params = self._unloaded_params()
        if return_params:
            return self.base_model, params
        self._check_settable()
        self.base_model.params = params
        return self.base_model

    def _check_settable(self) -> None:
        if getattr(self.base_model, "_is_initialized", True) is False:
            raise ValueError(
                f"This {type(self.base_model).__name__} was made with _do_init=False, so its params live outside "
                "the model: call merge_and_unload(return_params=True) / unload(return_params=True) to get "
                "(model, params)."
            )

    # ------------------------------------------------------------------ parameters

    def trainable_params(self) -> dict:
        """The pytree a train step differentiates: active unmerged blocks, the saved module copies, biases."""
        plan = self.plan
        if self.merged_adapters:
            raise ValueError("Adapters are merged; call unmerge_adapter() before training.")
        frozen = self._frozen_active()
        if frozen:
            raise ValueError(
                f"Adapters {frozen} are frozen (inference mode: loaded with is_trainable=False, or set with "
                f"inference_mode=True). Load them with is_trainable=True, or call set_adapter({frozen!r}) to "
                "train them."
            )
        return {
            "miss": {n: self.adapter_params["miss"][n] for n in plan.active},
            "modules_to_save": (
                {plan.saved: self.adapter_params["modules_to_save"][plan.saved]} if plan.saved else {}
            ),
            "bias": self.adapter_params["bias"],
        }

    def _frozen_active(self) -> list[str]:
        """Active adapters in inference mode (frozen, as PEFT's `requires_grad=False`)."""
        return [n for n in self.plan.active if n in self._frozen]

    def update_params(self, trainable: Mapping) -> None:
        """Writes a (trained) `trainable_params()` pytree back into the adapter params."""
        for group in ("miss", "modules_to_save"):
            for name, tree in trainable.get(group, {}).items():
                self.adapter_params[group][name] = tree
        if "bias" in trainable:
            self.adapter_params["bias"] = trainable["bias"]

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all): all counts the base params plus every adapter's params and module copies."""
        trainable = self.trainable_params() if not (self.merged_adapters or self._frozen_active()) else {}
        every = {k: v for k, v in self.adapter_params.items() if k != "bias"}
        return _count(trainable), _count(self.params) + _count(every)

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    def _require_weights(self, names: Sequence[str]) -> None:
        for n in names:
            if linen.is_abstract(self.adapter_params["miss"][n]) or linen.is_abstract(
                self.adapter_params["modules_to_save"].get(n, {})
            ):
                raise ValueError(
                    f"Adapter {n!r} was created with low_cpu_mem_usage=True and has no weights yet: load them with "
                    "load_adapter(...) first."
                )

    # ------------------------------------------------------------------ forward

    def _call(self, params: Mapping, **kwargs: Any) -> Any:
        return self.base_model(params=params, **kwargs)

    def _apply(self, plan: Plan, params: Mapping, adapter_params: Mapping, kwargs: dict) -> Any:
        deterministic = not kwargs.get("train", False)
        return linen.apply(plan, self._call, params, adapter_params, deterministic=deterministic, **kwargs)

    def _forward_impl(self, plan: Plan, statics: tuple, params: Mapping, adapter_params: Mapping, arrays: dict):
        kwargs = {**arrays, **dict(statics)}
        return self._apply(plan, params, adapter_params, kwargs)

    def apply_fn(self, plan: Optional[Plan] = None):
        """The pure forward `f(params, adapter_params, **model_kwargs)` for `plan` (default: now's).

        Not jitted, so it composes with `jax.grad`/`jax.jit`/`shard_map` in user code; `adapter_params`
        may be the full pytree or `trainable_params()`.
        """
        plan = plan or self.plan

        def f(params: Mapping, adapter_params: Mapping, *args: Any, **kwargs: Any) -> Any:
            kwargs = self._bind(args, kwargs)
            return self._apply(plan, params, adapter_params, kwargs)

        return f

    def _bind(self, args: tuple, kwargs: dict) -> dict:
        try:
            bound = self._signature.bind_partial(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self.base_model).__name__}.__call__: {e}") from None
        out = dict(bound.arguments)
        out.update(out.pop("kwargs", {}))
        return out

    def __call__(self, *args: Any, params: Optional[Mapping] = None, adapter_params: Optional[Mapping] = None,
                 **kwargs: Any) -> Any:
        plan = self.plan
        self._require_weights(plan.active + ((plan.saved,) if plan.saved else ()))
        kwargs = self._bind(args, kwargs)
        arrays = {k: v for k, v in kwargs.items() if _is_array(v)}
        statics = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))
        return self._forward(
            plan,
            statics,
            self.params if params is None else params,
            self.adapter_params if adapter_params is None else adapter_params,
            arrays,
        )

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generates with the active adapters (see `miss_jax.generation.generate`)."""
        from .generation import generate

        return generate(self, *args, **kwargs)

    # ------------------------------------------------------------------ PEFT folders (interop)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> Any:
        """Writes PEFT-format folders (see `interop.peft_io.save_pretrained` for the options; with
        `as_lora=True` LoRA folders, and it returns each adapter's export report)."""
        from interop.peft_io import save_pretrained

        return save_pretrained(self, save_directory, **kwargs)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs: Any) -> None:
        """Loads a PEFT-format folder (torch-made ones too) as adapter `adapter_name`."""
        from interop.peft_io import load_adapter

        load_adapter(self, model_id, adapter_name, is_trainable=is_trainable, **kwargs)

    @classmethod
    def from_pretrained(
        cls, model: Any, model_id: str, adapter_name: str = "default", is_trainable: bool = False, **kwargs: Any
    ) -> "MissModel":
        """Wraps `model` with the adapter stored in the PEFT folder `model_id`."""
        from interop.peft_io import from_pretrained

        return from_pretrained(cls, model, model_id, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)


def get_peft_model(
    model: Any, peft_config: MissConfig, adapter_name: str = "default", **kwargs: Any
) -> MissModel:
    """PEFT's entry point: wraps a transformers Flax model with a MiSS adapter."""
    return MissModel(model, peft_config, adapter_name, **kwargs)
