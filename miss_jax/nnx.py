"""PEFT's model for Flax NNX: `MissNnxModel`, the lifecycle of `miss_jax.lifecycle` (shared with the
transformers model `MissModel`) over an NNX model whose layers `miss_jax.nnx_layers` adapts in place.

`miss_jax.get_peft_model(nnx_model, config)` (or `miss_jax.nnx.get_peft_model`, the same) gives a
`MissNnxModel`: several named adapters, `bias`, `modules_to_save`, merging, `disable_adapter`, PEFT's status,
`save_pretrained` / `from_pretrained` / `load_adapter` with PEFT folders, `generate`, and `trainable` (the
optimizer's filter). PEFT folders name torch modules: the name map (`interop.nnx_io.NameMap`), given once at
creation or found from the model's class (`interop.nnx_io.name_map_for`: tunix's Qwen 3 / Llama 3; identity
for any other model), turns NNX keys (`layers.0.attn.q_proj`) into torch module paths.

The layer-level names (`MissLinear`, `MissParam`, `ModulesToSave`, `apply_miss`, `merge_and_unload`,
`discover`, `miss_layers`, ...) are `miss_jax.nnx_layers`', also importable from here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import jax.numpy as jnp
from flax import nnx

from interop import nnx_io

from . import adapters, nnx_generation
from .config import MissConfig
from .lifecycle import Lifecycle, StatusRow
from .nnx_variables import mark_trainable
from .nnx_layers import (  # noqa: F401  (the layer-level API, re-exported)
    DEFAULT, GraphPath, MissLinear, MissParam, ModulesToSave, apply_miss, bias_leaf, discover, graph_modules,
    key_of, merge_and_unload, miss_layers, replace_module, saved_modules, select_layers, unload,
)
from .status import MISS_LAYER_TYPE, MODULES_TO_SAVE_TYPE
from .targeting import Layer

__all__ = [
    "AdapterState", "DEFAULT", "GraphPath", "MissLinear", "MissNnxModel", "MissParam", "ModulesToSave", "apply_miss",
    "bias_leaf", "discover", "get_peft_model", "key_of", "merge_and_unload", "miss_layers", "saved_modules",
    "select_layers",
]


@dataclasses.dataclass(frozen=True)
class AdapterState:
    """One adapter of a `MissNnxModel`: its config (targets resolved), the keys of its layers, of its saved
    modules and of the layers whose bias it trains (whether it trains is the lifecycle's `frozen_adapters`)."""

    config: MissConfig
    layers: tuple[str, ...]
    saved: tuple[str, ...] = ()
    biases: tuple[str, ...] = ()


class MissNnxModel(Lifecycle, nnx.Module):
    """An NNX model with MiSS adapters (PEFT's `PeftModel` + `MissModel` API, the methods and signatures of
    `miss_jax.MissModel`); call it as the model.

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
      name_map: NNX key -> torch module path for PEFT folders (default `interop.nnx_io.name_map_for(model)`).
      low_cpu_mem_usage: accepted for PEFT's signature (blocks are created at their init values, then loaded).
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
        *,
        name_map: Optional[nnx_io.NameMap] = None,
        low_cpu_mem_usage: bool = False,
    ):
        self.base_model = model
        self.name_map = nnx_io.name_map_for(model) if name_map is None else name_map
        self.adapters: dict[str, AdapterState] = {}
        self._init_lifecycle()
        self.rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.add_adapter(adapter_name, config, low_cpu_mem_usage, param_dtype=param_dtype, layers=layers, saved=saved)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    @property
    def peft_config(self) -> dict[str, MissConfig]:
        """Each adapter's config (targets resolved), by name, in the order they were added."""
        return {name: a.config for name, a in self.adapters.items()}

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters merged into the kernels."""
        merged = {a for layer in miss_layers(self.base_model).values() for a in layer.merged_adapters}
        return [a for a in self.adapters if a in merged]

    # ------------------------------------------------------------------ adapters

    def add_adapter(
        self,
        adapter_name: str,
        config: MissConfig,
        low_cpu_mem_usage: bool = False,
        *,
        param_dtype: Any = jnp.float32,
        layers: Optional[Sequence[Layer]] = None,
        saved: Optional[Sequence[str]] = None,
    ) -> None:
        """Adds an adapter (inactive unless it is the first; activate it with `set_adapter`); as PEFT, one added
        with `config.inference_mode` is frozen (`frozen_adapters`).

        `layers` (e.g. those a PEFT folder names) replaces the matching of `config`'s targets, `saved` (module
        keys) that of its `modules_to_save` (PEFT's rule, `adapters.match_modules_to_save`);
        `low_cpu_mem_usage` is accepted for PEFT's signature. Raises ValueError, changing nothing, on any
        target, shape or module that does not fit.
        """
        self._check_new_adapter(adapter_name, config)
        model = self.base_model
        if layers is None:
            config, layers = select_layers(model, config)
        modules = {key_of(p): (p, n) for p, n in graph_modules(model).items()}
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
                replace_module(model, path, wrapper)
        self.adapters = {**self.adapters, adapter_name: AdapterState(config, tuple(l.key for l in layers), saved,
                                                                     biases)}
        self._added(adapter_name, config)
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

    # ------------------------------------------------------------------ the lifecycle's hooks

    def _saved_paths(self, adapter_name: str) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(k.split(".")) for k in self.adapters[adapter_name].saved)

    def _check_activation(self, names: Sequence[str]) -> None:
        for key, layer in miss_layers(self.base_model).items():
            layer.check_merge_state(names, layer.merged_adapters, "set_adapter", key)

    def _sync(self) -> None:
        """Tells every layer and saved module which adapters are active, and whether they are disabled; a saved
        module uses the active adapter that has a copy of it (one at most: `set_adapter`)."""
        for layer in miss_layers(self.base_model).values():
            layer.set_adapter(self._active)
            layer.disabled = self._disabled
        for wrapper in saved_modules(self.base_model).values():
            wrapper.active = next((a for a in self._active if a in wrapper.modules_to_save), None)
            wrapper.disabled = self._disabled
        self._mark_trainable()

    def _mark_trainable(self) -> None:
        """What trains becomes `nnx.LoRAParam`, every other param `nnx.Param` (tunix's PeftTrainer: nnx_variables)."""
        mark_trainable(self, self._filter(self._trainable_paths(), check_merged=False))

    def _drop(self, adapter_name: str) -> None:
        """Removes the adapter's blocks and module copies (a layer or module left with none is unwrapped)."""
        for path, node in graph_modules(self.base_model).items():
            if isinstance(node, MissLinear) and adapter_name in node.variants:
                node.delete_adapter(adapter_name)
                if not node.variants:
                    replace_module(self.base_model, path, node.base_layer)
            elif isinstance(node, ModulesToSave) and adapter_name in node.modules_to_save:
                del node.modules_to_save[adapter_name]
                if not len(node.modules_to_save):
                    replace_module(self.base_model, path, node.original_module)
        self.adapters = {k: v for k, v in self.adapters.items() if k != adapter_name}

    def _merge(self, todo: Sequence[str], safe_merge: bool, check: bool) -> None:
        """Merges `todo` into every layer's kernel, after checking every layer (nothing merged if one fails)."""
        layers = miss_layers(self.base_model)
        if check:
            for key, layer in layers.items():
                layer.check_merge_state(layer.active_adapters, layer.merged_after(todo), "merge_adapter", key)
        if safe_merge:
            for key, layer in layers.items():
                problem = layer.merge_problem([n for n in todo if n in layer.variants and n not in layer.merged_adapters])
                if problem:
                    raise ValueError(f"Cannot merge safely at {key}: {problem}. The model was left unmerged.")
        for layer in layers.values():
            layer.merge(adapter_names=todo)

    def _unmerge(self) -> None:
        for layer in miss_layers(self.base_model).values():
            layer.unmerge()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[Sequence[str]] = None,
        return_params: bool = False,
    ) -> nnx.Module:
        """The base model with adapters `adapter_names` (default: the active ones) merged and the wrappers
        removed, in place (PEFT's); a saved module keeps its active adapter's copy. `progressbar` is accepted
        for PEFT's signature; `return_params=True` (transformers models made with `_do_init=False`) is refused:
        an NNX model holds its own weights."""
        self._refuse_return_params(return_params)
        names = None if adapter_names is None else self._names(adapter_names)
        model = merge_and_unload(self.base_model, safe_merge, names)
        mark_trainable(model, lambda path, variable: False)  # its params are all `nnx.Param` again
        return model

    def unload(self, return_params: bool = False) -> nnx.Module:
        """The base model with the wrappers removed, in place (merged adapters stay merged, as in PEFT)."""
        self._refuse_return_params(return_params)
        return unload(self.base_model)

    @staticmethod
    def _refuse_return_params(return_params: bool) -> None:
        if return_params:
            raise ValueError("return_params=True is for transformers Flax models made with _do_init=False; an NNX "
                             "model holds its own weights: take them with nnx.state(model) after the call.")

    def _status_rows(self) -> Iterator[StatusRow]:
        """Each adapted layer, then each saved module, in graph order, named `model.<torch module path>` (the
        name map's, else the NNX key)."""
        def name(key: str) -> str:
            return "model." + (self.name_map.torch_name(key) or key)

        for key, layer in miss_layers(self.base_model).items():
            names = [n for n in self.adapters if n in layer.variants]
            leaves = {n: layer.miss_block[n].get_value() for n in names}
            yield name(key), MISS_LAYER_TYPE, names, [n for n in names if n in layer.merged_adapters], leaves
        for key, wrapper in saved_modules(self.base_model).items():
            names = [n for n in self.adapters if n in wrapper.modules_to_save]
            leaves = {n: nnx.state(wrapper.modules_to_save[n], nnx.Param) for n in names}
            yield name(key), MODULES_TO_SAVE_TYPE, names, [], leaves

    # ------------------------------------------------------------------ generation, folders

    def generate(self, *args: Any, **kwargs: Any) -> nnx_generation.GenerateOutput:
        """Generates with the active adapters (greedy or sampling): `miss_jax.nnx_generation.generate`."""
        return nnx_generation.generate(self, *args, **kwargs)

    def _save_folders(self, save_directory: str, selected: list[str], is_main_process: bool, dtype: Optional[Any],
                      as_lora: bool, lora_rank: Optional[Union[int, float]]) -> None:
        if as_lora:
            raise ValueError("as_lora=True is for transformers Flax models (MissModel); save the MiSS folder, which "
                             "PEFT loads, and convert it there with peft.tuners.lora.convert_to_lora.")
        if is_main_process:
            nnx_io.save_pretrained(self, save_directory, self.name_map, selected, dtype)

    def _load_folder(self, folder: str, adapter_name: str, is_trainable: bool, config: Optional[MissConfig]) -> None:
        nnx_io.load_adapter(self, folder, adapter_name, self.name_map, is_trainable, config)

    @classmethod
    def _create_from_folder(cls, model: Any, folder: str, adapter_name: str, is_trainable: bool,
                            config: Optional[MissConfig], params: Optional[Mapping],
                            name_map: Optional[nnx_io.NameMap]) -> "MissNnxModel":
        if not isinstance(model, nnx.Module):
            raise TypeError(f"MissNnxModel.from_pretrained takes a Flax NNX module, got {type(model).__name__}; for a "
                            "transformers Flax model call miss_jax.MissModel.from_pretrained.")
        if params is not None:
            raise ValueError("An NNX model holds its own weights: `params=` is for transformers Flax models made with "
                             "_do_init=False. Leave it out.")
        name_map = nnx_io.name_map_for(model) if name_map is None else name_map
        found = nnx_io.read_adapter(model, folder, name_map, is_trainable, config)
        peft_model = cls(model, found.config, adapter_name, layers=found.layers, saved=found.saved, name_map=name_map)
        nnx_io.fill(peft_model, adapter_name, found)
        return peft_model

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
        if self._disabled:
            return frozenset()
        modules = {key_of(p): p for p in graph_modules(self.base_model)}
        wanted: set[GraphPath] = set()
        for name in self._active:
            if name in self._frozen:
                continue
            a = self.adapters[name]
            for key in a.layers:
                wanted.add(("base_model",) + modules[key] + ("miss_block", name))
            for key in a.saved:
                wanted.add(("base_model",) + modules[key] + ("modules_to_save", name))
        nodes = graph_modules(self.base_model)
        for name, a in self.adapters.items():
            for key in a.biases if name not in self._frozen else ():
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
        layers = {("base_model",) + p: node for p, node in graph_modules(self.base_model).items()
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


def get_peft_model(
    model: nnx.Module,
    config: MissConfig,
    adapter_name: str = DEFAULT,
    rngs: Optional[nnx.Rngs] = None,
    param_dtype: Any = jnp.float32,
    *,
    name_map: Optional[nnx_io.NameMap] = None,
) -> MissNnxModel:
    """`miss_jax.get_peft_model` for an NNX model, with NNX's own knobs (`rngs`, `param_dtype`): a
    `MissNnxModel` around `model` (adapted in place)."""
    return MissNnxModel(model, config, adapter_name, rngs, param_dtype, name_map=name_map)
