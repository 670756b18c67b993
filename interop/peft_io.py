"""PEFT-format adapter folders: `save_pretrained`, `load_adapter`, `from_pretrained` for `MissModel`.

A folder holds `adapter_config.json` and `adapter_model.safetensors`, exactly as PEFT 0.21 writes
them (the tensors and their keys: `interop.state_dict`), float32 by default. The adapter `default`
goes at the folder's root, every other adapter in a sub-folder named after it. Older Bone folders
(`peft_type: "BONE"`, `bone_block` keys) load through the conversion of PEFT's
`scripts/convert-bone-to-miss.py`.

Loading creates the adapter abstractly (`low_cpu_mem_usage=True`: shapes only) and fills it inside
`MissModel.transaction()`: on any error the model is left exactly as it was. Saves replace only the
files they write, each atomically (`interop.folder_write`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from miss_jax import tree
from miss_jax.config import PEFT_TYPE, PEFT_VERSION, MissConfig

from . import folder_write
from . import safetensors_io as files
from .state_dict import MissModel, adapter_config_dict, get_peft_model_state_dict, listed, set_peft_model_state_dict

LEGACY_PEFT_TYPE = "BONE"  # MiSS's name in PEFT before 0.17 (Bone was removed in 0.19)
_LEGACY_BIAS = {"bone_only": "MiSS_only", "Bone_only": "MiSS_only"}
PyTree = Any


def _warn_unloadable_in_torch(model: MissModel, adapter_name: str) -> None:
    others = [layer for layer in model.plan.spec(adapter_name).layers if layer.layout != "flax"]
    if others:
        warnings.warn(
            f"Adapter {adapter_name!r} sits on {others[0].type_name} layers ({listed([o.key for o in others])}); "
            "PEFT's MiSS supports only torch.nn.Linear, so PyTorch PEFT cannot load this folder (miss-jax can). "
            "For PyTorch, export merged weights (merge_and_unload()) or a LoRA folder (save_pretrained(..., "
            "as_lora=True)), which PEFT loads on Conv1D.",
            stacklevel=3,
        )


_PUSH = "miss-jax writes local folders only: upload one with huggingface_hub.upload_folder(folder_path=..., repo_id=...)"


def check_save_keywords(
    save_embedding_layers: Union[str, bool], path_initial_model_for_weight_conversion: Optional[str],
    kwargs: Mapping[str, Any],
) -> None:
    """PEFT's `save_pretrained` keywords beyond miss-jax's own: accepted where they mean what miss-jax does,
    otherwise ValueError naming what to do instead."""
    if save_embedding_layers not in ("auto", False):
        raise ValueError(
            f"save_embedding_layers={save_embedding_layers!r}: MiSS adapts linear layers only, so no embedding "
            "layer is ever adapted or resized and 'auto' (the default) saves none, as PEFT's does here. To train "
            "and ship an embedding, put it in modules_to_save: its copy is saved with the adapter."
        )
    if path_initial_model_for_weight_conversion is not None:
        raise ValueError(
            "path_initial_model_for_weight_conversion is PEFT's PiSSA/CorDA/OLoRA-to-LoRA conversion; a MiSS adapter "
            "needs none (its update is relative to the unchanged base weights). For a LoRA folder, pass as_lora=True."
        )
    if "state_dict" in kwargs:
        raise ValueError(
            "state_dict=: miss-jax saves the model's own adapter params; write other values in first with "
            "peft_model.update_params(...)."
        )
    if kwargs:
        raise ValueError(f"save_pretrained got {sorted(kwargs)}, which PEFT passes to push_to_hub: {_PUSH}.")


def model_card(model: MissModel) -> str:
    """The `README.md` PEFT's `create_or_update_model_card` writes into a folder that has none: the Hub's
    model card template with `library_name: peft`, the base model's name and tags (transformers models only,
    as PEFT: a model without a transformers config gets neither), `pipeline_tag:
    text-generation` for causal LMs (task_type CAUSAL_LM), and the PEFT version line."""
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    config = getattr(model, "config", None)  # None: a model that is not a transformers one (NNX, custom)
    if config is not None:  # PEFT's tags and base model come from a transformers model and its config
        name_or_path = getattr(config, "name_or_path", "")
        card.data["tags"] = sorted({"transformers", f"base_model:adapter:{name_or_path}"})
    if model.peft_config[model.active_adapter].task_type == "CAUSAL_LM":
        card.data.pipeline_tag = "text-generation"
    if config is not None:
        card.data["base_model"] = name_or_path
    card.text = card.text + f"\n### Framework versions\n\n- PEFT {PEFT_VERSION}"
    return str(card)


def host_trees(trees: Sequence[PyTree]) -> list[PyTree]:
    """`trees` with every array that this process does not hold whole (sharded over several hosts)
    gathered whole (`multihost_utils.process_allgather`). A collective: every process must call it, in the
    same order. Arrays a process holds whole are left as they are: nothing is copied to the host here."""
    def partial(x: Any) -> bool:
        return isinstance(x, jax.Array) and not x.is_fully_addressable

    if not any(partial(x) for t in trees for x in jax.tree_util.tree_leaves(t)):
        return list(trees)
    from jax.experimental import multihost_utils

    return [
        jax.tree_util.tree_map(lambda x: multihost_utils.process_allgather(x, tiled=True) if partial(x) else x, t)
        for t in trees
    ]


def save_pretrained(
    model: MissModel,
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
    and PEFT's model card (`README.md`, `model_card`) into `save_directory` when it has none (a README of
    yours is never replaced).

    Args:
      model: the `MissModel`.
      save_directory: the folder (created if missing; only its adapter files are replaced, each atomically:
        see `interop.folder_write`).
      selected_adapters: the adapters to save (default: all; one name may be given as a string).
      safe_serialization: must be True (safetensors; miss-jax never writes pickles).
      is_main_process: write only if True. On several hosts call it on every process with
        `jax.process_index() == 0`: adapter shards held by other hosts are gathered first (a collective),
        then the other processes return without building any host copy.
      dtype: tensor dtype in the file (default float32, as PEFT); None keeps each tensor's dtype.
      as_lora: write PEFT LoRA folders instead (for vLLM and other LoRA-only servers): exact for
        balance/mini at rank r, an SVD for bat (see `interop.lora`).
      lora_rank: with `as_lora`, PEFT's `convert_to_lora` rank (int, or float energy threshold in (0, 1];
        default: exact).
      save_embedding_layers, path_initial_model_for_weight_conversion, **kwargs: PEFT's
        (`check_save_keywords`).

    Returns:
      None, or with `as_lora` on the main process the `LoraReport` of each adapter (rank and relative error
      per layer).
    """
    check_save_keywords(save_embedding_layers, path_initial_model_for_weight_conversion, kwargs)
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file.")
    if not safe_serialization:
        raise ValueError("miss-jax writes safetensors only (safe_serialization=True); it never writes pickles.")
    folder_write.check_dtype(dtype)
    if isinstance(selected_adapters, str):
        selected_adapters = [selected_adapters]
    selected = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    bad = [n for n in selected if n not in model.peft_config]
    if bad or not selected:
        raise ValueError(
            f"You passed an invalid `selected_adapters` argument {selected}; this model has {list(model.peft_config)}."
        )
    if as_lora:
        from .lora import check_rank, lora_state_dict

        check_rank(lora_rank)
    model.require_weights(selected)
    # the LoRA export of a bat adapter reads its layers' base kernels too; everything else only the adapter pytree
    kernels = {} if not as_lora else {
        layer.path + ("kernel",): tree.get(model.params, layer.path)["kernel"]
        for n in selected if not model.plan.spec(n).variant.additive for layer in model.plan.spec(n).layers
    }
    adapter_params, params = host_trees([model.adapter_params, tree.unflatten(kernels)])
    if not is_main_process:
        return None

    reports = None
    if as_lora:
        exported = {n: lora_state_dict(model, n, lora_rank, adapter_params=adapter_params, params=params)
                    for n in selected}
        tensors = {n: {k: v if dtype is None else jnp.asarray(v).astype(dtype) for k, v in e[0].items()}
                   for n, e in exported.items()}
        configs = {n: e[1] for n, e in exported.items()}
        reports = {n: e[2] for n, e in exported.items()}
    else:
        tensors = {n: get_peft_model_state_dict(model, n, dtype, adapter_params=adapter_params) for n in selected}
        configs = {n: adapter_config_dict(model, n) for n in selected}
        for n in selected:
            _warn_unloadable_in_torch(model, n)
    folder_write.write_adapter_folders(
        save_directory, {"" if n == "default" else n: (configs[n], tensors[n]) for n in selected},
        card=model_card(model),
    )
    return reports


# --------------------------------------------------------------------------- loading


def config_from_json(d: Mapping[str, Any]) -> tuple[MissConfig, bool]:
    """A `MissConfig` from an `adapter_config.json` object, and whether it was a legacy Bone config.

    Bone configs are converted as PEFT's `scripts/convert-bone-to-miss.py` converts them
    (`peft_type` "BONE" -> "MISS"; tensor keys `.bone_` -> `.miss_`), plus `bias` "bone_only" ->
    "MiSS_only" (PEFT treats every "<method>_only" alike). The conversion is exact: Bone's fields are
    a subset of MiSS's with the same meaning, its block shapes and forward are MiSS's balance and bat.
    Unknown fields (a newer PEFT) warn and are ignored.
    """
    d = dict(d)
    peft_type = d.get("peft_type")
    legacy = peft_type == LEGACY_PEFT_TYPE
    if legacy:
        d["peft_type"] = PEFT_TYPE
        d["bias"] = _LEGACY_BIAS.get(d.get("bias"), d.get("bias", "none"))
    elif peft_type != PEFT_TYPE:
        raise ValueError(
            f"This is a {peft_type!r} adapter; miss-jax loads MiSS adapters (peft_type 'MISS', or the older "
            f"'BONE'). A LoRA export of a MiSS adapter loads in PEFT/vLLM, not here."
        )
    return MissConfig.from_dict(d), legacy


_HUB_KEYWORDS = ("revision", "cache_dir", "token", "use_auth_token", "force_download", "local_files_only",
                 "proxies", "resume_download")


def load_options(kwargs: Mapping[str, Any]) -> Optional[MissConfig]:
    """PEFT's `from_pretrained` / `load_adapter` keywords beyond miss-jax's own: accepted with PEFT's meaning
    (returns `config=` or None), or ValueError
    naming what miss-jax does instead.

    * `config`: a `MissConfig` used instead of the folder's `adapter_config.json`;
    * `autocast_adapter_dtype=True`, `low_cpu_mem_usage`: what miss-jax always does (float32 blocks, cast on
      load; the adapter is created as shapes only and filled from the file);
    * `torch_device`, `ephemeral_gpu_offload`, `key_mapping`, Hub keywords: refused, naming the JAX way.
    """
    kwargs = dict(kwargs)
    config = kwargs.pop("config", None)
    kwargs.pop("low_cpu_mem_usage", None)
    if kwargs.pop("autocast_adapter_dtype", True) is not True:
        raise ValueError(
            "autocast_adapter_dtype=False: miss-jax keeps MiSS blocks in float32 (PEFT's autocast) whatever the "
            "base dtype; for blocks in another dtype, cast them after loading with peft_model.update_params(...)."
        )
    if kwargs.pop("ephemeral_gpu_offload", False):
        raise ValueError("ephemeral_gpu_offload=True: miss-jax has no CPU offloading; place the model on devices "
                         "with jax.device_put or miss_jax.sharding.shard_peft_model.")
    if kwargs.pop("key_mapping", None):
        raise ValueError("key_mapping=: miss-jax maps keys by the Flax param path, which mirrors the torch module "
                         "path (docs/DESIGN.md §5); rename the keys of the adapter file instead.")
    if kwargs.pop("torch_device", None) is not None:
        raise ValueError("torch_device=: JAX places arrays itself; load, then move the model with jax.device_put or "
                         "miss_jax.sharding.shard_peft_model.")
    hub = sorted(k for k in kwargs if k in _HUB_KEYWORDS)
    if hub:
        raise ValueError(f"{hub}: miss-jax reads local folders only; download the adapter first with "
                         "huggingface_hub.snapshot_download(repo_id, revision=...) and pass that folder.")
    if kwargs:
        raise TypeError(f"Unexpected keyword arguments {sorted(kwargs)} (PEFT's loading keywords: config, "
                        "autocast_adapter_dtype, low_cpu_mem_usage, torch_device, ephemeral_gpu_offload, key_mapping).")
    if config is None:
        return None
    if not isinstance(config, MissConfig):
        raise ValueError(f"config= must be a miss_jax.MissConfig, got {type(config).__name__} (convert a peft "
                         "config with MissConfig.from_dict(peft_config.to_dict())).")
    return config


def _read(model_id: str, subfolder: Optional[str], is_trainable: bool,
          config: Optional[MissConfig] = None) -> tuple[str, MissConfig, dict[str, Any]]:
    folder = os.path.join(model_id, subfolder) if subfolder else model_id
    legacy = False
    if config is None:
        raw = files.read_config(folder)
        try:
            config, legacy = config_from_json(raw)
        except ValueError as e:
            raise ValueError(f"{os.path.join(folder, files.CONFIG_NAME)}: {e}") from None
    tensors = files.read_tensors(folder)
    if legacy:
        tensors = {k.replace(".bone_", ".miss_"): v for k, v in tensors.items()}  # PEFT's script, verbatim rule
    return folder, dataclasses.replace(config, inference_mode=not is_trainable), tensors


def _in_folder(folder: str, error: ValueError) -> ValueError:
    return ValueError(f"Cannot load the adapter in {folder!r}: {error}")


def load_adapter(
    model: MissModel,
    model_id: str,
    adapter_name: str,
    is_trainable: bool = False,
    subfolder: Optional[str] = None,
    **kwargs: Any,
) -> None:
    """Loads the PEFT folder `model_id` (or its `subfolder`) as adapter `adapter_name` (not activated, as in PEFT).

    `is_trainable=False` marks the config `inference_mode=True`; PEFT's other keywords: `load_options`.
    Raises ValueError, leaving the model unchanged, on anything that does not fit.
    """
    folder, config, tensors = _read(model_id, subfolder, is_trainable, load_options(kwargs))
    with model.transaction():
        try:
            model.add_adapter(adapter_name, config, low_cpu_mem_usage=True)
            set_peft_model_state_dict(model, tensors, adapter_name, source=os.path.join(folder, files.WEIGHTS_NAME))
        except ValueError as e:
            raise _in_folder(folder, e) from None


def from_pretrained(
    cls: type[MissModel],
    model: Any,
    model_id: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    subfolder: Optional[str] = None,
    params: Optional[Mapping] = None,
    **kwargs: Any,
) -> MissModel:
    """A new `cls` (MissModel) around `model` with the adapter of PEFT folder `model_id`, active (in `eval()`
    mode, as PEFT leaves a loaded model). PEFT's other keywords: `load_options`."""
    folder, config, tensors = _read(model_id, subfolder, is_trainable, load_options(kwargs))
    try:
        peft_model = cls(model, config, adapter_name, params=params, low_cpu_mem_usage=True)
        set_peft_model_state_dict(peft_model, tensors, adapter_name, source=os.path.join(folder, files.WEIGHTS_NAME))
    except ValueError as e:
        raise _in_folder(folder, e) from None
    return peft_model
