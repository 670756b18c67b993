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
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx as flax_nnx
from flax.core import unfreeze

from interop import nnx_io, peft_io

from . import adapters, attention, fidelity, generation, linen, losses, nnx, ops, programs, remat, tree
from .adapters import AdapterSpec, Plan
from .config import MissConfig
from .lifecycle import Lifecycle, StatusRow
from .programs import ForwardOptions
from .status import MISS_LAYER_TYPE, MODULES_TO_SAVE_TYPE
from .targeting import Layer, resolve_targets, select
from .tree import Path

PyTree = Any
NAME_MAP_IS_FOR_NNX = ("name_map= is for Flax NNX models: a transformers Flax model's param paths are its torch "
                       "module paths already (docs/DESIGN.md §5). Leave it out.")


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "__jax_array__")


class MissModel(Lifecycle):
    """A transformers Flax model with MiSS adapters (PEFT's `PeftModel` + `MissModel` API; the lifecycle is
    `miss_jax.lifecycle.Lifecycle`'s, shared with the NNX model).

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
        self._init_lifecycle()
        self.merged_adapters: list[str] = []
        self._specs: dict[str, AdapterSpec] = {}
        self._rng = jax.random.PRNGKey(seed)
        self.training = False  # `train()` / `eval()`: dropout in `__call__`
        self.forward_options = ForwardOptions()  # gradient checkpointing, attention implementation
        self._signature = inspect.signature(model.__call__)
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)

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
        """Adds an adapter (inactive unless it is the first; activate it with `set_adapter`); as PEFT, one added
        with `config.inference_mode` is frozen (`frozen_adapters`).

        `low_cpu_mem_usage=True` creates it abstractly (shapes only), to be filled by `load_adapter`.
        """
        self._check_new_adapter(adapter_name, config)
        config = resolve_targets(config, self.layers, self.model_type)
        spec = adapters.make_spec(adapter_name, config, select(config, self.layers), self.params)
        with self.transaction():
            self._rng, key = jax.random.split(self._rng)
            new = adapters.init(spec, self.params, key, abstract=low_cpu_mem_usage)  # validates shapes
            biases = {path: tree.get(self.params, path)["bias"] for path in spec.bias_paths}
            self.adapter_params = adapters.with_adapter(self.adapter_params, adapter_name, new, biases)
            self._specs[adapter_name] = spec
            self._added(adapter_name, config)

    # ------------------------------------------------------------------ the lifecycle's hooks

    def _saved_paths(self, adapter_name: str) -> tuple[Path, ...]:
        return self._specs[adapter_name].saved_modules

    def _check_activation(self, names: Sequence[str]) -> None:
        adapters.check_merge_state(self._layer_variants(), names, self.merged_adapters, "set_adapter")

    def _sync(self) -> None:
        """Nothing to push: the forward reads the state through `plan`."""

    def _drop(self, adapter_name: str) -> None:
        """Removes the adapter's spec and params; biases it trained are written into the base params."""
        with self.transaction():
            del self._specs[adapter_name]
            still = {p for s in self._specs.values() for p in s.bias_paths}
            trained = {k: v for k, v in tree.flatten(self.adapter_params[adapters.BIAS]).items() if k[:-1] not in still}
            self.params = tree.replace_leaves(self.params, trained)
            self.adapter_params = adapters.without_adapter(self.adapter_params, adapter_name, still)

    def _merge(self, todo: Sequence[str], safe_merge: bool, check: bool) -> None:
        """Merges the unmerged adapters `todo` into `params` (`linen.merge`); `check=False` skips
        `adapters.check_merge_state` (for `merge_and_unload`). `safe_merge`: see `merge_adapter`."""
        todo = tuple(todo)
        if not todo:
            return
        self.require_weights(todo)
        plan = self.plan
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

    def _unmerge(self) -> None:
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
            names = self._names(self.active_adapters if adapter_names is None else adapter_names)
            self._merge([n for n in names if n not in self.merged_adapters], safe_merge, check=False)
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

    # ------------------------------------------------------------------ status, generation, folders

    def _status_rows(self) -> Iterator[StatusRow]:
        """Each adapted layer (in the model's order), then each `modules_to_save` module; PEFT's module names
        are `model.<torch module path>`, the Flax path here (docs/DESIGN.md §5)."""
        by_layer: dict[Path, list[str]] = {}
        by_module: dict[Path, list[str]] = {}
        for name, spec in self._specs.items():
            for layer in spec.layers:
                by_layer.setdefault(layer.path, []).append(name)
            for path in spec.saved_modules:
                by_module.setdefault(path, []).append(name)
        order = {layer.path: i for i, layer in enumerate(self.layers.values())}
        for path in sorted(by_layer, key=lambda p: order.get(p, len(order))):
            names = by_layer[path]
            leaves = {n: tree.get(self.adapter_params[adapters.MISS][n], path)[adapters.BLOCK] for n in names}
            merged = [n for n in self.merged_adapters if n in names]
            yield ".".join(("model",) + path), MISS_LAYER_TYPE, names, merged, leaves
        for path, names in by_module.items():
            leaves = {n: tree.get(self.adapter_params[adapters.MODULES_TO_SAVE][n], path) for n in names}
            yield ".".join(("model",) + path), MODULES_TO_SAVE_TYPE, names, [], leaves

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generates with the active adapters (see `miss_jax.generation.generate`)."""
        return generation.generate(self, *args, **kwargs)

    def _save_folders(self, save_directory: str, selected: list[str], is_main_process: bool, dtype: Optional[Any],
                      as_lora: bool, lora_rank: Optional[Union[int, float]]) -> Optional[dict[str, Any]]:
        return peft_io.save_pretrained(self, save_directory, selected, True, is_main_process, dtype, as_lora, lora_rank)

    def _load_folder(self, folder: str, adapter_name: str, is_trainable: bool, config: Optional[MissConfig]) -> None:
        peft_io.load_adapter(self, folder, adapter_name, is_trainable=is_trainable, config=config)

    @classmethod
    def _create_from_folder(cls, model: Any, folder: str, adapter_name: str, is_trainable: bool,
                            config: Optional[MissConfig], params: Optional[Mapping],
                            name_map: Optional[Any]) -> Union["MissModel", nnx.MissNnxModel]:
        """`from_pretrained`'s model: a `MissModel` for a transformers Flax model, a `MissNnxModel` for an NNX one."""
        if isinstance(model, flax_nnx.Module):
            return nnx.MissNnxModel.from_pretrained(model, folder, adapter_name, is_trainable, params=params,
                                                    config=config, name_map=name_map)
        check_model_kind(model)
        if name_map is not None:
            raise ValueError(NAME_MAP_IS_FOR_NNX)
        return peft_io.from_pretrained(cls, model, folder, adapter_name, is_trainable, None, params, config=config)


def check_model_kind(model: Any) -> None:
    """TypeError, naming what is accepted, unless `model` is a transformers Flax model (a callable with a `config`
    and a Flax `module`, as `FlaxPreTrainedModel`s have) or a Flax NNX module."""
    if isinstance(model, flax_nnx.Module):
        return
    if not (callable(model) and hasattr(model, "config") and hasattr(model, "module")):
        raise TypeError(
            f"miss-jax adapts a transformers Flax model (e.g. FlaxLlamaForCausalLM) or a Flax NNX module "
            f"(flax.nnx.Module: tunix's LLMs, your own); got a {type(model).__module__}.{type(model).__name__}. "
            "A PyTorch model belongs to PEFT itself; load its weights into a Flax model first."
        )


def get_peft_model(
    model: Any,
    peft_config: MissConfig,
    adapter_name: str = "default",
    *,
    params: Optional[Mapping] = None,
    low_cpu_mem_usage: bool = False,
    seed: int = 0,
    name_map: Optional[nnx_io.NameMap] = None,
) -> Union[MissModel, nnx.MissNnxModel]:
    """PEFT's entry point, for both kinds of Flax model: a `MissModel` around a transformers Flax model (see
    `MissModel` for the args), or a `MissNnxModel` around a Flax NNX module, adapted in place (seeded with
    `nnx.Rngs(seed)`; `name_map`: how its keys become torch module paths in PEFT folders, default the map of
    its class: `interop.nnx_io.name_map_for`). TypeError, changing nothing, for any other model."""
    check_model_kind(model)
    if isinstance(model, flax_nnx.Module):
        if params is not None:
            raise ValueError(
                "An NNX model holds its own weights: `params=` is for transformers' Flax models made with "
                "_do_init=False. Call get_peft_model(nnx_model, config, adapter_name)."
            )
        return nnx.MissNnxModel(model, peft_config, adapter_name, flax_nnx.Rngs(seed), name_map=name_map,
                                low_cpu_mem_usage=low_cpu_mem_usage)
    if name_map is not None:
        raise ValueError(NAME_MAP_IS_FOR_NNX)
    return MissModel(model, peft_config, adapter_name, params=params, low_cpu_mem_usage=low_cpu_mem_usage, seed=seed)
