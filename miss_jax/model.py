"""`MissModel`: PEFT's adapter lifecycle over a transformers Flax model, on the functional core.

The object holds the base model, its params (merged adapters included), the adapter pytree
(`miss_jax.adapters`) and the adapter specs; every computation goes through `miss_jax.linen`'s pure
functions, jit-compiled once per model configuration (two identical models share compiled code).
Every method that changes the model runs as a `transaction()`: if it raises, the model is left
exactly as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx as flax_nnx
from flax.core import unfreeze

from . import adapters, attention, fidelity, generation, linen, losses, nnx, ops, programs, remat, tree
from .adapters import AdapterSpec, Plan
from .config import MissConfig
from .programs import ForwardOptions
from .status import MISS_LAYER_TYPE, MODULES_TO_SAVE_TYPE, TunerLayerStatus, TunerModelStatus, platforms
from .targeting import Layer, resolve_targets, select
from .tree import Path

PyTree = Any


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "__jax_array__")


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
    wrapped model's own output type; `train=True` and `dropout_rng=` enable dropout as in transformers,
    and so does `train()` mode (as a torch module's). `labels=` adds the loss (`outputs.loss`) as
    transformers' PyTorch models do.
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
        params = fidelity.make_faithful(model, params)  # PyTorch's model of this config, or UnfaithfulConfig
        self.base_model = model
        self.params: dict = unfreeze(params)
        self.model_type: Optional[str] = getattr(getattr(model, "config", None), "model_type", None)
        self.layers: dict[str, Layer] = programs.model_layers(model)
        self.adapter_params: dict = adapters.empty()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._specs: dict[str, AdapterSpec] = {}
        self._disabled = False
        self._frozen: set[str] = set()  # adapters in inference mode (PEFT: requires_grad=False)
        self._rng = jax.random.PRNGKey(seed)
        self.training = False  # `train()` / `eval()`: dropout in `__call__`
        self.forward_options = ForwardOptions()  # gradient checkpointing, attention implementation
        self._signature = inspect.signature(model.__call__)
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
        self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    # ------------------------------------------------------------------ state

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing: if the body raises, every attribute of the model is restored as it was.

        The whole instance state is snapshotted (its dicts, lists and sets copied; arrays are immutable
        and shared), so state added to the model later is covered without a list to keep up to date.
        """
        before = tree.copy_containers(dict(self.__dict__))
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    @property
    def peft_config(self) -> dict[str, MissConfig]:
        """Each adapter's config (targets resolved), by name, in the order they were added."""
        return {name: spec.config for name, spec in self._specs.items()}

    @property
    def active_adapter(self) -> str:
        """The first active adapter (PEFT's `active_adapter`)."""
        if not self.active_adapters:
            raise ValueError("No adapter is active: every adapter was deleted. Add one with add_adapter().")
        return self.active_adapters[0]

    @property
    def frozen_adapters(self) -> tuple[str, ...]:
        """Adapters in inference mode (PEFT's `requires_grad=False`): loaded with `is_trainable=False`,
        or set with `inference_mode=True`."""
        return tuple(n for n in self._specs if n in self._frozen)

    @property
    def input_names(self) -> tuple[str, ...]:
        """The argument names of the wrapped model's `__call__` (what a batch may feed it)."""
        return tuple(self._signature.parameters)

    @property
    def plan(self) -> Plan:
        """The static plan of the current state: what the forward applies."""
        active = () if self._disabled else tuple(a for a in self.active_adapters if a not in self.merged_adapters)
        saved = () if self._disabled else tuple(a for a in self.active_adapters if self._specs[a].saved_modules)
        return Plan(tuple(self._specs.values()), active, saved)

    def _spec(self, name: str) -> AdapterSpec:
        if name not in self._specs:
            raise adapters.unknown_adapter(name, list(self._specs))
        return self._specs[name]

    def dropout_kwargs(self, rng: jax.Array) -> dict[str, Any]:
        """The call arguments that enable dropout with `rng` (`train=True`, or OPT's `deterministic=False`)."""
        return programs.dropout_flags(self.input_names, rng)

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, adapter_name: str, config: MissConfig, low_cpu_mem_usage: bool = False) -> None:
        """Adds an adapter (inactive unless it is the first; activate it with `set_adapter`).

        `low_cpu_mem_usage=True` creates it abstractly (shapes only), to be filled by `load_adapter`.
        """
        if not isinstance(config, MissConfig):
            raise ValueError(f"Expected a miss_jax.MissConfig, got {type(config).__name__}.")
        adapters.check_new_name(adapter_name, self._specs)
        adapters.check_bias_owner(type(self).__name__, self.peft_config, config)
        config = resolve_targets(config, self.layers, self.model_type)
        spec = adapters.make_spec(adapter_name, config, select(config, self.layers), self.params)
        with self.transaction():
            self._rng, key = jax.random.split(self._rng)
            new = adapters.init(spec, self.params, key, abstract=low_cpu_mem_usage)  # validates shapes
            biases = {path: tree.get(self.params, path)["bias"] for path in spec.bias_paths}
            self.adapter_params = adapters.with_adapter(self.adapter_params, adapter_name, new, biases)
            self._specs[adapter_name] = spec
            if config.inference_mode:  # as PEFT: an adapter added in inference mode starts frozen
                self._frozen = self._frozen | {adapter_name}

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Activates one adapter or several (their terms combine, see docs/DESIGN.md §1).

        As in PEFT, this makes them trainable, or frozen with `inference_mode=True` (the state of adapters
        loaded with `is_trainable=False`): `trainable_params()` refuses frozen active adapters.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            self._spec(n)
        if len(set(names)) != len(names):
            raise ValueError(f"Adapter names repeat in {names}.")
        adapters.check_saved_modules(self._specs[n] for n in names)
        if not self._disabled:
            adapters.check_merge_state(self._layer_variants(), names, self.merged_adapters, "set_adapter")
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
        """Deletes an adapter and its params (it must not be merged). Biases it trained stay, written into the
        base params, as PEFT (which trains biases in place) keeps them."""
        self._spec(adapter_name)
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it.")
        with self.transaction():
            del self._specs[adapter_name]
            self._frozen = self._frozen - {adapter_name}
            still = {p for s in self._specs.values() for p in s.bias_paths}
            trained = {k: v for k, v in tree.flatten(self.adapter_params[adapters.BIAS]).items() if k[:-1] not in still}
            self.params = tree.replace_leaves(self.params, trained)
            self.adapter_params = adapters.without_adapter(self.adapter_params, adapter_name, still)
            if adapter_name in self.active_adapters:  # as PEFT: the other active ones, else the first by name
                remaining = [a for a in self.active_adapters if a != adapter_name] or sorted(self._specs)[:1]
                if remaining and len(self.active_adapters) == 1:
                    warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter "
                                  f"to {remaining[0]}.")
                self.set_adapter(remaining)

    # ------------------------------------------------------------------ merging

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Merges adapters (default: the active ones) into the base params.

        `safe_merge=True` first checks that each adapter's blocks are finite and, for bat, that `I + B` is
        well conditioned (condition number <= `ops.MAX_UNMERGE_CONDITION`, so that unmerging restores the
        base weights), then that every merged kernel is finite; otherwise the model is left unmerged.
        Without it, an ill-conditioned bat adapter merges, and `unmerge_adapter` then refuses to write
        NaN into the base weights (or restores them with that conditioning's loss of precision).

        A merge never changes what the model computes: one that would leave an active bat adapter unmerged on
        a layer whose kernel then holds an additive adapter (bat(W + dW) instead of bat(W) + dW) is refused
        (`adapters.MergeStateError`, naming the adapters to merge together).
        """
        self._merge(adapter_names, safe_merge, check=True)

    def _merge(self, adapter_names: Optional[Sequence[str]], safe_merge: bool, check: bool) -> None:
        """`merge_adapter`; `check=False` skips `adapters.check_merge_state` (for `merge_and_unload`)."""
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        for n in names:
            self._spec(n)
        plan = self.plan
        todo = tuple(n for n in names if n not in self.merged_adapters)
        if len(todo) < len(names):
            warnings.warn(f"Already merged: {[n for n in names if n in self.merged_adapters]}; skipping them.")
        if not todo:
            return
        self.require_weights(todo)
        if safe_merge:
            linen.check_mergeable(plan, self.adapter_params, todo)
        variants = {n: s.config.variant for n, s in self._specs.items()}
        undo, todo = ops.merge_schedule(variants, self.merged_adapters, todo)
        merged = [n for n in self.merged_adapters if n not in undo] + list(todo)
        if check:
            adapters.check_merge_state(self._layer_variants(), [] if self._disabled else self.active_adapters,
                                       merged, "merge_adapter")
        params = self._merged(self.params, undo, -1) if undo else self.params
        new = self._merged(params, todo, 1)
        if safe_merge:
            linen.check_finite(new, plan, todo)
        self.params = new
        self.merged_adapters = merged

    def _layer_variants(self) -> dict[str, dict[str, str]]:
        """`{layer key: {adapter: variant}}` of the adapters on each layer (`adapters.check_merge_state`)."""
        out: dict[str, dict[str, str]] = {}
        for name, spec in self._specs.items():
            for layer in spec.layers:
                out.setdefault(layer.key, {})[name] = spec.config.variant
        return out

    def unmerge_adapter(self) -> None:
        """Takes every merged adapter out of the base params (bat through the inverse of `I + B`).

        Refuses, leaving the model merged, when that would write NaN or inf into the base weights (a bat
        adapter with a singular `I + B`; `merge_adapter(safe_merge=True)` refuses such adapters up front).
        """
        if not self.merged_adapters:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        names = tuple(self.merged_adapters)
        new = self._merged(self.params, names, -1)
        linen.check_finite(new, self.plan, names, action="unmerging")
        self.params = new
        self.merged_adapters = []

    def _merged(self, params: Mapping, names: tuple[str, ...], sign: int) -> dict:
        """`params` with `names` merged in (`sign=1`) or taken out (-1): `linen.merge` in one jitted pass
        over the adapted kernels; every other param is shared with `params`, not copied."""
        plan = self.plan
        paths = tuple(sorted({layer.path for n in names for layer in plan.spec(n).layers}))
        kernels = [jnp.asarray(tree.get(params, path)["kernel"]) for path in paths]
        shardings = tuple(k.sharding if len(k.sharding.device_set) > 1 else None for k in kernels)
        blocks = {adapters.MISS: {n: self.adapter_params[adapters.MISS][n] for n in names}}
        new = programs.merge_fn(plan, names, sign, paths, shardings)(kernels, blocks)
        return tree.replace_leaves(params, {path + ("kernel",): k for path, k in zip(paths, new)})

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
        `progressbar` is accepted for PEFT's signature: the merge is one fused jit pass. `adapter_names` that
        cannot stay merged beside the other active adapters (`merge_adapter`'s refusal) still give PEFT's
        result, the base model with those adapters merged, and leave this model unmerged.
        """
        if not return_params:
            self._check_settable()
        try:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        except adapters.MergeStateError:  # PEFT's result (the named adapters merged, the others dropped) ...
            before = (self.params, self.merged_adapters)
            self._merge(adapter_names, safe_merge, check=False)
            try:
                return self.unload(return_params=return_params)
            finally:  # ... while this model, which could not stay so merged, is left as it was
                self.params, self.merged_adapters = before
        return self.unload(return_params=return_params)

    def unload(self, return_params: bool = False) -> Any:
        """Returns the base model with its current params (merged adapters stay merged, as in PEFT).

        `return_params=True` returns `(model, params)` instead of setting `model.params`.
        """
        params = linen.overlay(dataclasses.replace(self.plan, active=()), self.params, self.adapter_params)
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
        """The pytree a train step differentiates: active unmerged blocks, the saved module copies, biases.

        A frozen active adapter's params (`frozen_adapters`: blocks, copies, the biases it trains) are in it
        too, as the forward needs them, but the train steps of `miss_jax.train` / `miss_jax.sharding` never
        update them (`adapters.frozen_part`; a loop of your own should leave them out of its update too).
        Refused while every active adapter is frozen (nothing would train).
        """
        if self.merged_adapters:
            raise ValueError("Adapters are merged; call unmerge_adapter() before training.")
        self.require_weights(self.plan.applied)
        frozen = self._frozen_active()
        if frozen and len(frozen) == len(self.plan.active):
            raise ValueError(
                f"Adapters {frozen} are frozen (inference mode: loaded with is_trainable=False, or set with "
                f"inference_mode=True). Load them with is_trainable=True, or call set_adapter({frozen!r}) to "
                "train them."
            )
        return adapters.trainable(self.adapter_params, self.plan)

    def _frozen_active(self) -> list[str]:
        return [n for n in self.plan.active if n in self._frozen]

    def update_params(self, trainable: Mapping) -> None:
        """Writes adapter params back, leaf by leaf: a (trained) `trainable_params()` pytree, or any part of
        the adapter pytree (`{"miss": {adapter: ...}, "modules_to_save": ..., "bias": ...}`).

        Every leaf must already exist in the adapter pytree, with the same shape and dtype; otherwise
        ValueError names the leaf and the model is unchanged (`check_update`).
        """
        self.check_update(trainable)
        current = tree.flatten(self.adapter_params)
        current.update({path: jnp.asarray(v) for path, v in tree.flatten(trainable).items()})
        self.adapter_params = {**adapters.empty(), **tree.unflatten(current)}

    def check_update(self, trainable: Mapping) -> None:
        """ValueError, naming each leaf, unless `update_params(trainable)` would be accepted: a train step checks
        its state with it before the call that donates the state."""
        current = tree.flatten(self.adapter_params)
        new = tree.flatten(trainable)
        problems = []
        for path, value in new.items():
            where = tree.path_str(path)
            if path not in current:
                adapters.locate(path)  # a path outside the pytree's groups gets the groups named
                problems.append(f"{where}: no such adapter param (adapters: {list(self._specs)})")
            elif not _is_array(value):
                problems.append(f"{where}: a {type(value).__name__}, not an array")
            elif tuple(value.shape) != tuple(current[path].shape) or value.dtype != current[path].dtype:
                problems.append(
                    f"{where}: {value.dtype}{list(value.shape)}, expected {current[path].dtype}{list(current[path].shape)}"
                )
        if problems:
            raise ValueError("update_params refused, the model is unchanged: " + "; ".join(problems) + ".")

    def place(self, params: Mapping, adapter_params: Mapping) -> None:
        """Replaces the base params and the whole adapter pytree by copies placed elsewhere (e.g. sharded over
        a mesh by `miss_jax.sharding.shard_peft_model`). Structure, shapes and dtypes must match (abstract
        adapters may become concrete); otherwise ValueError, and the model is unchanged."""
        def signature(t: PyTree) -> tuple:
            leaves, treedef = jax.tree_util.tree_flatten(t)
            return treedef, [(tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves]

        for name, old, new in (("params", self.params, params), ("adapter_params", self.adapter_params, adapter_params)):
            if signature(old) != signature(new):
                raise ValueError(f"place(): the new {name} differ from the model's in structure, shape or dtype.")
        self.params, self.adapter_params = dict(params), dict(adapter_params)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all): all counts the base params plus every adapter's params and module copies.

        Trainable: the active adapters' blocks and module copies and the trained biases, merged or not (as
        PEFT counts `requires_grad` parameters), less a frozen adapter's (its biases included, which PEFT
        0.21 still counts); 0 while the adapter layers are disabled (PEFT's disabled layers stop requiring
        grad)."""
        every = {k: v for k, v in self.adapter_params.items() if k != adapters.BIAS}
        total = tree.count(self.params) + tree.count(every)
        if self._disabled:
            return 0, total
        active = tuple(self.active_adapters)
        saved = tuple(a for a in active if self._specs[a].saved_modules)
        every_active = Plan(tuple(self._specs.values()), active, saved)
        trainable = adapters.trainable(self.adapter_params, every_active)
        frozen = adapters.frozen_part(trainable, every_active, [a for a in active if a in self._frozen])
        return tree.count(trainable) - tree.count(frozen), total

    def print_trainable_parameters(self) -> None:
        """Prints PEFT's line: trainable params, all params, trainable%."""
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    def require_weights(self, names: Sequence[str]) -> None:
        """Raises if one of the adapters `names` was created with `low_cpu_mem_usage=True` and not loaded yet."""
        for n in names:
            if tree.is_abstract(adapters.own(self.adapter_params, n)):
                raise ValueError(
                    f"Adapter {n!r} was created with low_cpu_mem_usage=True and has no weights yet: load them with "
                    "load_adapter(...) first."
                )

    # ------------------------------------------------------------------ forward

    def apply_fn(self, plan: Optional[Plan] = None) -> Callable[..., Any]:
        """The pure forward `f(params, adapter_params, *args, **model_kwargs)` for `plan` (default: now's), run
        with the `forward_options` of this moment (gradient checkpointing, attention implementation).

        Not jitted, so it composes with `jax.grad`/`jax.jit`/`shard_map` in user code (a jit of yours reads the
        model's config when it traces: after an edit of `peft_model.config`, jit a new function); `adapter_params`
        may be the full pytree or `trainable_params()`.
        """
        plan = plan or self.plan
        model, options = self.base_model, self.forward_options

        def f(params: Mapping, adapter_params: Mapping, *args: Any, **kwargs: Any) -> Any:
            return programs.run(model, plan, params, adapter_params, self._bind(args, kwargs), options)

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
                 labels: Optional[Any] = None, **kwargs: Any) -> Any:
        """Runs the wrapped model with the active adapters (jitted; arrays and pytrees such as
        `past_key_values` are traced, Python scalars static). `params` / `adapter_params` override the
        model's own.

        In `train()` mode dropout is on (the wrapped model's `train=True` / OPT's `deterministic=False`)
        with `dropout_rng=` if given, else a key split from the model's own stream; an explicit `train=` /
        `deterministic=` wins. `labels` (as in transformers' PyTorch models) adds `outputs.loss`: see
        `miss_jax.losses.labels_loss` for the heads it covers.
        """
        plan = self.plan
        self.require_weights(plan.applied)
        if labels is not None and "labels" in self.input_names:  # a model that takes labels itself
            kwargs["labels"] = labels
            labels = None
        kwargs = self._bind(args, kwargs)
        if self.training and "train" not in kwargs and "deterministic" not in kwargs:
            rng = kwargs.pop("dropout_rng", None)
            if rng is None:
                self._rng, rng = jax.random.split(self._rng)
            kwargs.update(self.dropout_kwargs(rng))
        outputs = programs.forward(
            self.base_model,
            plan,
            self.params if params is None else params,
            self.adapter_params if adapter_params is None else adapter_params,
            kwargs,
            self.forward_options,
        )
        if labels is None:
            return outputs
        loss = losses.labels_loss(self.base_model, outputs, labels)
        if isinstance(outputs, tuple):  # return_dict=False: the loss comes first, as in transformers
            return (loss,) + outputs
        outputs["loss"] = loss
        return outputs

    # ------------------------------------------------------------------ long sequences

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[Mapping[str, Any]] = None) -> None:
        """Per-layer gradient checkpointing (transformers' / PEFT's name): each transformer layer's activations
        are recomputed in the backward pass instead of kept (`miss_jax.remat`).

        `gradient_checkpointing_kwargs={"policy": ...}` picks what a layer keeps: "nothing_saveable"
        (default: least memory), "dots_saveable" / "dots_with_no_batch_dims_saveable" (keep matmul outputs:
        less recomputation), "offload" (keep them in host memory, where the backend has one). PyTorch's
        `use_reentrant` is accepted and ignored (JAX's checkpointing has no such distinction). Applies to
        the forward, train steps and `apply_fn()` made afterwards; gradients are unchanged.
        """
        kwargs = dict(gradient_checkpointing_kwargs or {})
        kwargs.pop("use_reentrant", None)
        policy = kwargs.pop("policy", "nothing_saveable")
        if kwargs:
            raise ValueError(
                f"Unknown gradient_checkpointing_kwargs {sorted(kwargs)}; miss-jax takes 'policy' "
                f"(one of {list(remat.POLICIES)}) and ignores PyTorch's 'use_reentrant'."
            )
        remat.resolve_policy(policy)  # an unknown name fails here, not at the first trace
        self.forward_options = dataclasses.replace(self.forward_options, remat_policy=policy)

    def gradient_checkpointing_disable(self) -> None:
        """Turns per-layer gradient checkpointing off."""
        self.forward_options = dataclasses.replace(self.forward_options, remat_policy=None)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether per-layer gradient checkpointing is on (transformers' name)."""
        return self.forward_options.remat_policy is not None

    @property
    def attn_implementation(self) -> str:
        """The attention implementation `set_attn_implementation` chose ("eager" by default)."""
        kernel = self.forward_options.attention
        return "eager" if kernel is None else kernel.name

    def set_attn_implementation(self, name: str, block_size: int = 256) -> None:
        """Chooses the attention implementation of the forward, train steps and `apply_fn()` made afterwards
        (transformers' `attn_implementation` names where they exist):

        - "eager": the wrapped model's own attention (the default);
        - "blockwise": `miss_jax.attention.blockwise_attention`, causal self-attention `block_size` queries at a
          time, keeping no `(batch, heads, T, T)` weights for the backward pass (any platform; dropout too);
        - "sdpa": `jax.nn.dot_product_attention`, the attention of the library that owns it: cuDNN's flash
          attention on a GPU for bfloat16/float16 models, XLA's elsewhere; no attention dropout (a training
          step with a dropout rate runs the model's own attention);
        - "flash": the platform's attention for long sequences: "sdpa" on a GPU (cuDNN's flash attention for
          bfloat16/float16 and head sizes up to 128, XLA's otherwise), "blockwise" with `block_size` elsewhere
          and for attention dropout.

        Each is numerically the model's own attention (same masks, RoPE, sliding windows) on Llama, Mistral,
        Gemma, GPT-2, GPT-Neo, GPT-J and OPT; other families, cross-attention, generation with a KV cache and
        `output_attentions=True` run the model's own attention.
        """
        self.forward_options = dataclasses.replace(self.forward_options, attention=attention.kernel(name, block_size))

    # ------------------------------------------------------------------ PEFT's torch-module habits

    def train(self, mode: bool = True) -> "MissModel":
        """Training mode (`mode=True`): `__call__` runs with dropout, as a torch module in `train()` mode.
        Train steps (`miss_jax.train`) turn dropout on themselves, whatever the mode. Returns the model."""
        self.training = bool(mode)
        return self

    def eval(self) -> "MissModel":
        """Evaluation mode (the default of a new model, as transformers' Flax models): no dropout in `__call__`."""
        return self.train(False)

    def get_base_model(self) -> Any:
        """The wrapped transformers Flax model (PEFT's `get_base_model`). Its own `.params` are the base
        params it was made with: the adapters live in this object (`unload()` / `merge_and_unload()` give a
        plain model with them applied)."""
        return self.base_model

    @property
    def config(self) -> Any:
        """The wrapped model's config (`peft_model.config`, as in PEFT)."""
        return self.base_model.config

    def named_parameters(self) -> Iterator[tuple[str, jax.Array]]:
        """Every param once, `(dotted name, array)`, named as PEFT's `PeftModel.named_parameters()` names the
        torch twin's, except that leaves keep their Flax names (the arrays keep Flax layouts):

        * `base_model.model.<module path>.<leaf>`: a base param (module paths are the torch module paths,
          docs/DESIGN.md §5); `kernel`, `embedding` and a norm's `scale` are torch's `weight`;
        * `...<layer>.base_layer.<leaf>`: a param of a layer some adapter of the model adapts;
        * `...<layer>.miss_block.<adapter>`: each adapter's block, after its layer's params;
        * `...<module>.original_module.<...>.<leaf>`: the base params of a `modules_to_save` module, followed
          by each adapter's copy `...<module>.modules_to_save.<adapter>.<...>.<leaf>`;
        * a trained bias (`bias="all"` / `"MiSS_only"`) once, under its base name, with the trained value
          the forward uses.

        Base params come in the order of `params`, each layer's or module's adapter params right after it.
        JAX arrays have no `requires_grad`: `trainable_params()` holds the trainable ones (the very arrays
        listed here), and `get_model_status().requires_grad` says which adapters train.
        """
        layers = {layer.path for spec in self._specs.values() for layer in spec.layers}
        saved = sorted({m for spec in self._specs.values() for m in spec.saved_modules}, key=len)  # outermost first
        trained_biases = tree.flatten(self.adapter_params[adapters.BIAS])
        rows: dict[Path, list[tuple[Path, jax.Array]]] = {}  # owner module -> its (name, value), in order
        for path, value in tree.flatten(self.params).items():
            module, leaf = path[:-1], path[-1]
            copied = next((m for m in saved if module[: len(m)] == m), None)
            if copied is not None:
                owner, name = copied, (*copied, adapters.PEFT_ORIGINAL_MODULE, *path[len(copied):])
            elif module in layers:
                owner, name = module, (*module, adapters.PEFT_BASE_LAYER, leaf)
            else:
                owner, name = module, path
            rows.setdefault(owner, []).append((name, trained_biases.get(path, value)))
        for (adapter, *module, leaf), value in tree.flatten(self.adapter_params[adapters.MISS]).items():
            rows.setdefault(tuple(module), []).append(((*module, leaf, adapter), value))
        for adapter, copies in self.adapter_params[adapters.MODULES_TO_SAVE].items():
            for path, value in tree.flatten(copies).items():
                copied = next(m for m in self._specs[adapter].saved_modules if path[: len(m)] == m)
                name = (*copied, adapters.MODULES_TO_SAVE, adapter, *path[len(copied):])
                rows.setdefault(copied, []).append((name, value))
        for entries in rows.values():
            for name, value in entries:
                yield adapters.PEFT_PREFIX + ".".join(name), value

    def parameters(self) -> Iterator[jax.Array]:
        """Every param array (`named_parameters()` without the names)."""
        return (value for _, value in self.named_parameters())

    def __repr__(self) -> str:
        """The adapted model, as PEFT prints it: the wrapped class, each adapter, and every adapted layer
        with its adapters' blocks (`r`, variant, block shape) and each `modules_to_save` copy."""
        lines = ["MissModel(", f"  (base_model): {type(self.base_model).__name__}"]
        for name, spec in self._specs.items():
            state = [w for w, on in (("active", name in self.active_adapters), ("merged", name in self.merged_adapters),
                                     ("frozen", name in self._frozen)) if on]
            lines.append(f"  (adapter {name!r}): MISS {spec.variant.name} r={spec.config.r} bias={spec.config.bias!r}"
                         f" on {len(spec.layers)} layers" + (f" [{', '.join(state)}]" if state else ""))
        for status in self.get_layer_status():
            path = tuple(status.name.split(".")[1:])
            if status.module_type == MODULES_TO_SAVE_TYPE:
                lines.append(f"  ({status.name}): {status.module_type}(adapters={status.available_adapters})")
                continue
            layer = next(layer for layer in self.layers.values() if layer.path == path)
            blocks = ", ".join(
                f"{n}: {self._specs[n].variant.name} {tuple(adapters.block(self.adapter_params, n, layer).shape)}"
                for n in status.available_adapters
            )
            lines.append(f"  ({status.name}): {status.module_type}(in_features={layer.in_features}, "
                         f"out_features={layer.out_features}, miss_block={{{blocks}}})")
        if self._disabled:
            lines.append("  adapters disabled (disable_adapter_layers)")
        return "\n".join(lines + [")"])

    # ------------------------------------------------------------------ PEFT's status and switches

    def requires_grad(self, adapter_name: str) -> bool:
        """Whether adapter `adapter_name` trains (PEFT's `requires_grad` of its params): active, not frozen, and
        adapters not disabled (`disable_adapter_layers` freezes them, as PEFT's). miss-jax trains active
        adapters only."""
        self._spec(adapter_name)
        return not self._disabled and adapter_name in self.active_adapters and adapter_name not in self._frozen

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Unfreezes (`requires_grad=True`) or freezes (False: inference mode) adapters, as PEFT's.

        miss-jax trains active adapters only, so unfreezing an inactive adapter is refused, naming
        `set_adapter` (PEFT would count it trainable although no forward uses it).
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            self._spec(n)
        inactive = [n for n in names if n not in self.active_adapters]
        if requires_grad and inactive:
            raise ValueError(
                f"Adapters {inactive} are not active: miss-jax trains active adapters only. Call "
                f"set_adapter({(self.active_adapters + inactive)!r}) to activate (and unfreeze) them."
            )
        self._frozen = (self._frozen - set(names)) if requires_grad else (self._frozen | set(names))

    def disable_adapter_layers(self) -> None:
        """Turns every adapter off in place (PEFT's): the model computes the base model until
        `enable_adapter_layers()`. Merged adapters are unmerged first, as PEFT's layers do."""
        for name in self.active_adapters:
            bias = self._specs[name].config.bias
            if bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not "
                              "produce the same output as the base model would without adaption.")
        if self.merged_adapters:
            self.unmerge_adapter()
        self._disabled = True

    def enable_adapter_layers(self) -> None:
        """Turns the adapters back on after `disable_adapter_layers()`."""
        self._disabled = False

    def get_layer_status(self) -> list["TunerLayerStatus"]:
        """One `TunerLayerStatus` per adapted layer, then per `modules_to_save` module (PEFT's
        `get_layer_status`; `name` is PEFT's module name, `model.<torch module path>`)."""
        by_layer: dict[Path, list[str]] = {}
        for name, spec in self._specs.items():
            for layer in spec.layers:
                by_layer.setdefault(layer.path, []).append(name)
        by_module: dict[Path, list[str]] = {}
        for name, spec in self._specs.items():
            for path in spec.saved_modules:
                by_module.setdefault(path, []).append(name)
        order = {layer.path: i for i, layer in enumerate(self.layers.values())}
        out = []
        for path in sorted(by_layer, key=lambda p: order.get(p, len(order))):
            names = by_layer[path]
            leaves = {n: tree.get(self.adapter_params[adapters.MISS][n], path)[adapters.BLOCK] for n in names}
            out.append(self._status(path, MISS_LAYER_TYPE, names, [n for n in self.merged_adapters if n in names],
                                    leaves))
        for path, names in by_module.items():
            leaves = {n: tree.get(self.adapter_params[adapters.MODULES_TO_SAVE][n], path) for n in names}
            out.append(self._status(path, MODULES_TO_SAVE_TYPE, names, [], leaves))
        return out

    def _status(self, path: Path, module_type: str, names: list[str], merged: list[str],
                leaves: Mapping[str, PyTree]) -> "TunerLayerStatus":
        return TunerLayerStatus(
            name=".".join(("model",) + path),
            module_type=module_type,
            enabled=not self._disabled,
            active_adapters=list(self.active_adapters),
            merged_adapters=merged,
            requires_grad={n: self.requires_grad(n) for n in names},
            available_adapters=sorted(names),
            devices={n: platforms(leaves[n]) for n in names},
            quantization_backend=None,
        )

    def get_model_status(self) -> "TunerModelStatus":
        """PEFT's `get_model_status`: types, parameter counts and the adapters' state over all layers.

        Each layer agrees with the model (one switch for all), so no field is ever `"irregular"`.
        """
        layers = self.get_layer_status()
        trainable, total = self.get_nb_trainable_parameters()
        devices: dict[str, set[str]] = {}
        for status in layers:
            for n, d in status.devices.items():
                devices.setdefault(n, set()).update(d)
        return TunerModelStatus(
            base_model_type=type(self.base_model).__name__,
            adapter_model_type=type(self).__name__,
            peft_types={n: spec.config.peft_type for n, spec in self._specs.items()},
            trainable_params=trainable,
            total_params=total,
            num_adapter_layers=len(layers),
            enabled=not self._disabled,
            active_adapters=list(self.active_adapters),
            merged_adapters=sorted(self.merged_adapters),
            requires_grad={n: self.requires_grad(n) for n in sorted({n for s in layers for n in s.requires_grad})},
            available_adapters=sorted(self._specs),
            devices={n: sorted(d) for n, d in devices.items()},
            quantization_backend=None,
        )

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generates with the active adapters (see `miss_jax.generation.generate`)."""
        return generation.generate(self, *args, **kwargs)

    # ------------------------------------------------------------------ PEFT folders (interop)

    def save_pretrained(
        self,
        save_directory: str,
        selected_adapters: Optional[Sequence[str]] = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
        dtype: Optional[Any] = jnp.float32,
        as_lora: bool = False,
        lora_rank: Optional[Union[int, float]] = None,
        save_embedding_layers: Union[str, bool] = "auto",
        path_initial_model_for_weight_conversion: Optional[str] = None,
        **kwargs: Any,
    ) -> Optional[dict[str, Any]]:
        """Writes adapters as PEFT folders: `default` at the root, the others in sub-folders named after them,
        and PEFT's model card (`README.md`) unless the folder has one.

        Args:
          save_directory: the folder (created if needed).
          selected_adapters: the adapters to save (default: all).
          safe_serialization: must be True (safetensors; miss-jax never writes pickles).
          is_main_process: write only if True. Multi-host: call it on every process with
            `jax.process_index() == 0`; shards other processes hold are gathered, and the other processes
            build no host copies.
          dtype: tensor dtype in the file (default float32, as PEFT); None keeps each tensor's dtype.
          as_lora: write PEFT LoRA folders instead (for vLLM and other LoRA-only servers): exact for
            balance/mini at rank r, an SVD for bat (see `interop.lora`).
          lora_rank: with `as_lora`, PEFT's `convert_to_lora` rank: an int (bat's SVD rank), or a float in
            (0, 1] (bat keeps the fewest singular values holding that share of the energy); balance/mini
            are exact at r whatever it is. Default: exact (bat at full rank).
          save_embedding_layers, path_initial_model_for_weight_conversion, **kwargs: PEFT's; what MiSS has
            no use for is refused naming what to do instead (see `interop.peft_io.save_pretrained`).

        Returns:
          None, or with `as_lora` on the main process the `LoraReport` of each adapter.
        """
        from interop import save_pretrained

        return save_pretrained(self, save_directory, selected_adapters, safe_serialization, is_main_process, dtype,
                               as_lora, lora_rank, save_embedding_layers=save_embedding_layers,
                               path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion,
                               **kwargs)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     subfolder: Optional[str] = None, **kwargs: Any) -> None:
        """Loads the PEFT folder `model_id` (or its `subfolder`; torch-made folders too) as adapter
        `adapter_name`, not activated (as in PEFT). `is_trainable=False` loads it frozen (inference mode).
        On any error the model is left unchanged. PEFT's other keywords (`config`, `torch_device`,
        `autocast_adapter_dtype`, `low_cpu_mem_usage`, ...): see `interop.peft_io.load_adapter`."""
        from interop import load_adapter

        load_adapter(self, model_id, adapter_name, is_trainable=is_trainable, subfolder=subfolder, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        model: Any,
        model_id: str,
        adapter_name: str = "default",
        is_trainable: bool = False,
        subfolder: Optional[str] = None,
        params: Optional[Mapping] = None,
        **kwargs: Any,
    ) -> "MissModel":
        """Wraps `model` with the adapter stored in the PEFT folder `model_id` (or its `subfolder`), active.

        `is_trainable=False` loads it frozen (inference mode) and in `eval()` mode, as PEFT; `params` as in
        `MissModel`. PEFT's other keywords (`config`, `autocast_adapter_dtype`, `low_cpu_mem_usage`, ...):
        see `interop.peft_io.from_pretrained`.
        """
        from interop import from_pretrained

        return from_pretrained(cls, model, model_id, adapter_name, is_trainable, subfolder, params, **kwargs)


def get_peft_model(
    model: Any,
    peft_config: MissConfig,
    adapter_name: str = "default",
    *,
    params: Optional[Mapping] = None,
    low_cpu_mem_usage: bool = False,
    seed: int = 0,
) -> Union[MissModel, "nnx.MissNnxModel"]:
    """PEFT's entry point: wraps a transformers Flax model with a MiSS adapter (see `MissModel` for the args),
    or adapts a Flax NNX model in place (`miss_jax.nnx.get_peft_model`, seeded with `nnx.Rngs(seed)`)."""
    if isinstance(model, flax_nnx.Module):
        if params is not None or low_cpu_mem_usage:
            raise ValueError(
                "An NNX model holds its own weights: `params=` and `low_cpu_mem_usage=` are for transformers' Flax "
                "models. Call get_peft_model(nnx_model, config, adapter_name)."
            )
        return nnx.get_peft_model(model, peft_config, adapter_name, rngs=flax_nnx.Rngs(seed))
    return MissModel(model, peft_config, adapter_name, params=params, low_cpu_mem_usage=low_cpu_mem_usage, seed=seed)
