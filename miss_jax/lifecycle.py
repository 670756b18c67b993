"""PEFT's adapter lifecycle, written once (PEFT's `BaseTuner` + `PeftModel`) for both models.

`Lifecycle` holds what an adapted model means in PEFT, whatever stores the parameters: adapter names,
the active ones (a list, in activation order), the frozen ones (inference mode), the disabled switch,
the rules of `set_adapter` / `delete_adapter` / `set_requires_grad`, merge and unmerge with PEFT's warnings,
`disable_adapter`, the status dataclasses, and the PEFT folder calls (`save_pretrained`, `load_adapter`,
`from_pretrained`) with PEFT's keywords checked once. `miss_jax.model.MissModel` (transformers Flax models:
a params pytree beside an adapter pytree) and `miss_jax.nnx.MissNnxModel` (Flax NNX models, adapted in
place) subclass it and supply the storage hooks:

  peft_config          {name: config}, in the order added
  merged_adapters      the merged adapters, a list
  _saved_paths(name)   the module paths adapter `name` saves whole (`modules_to_save`)
  _check_activation    refuses an activation a merge state would make wrong (`adapters.check_merge_state`)
  _sync()              pushes the active / disabled state into the parameters (NNX layers)
  _drop(name)          removes an adapter's parameters
  _merge / _unmerge    writes adapters into the base weights / takes them all out
  _status_rows()       per adapted layer and saved module: name, type, adapters, merged ones, leaves
  _save_folders / _load_folder / _create_from_folder: the folder format (`interop.peft_io`, `interop.nnx_io`)
  get_nb_trainable_parameters, merge_and_unload, unload, generate, get_base_model

The state lives in the model's own attributes `_active` (tuple), `_frozen` (frozenset) and `_disabled`
(bool): hashable, so an NNX model's graph definition stays hashable under `nnx.jit`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import jax.numpy as jnp

from interop import peft_io

from . import adapters
from .config import MissConfig
from .status import TunerLayerStatus, TunerModelStatus, platforms

MERGED_ALL = "All adapters are already merged, nothing to do."  # PEFT's `check_adapters_to_merge`
UNMERGED = "Already unmerged. Nothing to do."  # PEFT's layers' `unmerge`

StatusRow = tuple[str, str, list[str], list[str], Mapping[str, Any]]  # name, type, adapters, merged, leaves


class Lifecycle:
    """PEFT's lifecycle over a model's adapters; see the module docstring for the hooks a model supplies."""

    def _init_lifecycle(self) -> None:
        """The state of a model with no adapter yet."""
        self._active: tuple[str, ...] = ()
        self._frozen: frozenset[str] = frozenset()
        self._disabled = False

    # ------------------------------------------------------------------ names

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters, in activation order (PEFT's `active_adapters`)."""
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        """The first active adapter (PEFT's `active_adapter`)."""
        if not self._active:
            raise ValueError("No adapter is active: every adapter was deleted. Add one with add_adapter().")
        return self._active[0]

    @property
    def frozen_adapters(self) -> tuple[str, ...]:
        """Adapters in inference mode (PEFT's `requires_grad=False`): loaded with `is_trainable=False`, added
        with `inference_mode=True`, or frozen by `set_adapter(..., inference_mode=True)` / `set_requires_grad`."""
        return tuple(n for n in self.peft_config if n in self._frozen)

    def _names(self, adapter_names: Union[str, Sequence[str]]) -> list[str]:
        """`adapter_names` as a list; ValueError for an unknown or repeated name."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            if n not in self.peft_config:
                raise adapters.unknown_adapter(n, list(self.peft_config))
        if len(set(names)) != len(names):
            raise ValueError(f"Adapter names repeat in {names}.")
        return names

    def _check_new_adapter(self, adapter_name: Any, config: Any) -> None:
        """ValueError unless `config` can be added as adapter `adapter_name` (PEFT's naming and bias rules)."""
        if not isinstance(config, MissConfig):
            raise ValueError(f"Expected a miss_jax.MissConfig, got {type(config).__name__}.")
        adapters.check_new_name(adapter_name, self.peft_config)
        adapters.check_bias_owner(type(self).__name__, self.peft_config, config)

    def _added(self, adapter_name: str, config: MissConfig) -> None:
        """Bookkeeping after a model stored a new adapter: frozen if added in inference mode (PEFT), and
        active if it is the first."""
        if config.inference_mode:
            self._frozen = self._frozen | {adapter_name}
        if not self._active:
            self.set_adapter(adapter_name, inference_mode=config.inference_mode)
        self._sync()

    # ------------------------------------------------------------------ activation

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Activates one adapter or several (their terms combine, see docs/DESIGN.md §1).

        As in PEFT, adapters active together must save disjoint `modules_to_save` (each saved module then uses
        the active adapter that has a copy of it), and this makes them trainable, or frozen with
        `inference_mode=True` (the state of adapters loaded with `is_trainable=False`). ValueError, changing
        nothing, for unknown names, overlapping saved modules or a merge state the activation would make wrong.
        """
        names = self._names(adapter_name)
        adapters.check_saved_modules(
            adapters.AdapterSpec(n, self.peft_config[n], (), self._saved_paths(n)) for n in names
        )
        if not self._disabled:
            self._check_activation(names)
        self._active = tuple(names)
        self._frozen = (self._frozen | set(names)) if inference_mode else (self._frozen - set(names))
        self._sync()

    def requires_grad(self, adapter_name: str) -> bool:
        """Whether adapter `adapter_name` trains (PEFT's `requires_grad` of its params): active, not frozen, and
        adapters not disabled (`disable_adapter_layers` freezes them, as PEFT's). miss-jax trains active
        adapters only."""
        self._names(adapter_name)
        return not self._disabled and adapter_name in self._active and adapter_name not in self._frozen

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Unfreezes (`requires_grad=True`) or freezes (False: inference mode) adapters, as PEFT's.

        miss-jax trains active adapters only, so unfreezing an inactive adapter is refused, naming
        `set_adapter` (PEFT would count it trainable although no forward uses it).
        """
        names = self._names(adapter_names)
        inactive = [n for n in names if n not in self._active]
        if requires_grad and inactive:
            raise ValueError(
                f"Adapters {inactive} are not active: miss-jax trains active adapters only. Call "
                f"set_adapter({self.active_adapters + inactive!r}) to activate (and unfreeze) them."
            )
        self._frozen = (self._frozen - set(names)) if requires_grad else (self._frozen | set(names))
        self._sync()

    def delete_adapter(self, adapter_name: str) -> None:
        """Deletes an adapter and its parameters (it must not be merged). Biases it trained keep their trained
        values, as PEFT (which trains biases in place) keeps them. If it was active, the other active adapters
        (else the first by name) stay or become active, and trainable (all as in PEFT)."""
        self._names(adapter_name)
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first.")
        self._drop(adapter_name)
        self._frozen = self._frozen - {adapter_name}
        if adapter_name in self._active:  # as PEFT: the other active ones, else the first by name
            remaining = [a for a in self._active if a != adapter_name] or sorted(self.peft_config)[:1]
            if remaining and len(self._active) == 1:
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter "
                              f"to {remaining[0]}.")
            self._active = tuple(remaining)
            self._frozen = self._frozen - set(remaining)  # as PEFT's layers: set_adapter(remaining) trains them
        self._sync()

    # ------------------------------------------------------------------ switching adapters off

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Runs the base model inside the context (merged adapters are unmerged, then merged back)."""
        merged = list(self.merged_adapters)
        if merged:
            self.unmerge_adapter()
        was = self._disabled
        self._disabled = True
        self._sync()
        try:
            yield
        finally:
            self._disabled = was
            self._sync()
            if merged:
                self.merge_adapter(merged)

    def disable_adapter_layers(self) -> None:
        """Turns every adapter off in place (PEFT's): the model computes the base model until
        `enable_adapter_layers()`. Merged adapters are unmerged first, as PEFT's layers do."""
        for name in self._active:
            bias = self.peft_config[name].bias
            if bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not "
                              "produce the same output as the base model would without adaption.")
        if self.merged_adapters:
            self.unmerge_adapter()
        self._disabled = True
        self._sync()

    def enable_adapter_layers(self) -> None:
        """Turns the adapters back on after `disable_adapter_layers()`."""
        self._disabled = False
        self._sync()

    # ------------------------------------------------------------------ merging

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Merges adapters (default: the active ones) into the base weights, in composition order.

        As PEFT, merging adapters that are all merged already warns "All adapters are already merged, nothing
        to do."; merging more beside merged ones names both. `safe_merge=True` first checks that every block
        is finite, that each bat adapter's `I + B` is well conditioned (so that unmerging restores the base
        weights) and that every merged kernel is finite, and merges nothing if one check fails. A merge never
        changes what the model computes: one that would leave an active bat adapter unmerged on a layer whose
        kernel then holds an additive adapter is refused (`adapters.MergeStateError`).
        """
        self._merge(self._to_merge(adapter_names), safe_merge, check=True)

    def _to_merge(self, adapter_names: Optional[Sequence[str]]) -> list[str]:
        """The adapters of `adapter_names` (default: the active ones) not merged yet, with PEFT's warnings."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        names = self._names(self.active_adapters if adapter_names is None else adapter_names)
        merged = list(self.merged_adapters)
        todo = [n for n in names if n not in merged]
        if merged and todo:
            warnings.warn(f"Already following adapters were merged {','.join(merged)}. You are now additionally "
                          f"merging {','.join(todo)}.")
        elif merged:
            warnings.warn(MERGED_ALL)
        return todo

    def unmerge_adapter(self) -> None:
        """Takes every merged adapter back out of the base weights (bat through the inverse of `I + B`).

        Refuses, leaving the model merged, when that would write NaN or inf into the base weights (a bat
        adapter with a singular `I + B`; `merge_adapter(safe_merge=True)` refuses such adapters up front).
        """
        if not self.merged_adapters:
            warnings.warn(UNMERGED)
            return
        self._unmerge()

    # ------------------------------------------------------------------ status

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """One `TunerLayerStatus` per adapted layer, then per `modules_to_save` module (PEFT's
        `get_layer_status`; `name` is PEFT's module name, `model.<torch module path>`)."""
        return [
            TunerLayerStatus(
                name=name,
                module_type=module_type,
                enabled=not self._disabled,
                active_adapters=self.active_adapters,
                merged_adapters=merged,
                requires_grad={n: self.requires_grad(n) for n in names},
                available_adapters=sorted(names),
                devices={n: platforms(leaves[n]) for n in names},
                quantization_backend=None,
            )
            for name, module_type, names, merged, leaves in self._status_rows()
        ]

    def get_model_status(self) -> TunerModelStatus:
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
            peft_types={n: c.peft_type for n, c in self.peft_config.items()},
            trainable_params=trainable,
            total_params=total,
            num_adapter_layers=len(layers),
            enabled=not self._disabled,
            active_adapters=self.active_adapters,
            merged_adapters=sorted(self.merged_adapters),
            requires_grad={n: self.requires_grad(n) for n in sorted({n for s in layers for n in s.requires_grad})},
            available_adapters=sorted(self.peft_config),
            devices={n: sorted(d) for n, d in devices.items()},
            quantization_backend=None,
        )

    def print_trainable_parameters(self) -> None:
        """Prints PEFT's line: trainable params, all params, trainable%."""
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    def get_base_model(self) -> Any:
        """The wrapped model (PEFT's `get_base_model`)."""
        return self.base_model

    # ------------------------------------------------------------------ PEFT folders

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
        """Writes adapters as PEFT folders: `default` at the root, the others in sub-folders named after them.

        Args:
          save_directory: the folder (created if needed; only its adapter files are replaced, each atomically).
          selected_adapters: the adapters to save (default: all; one name may be given as a string).
          safe_serialization: must be True (safetensors; miss-jax never writes pickles).
          is_main_process: write only if True. Multi-host: call it on every process with
            `jax.process_index() == 0`; shards other processes hold are gathered first.
          dtype: tensor dtype in the file (default float32, as PEFT); None keeps each tensor's dtype.
          as_lora: write PEFT LoRA folders instead (transformers Flax models; see `interop.lora`).
          lora_rank: with `as_lora`, PEFT's `convert_to_lora` rank (int, or float energy threshold in (0, 1]).
          save_embedding_layers, path_initial_model_for_weight_conversion, **kwargs: PEFT's; what MiSS has
            no use for is refused naming what to do instead (`interop.peft_io.check_save_keywords`).

        Returns:
          None, or with `as_lora` on the main process the `LoraReport` of each adapter.
        """
        peft_io.check_save_keywords(save_embedding_layers, path_initial_model_for_weight_conversion, kwargs)
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file.")
        if not safe_serialization:
            raise ValueError("miss-jax writes safetensors only (safe_serialization=True); it never writes pickles.")
        selected = [selected_adapters] if isinstance(selected_adapters, str) else selected_adapters
        selected = list(self.peft_config) if selected is None else list(selected)
        if not selected or any(n not in self.peft_config for n in selected):
            raise ValueError(
                f"You passed an invalid `selected_adapters` argument {selected}; this model has {list(self.peft_config)}."
            )
        return self._save_folders(save_directory, selected, is_main_process, dtype, as_lora, lora_rank)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     subfolder: Optional[str] = None, **kwargs: Any) -> None:
        """Loads the PEFT folder `model_id` (or its `subfolder`; torch-made folders too) as adapter
        `adapter_name`, not activated (as in PEFT). `is_trainable=False` loads it frozen (inference mode).
        On any error the model is left unchanged. PEFT's other keywords (`config`, `autocast_adapter_dtype`,
        `low_cpu_mem_usage`, ...): `interop.peft_io.load_options`."""
        config = peft_io.load_options(kwargs)
        folder = os.path.join(model_id, subfolder) if subfolder else model_id
        self._load_folder(folder, adapter_name, is_trainable, config)

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
    ) -> "Lifecycle":
        """Wraps `model` with the adapter stored in the PEFT folder `model_id` (or its `subfolder`), active.

        `is_trainable=False` loads it frozen (inference mode), as PEFT. `params`: the base params of a
        transformers model made with `_do_init=False`. `name_map=` (NNX models): how NNX keys become the
        folder's torch module paths (default: the map of the model's class, identity for other models).
        PEFT's other keywords (`config`, `autocast_adapter_dtype`, `low_cpu_mem_usage`, ...):
        `interop.peft_io.load_options`. On error, `model` is left unchanged.
        """
        name_map = kwargs.pop("name_map", None)
        config = peft_io.load_options(kwargs)
        folder = os.path.join(model_id, subfolder) if subfolder else model_id
        return cls._create_from_folder(model, folder, adapter_name, is_trainable, config, params, name_map)
