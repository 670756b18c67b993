"""PEFT-format adapter folders: `save_pretrained`, `load_adapter`, `from_pretrained` for `MissModel`.

A folder holds `adapter_config.json` and `adapter_model.safetensors`, exactly as PEFT 0.21 writes
them (checked against peft 0.21.2 in the tests): keys `base_model.model.<torch path>.miss_block`,
torch layout, float32 by default; `modules_to_save` copies whole under their plain path; trained
biases by bias mode (`<path>.base_layer.bias` for adapted layers). The adapter `default` goes at
the folder's root, every other adapter in a sub-folder named after it. Older Bone folders
(`peft_type: "BONE"`, `bone_block` keys) load through the conversion of PEFT's
`scripts/convert-bone-to-miss.py`.

Which tensors an adapter has, and under which keys, is listed once (`_entries`): saving reads those
leaves, loading fills them, so the two directions agree by construction. Loading creates the
adapter abstractly (`low_cpu_mem_usage=True`: shapes only) and fills it; on any error the model is
left exactly as it was. Saves go to a temporary folder beside the target, renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from miss_jax.config import PEFT_TYPE, MissConfig
from miss_jax.linen import _get

from . import names
from . import safetensors_io as files
from .names import Path

if TYPE_CHECKING:
    from miss_jax.model import MissModel

LEGACY_PEFT_TYPE = "BONE"  # MiSS's name in PEFT before 0.17 (Bone was removed in 0.19)
_LEGACY_BIAS = {"bone_only": "MiSS_only", "Bone_only": "MiSS_only"}
_MAX_LISTED = 12


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of an adapter: its key in the adapter file and its leaf in `MissModel.adapter_params`.

    `path` is the leaf's path inside `adapter_params[group]` (for "miss" and "modules_to_save" it
    starts with the adapter name). `aliases` are other keys PEFT writes for the same tensor; they are
    accepted when loading and never written.
    """

    key: str
    group: str
    path: Path
    aliases: tuple[str, ...] = ()

    @property
    def leaf(self) -> str:
        return self.path[-1]


def _entries(model: "MissModel", adapter_name: str) -> list[Entry]:
    """Every tensor adapter `adapter_name` stores, with PEFT 0.21's key for it.

    * `<layer>.miss_block` for each adapted layer (PEFT's block shape; no layout change);
    * `<module>.<param>` for each param of a `modules_to_save` copy (torch names and layout);
    * trained biases: `<layer>.base_layer.bias` for adapted layers, `<path>.bias` for the others.
    """
    spec = model._specs[adapter_name]
    adapted = {layer.path for layer in spec.layers}
    out = [
        Entry(names.adapter_key(layer.path, names.BLOCK), "miss", (adapter_name, *layer.path, names.BLOCK))
        for layer in spec.layers
    ]
    saved = traverse_util.flatten_dict(model.adapter_params["modules_to_save"].get(adapter_name, {}))
    out += [Entry(names.PREFIX + names.torch_param_key(p), "modules_to_save", (adapter_name, *p)) for p in saved]
    for path in spec.bias_paths:
        if path in adapted:
            out.append(Entry(names.adapter_key(path, names.BASE_LAYER, "bias"), "bias", path + ("bias",)))
        else:
            # A torch model whose *other* adapters wrap this layer names it `<path>.base_layer.bias`.
            alias = names.adapter_key(path, names.BASE_LAYER, "bias")
            out.append(Entry(names.adapter_key(path, "bias"), "bias", path + ("bias",), (alias,)))
    return out


def _peft_extras(model: "MissModel", adapter_name: str) -> set[str]:
    """Keys PEFT's `bias="all"` also writes for biases inside a `modules_to_save` module, read and dropped.

    PEFT selects every state-dict key ending in `.bias`, so beside the copy's `<module>.<...>.bias` it
    writes `<module>.modules_to_save.<...>.bias` (the same tensor; its own loader reports the key as
    unexpected) and `<module>.original_module.<...>.bias` (the base bias: unused while the copy is
    active, so it receives no gradient and keeps the base value, which miss-jax keeps too).
    """
    spec = model._specs[adapter_name]
    if spec.config.bias != "all":
        return set()
    saved = traverse_util.flatten_dict(model.adapter_params["modules_to_save"].get(adapter_name, {}))
    extras = set()
    for path in (p for p in saved if p[-1] == "bias"):
        module = next(m for m in spec.saved_modules if path[: len(m)] == m)
        for wrapper in (names.SAVED_COPY, names.ORIGINAL_MODULE):
            extras.add(names.adapter_key(module + (wrapper,) + path[len(module) : -1], "bias"))
    return extras


def _leaf(model: "MissModel", entry: Entry) -> Any:
    return _get(model.adapter_params[entry.group], entry.path)


# --------------------------------------------------------------------------- state dicts


def get_peft_model_state_dict(
    model: "MissModel", adapter_name: str = "default", dtype: Optional[Any] = jnp.float32
) -> dict[str, jax.Array]:
    """The tensors PEFT stores for `adapter_name`: `{key: array}`, torch layout, cast to `dtype` (None: as is)."""
    model._check_name(adapter_name)
    model._require_weights([adapter_name])
    out = {}
    for e in _entries(model, adapter_name):
        value = names.to_torch(e.leaf, jnp.asarray(_leaf(model, e)))
        out[e.key] = value if dtype is None else value.astype(dtype)
    return out


def _listed(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def set_peft_model_state_dict(
    model: "MissModel", state_dict: Mapping[str, Any], adapter_name: str = "default", source: str = "state_dict"
) -> None:
    """Fills adapter `adapter_name` (abstract or not) from a PEFT state dict (`get_peft_model_state_dict`'s inverse).

    Every key must be present with its exact shape (ValueError listing missing/unexpected keys, or
    naming a key and both shapes, otherwise; the model is then unchanged). PEFT's own redundant
    keys (`_peft_extras`) are accepted and dropped. Values are cast to the adapter's dtypes (float32
    blocks; the base dtype for module copies and biases), as PEFT's `autocast_adapter_dtype`.
    """
    model._check_name(adapter_name)
    entries = _entries(model, adapter_name)
    by_key = {k: e for e in entries for k in (e.key,) + e.aliases}
    extras = _peft_extras(model, adapter_name)
    unexpected = [k for k in state_dict if k not in by_key and k not in extras]
    found = {by_key[k].key: v for k, v in state_dict.items() if k in by_key}
    missing = [e.key for e in entries if e.key not in found]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match adapter {adapter_name!r} as its config places it on this model."
            + (f" Missing keys: {_listed(missing)}." if missing else "")
            + (f" Unexpected keys: {_listed(unexpected)}." if unexpected else "")
            + " Check that the folder was saved from this architecture with this adapter config."
        )
    values, wrong = {}, []
    for e in entries:
        like, tensor = _leaf(model, e), found[e.key]
        want = names.torch_shape(e.leaf, tuple(like.shape))
        if tuple(tensor.shape) != want:
            wrong.append(f"{e.key}: {tuple(tensor.shape)} in {source}, {want} expected by the model")
        else:
            values[e] = names.from_torch(e.leaf, jnp.asarray(tensor)).astype(like.dtype)
    if wrong:
        raise ValueError(f"Tensors of the wrong shape for adapter {adapter_name!r}: " + "; ".join(wrong) + ".")
    groups: dict[str, dict[Path, Any]] = {"miss": {}, "modules_to_save": {}}
    bias = traverse_util.flatten_dict(model.adapter_params["bias"])
    for e, v in values.items():
        (bias if e.group == "bias" else groups[e.group])[e.path] = v
    for group, flat in groups.items():
        if flat:
            model.adapter_params[group].update(traverse_util.unflatten_dict(flat))
    model.adapter_params["bias"] = traverse_util.unflatten_dict(bias)


# --------------------------------------------------------------------------- saving


def _auto_mapping(model: "MissModel") -> dict[str, str]:
    """PEFT's `auto_mapping` for the PyTorch twin of the Flax class (what AutoPeftModel needs)."""
    cls = type(model.base_model)
    return {
        "base_model_class": cls.__name__.removeprefix("Flax"),
        "parent_library": cls.__module__.replace(".modeling_flax_", ".modeling_"),
    }


def adapter_config_dict(model: "MissModel", adapter_name: str) -> dict[str, Any]:
    """The `adapter_config.json` object PEFT writes for this adapter (`inference_mode: true`, as PEFT)."""
    config = model.peft_config[adapter_name]
    d = config.to_dict()
    d["inference_mode"] = True
    if config.base_model_name_or_path is None:
        d["base_model_name_or_path"] = getattr(getattr(model.base_model, "config", None), "name_or_path", "") or None
    if config.task_type is None:
        d["auto_mapping"] = _auto_mapping(model)
    return d


def _warn_unloadable_in_torch(model: "MissModel", adapter_name: str) -> None:
    others = [layer for layer in model._specs[adapter_name].layers if layer.layout != "flax"]
    if others:
        warnings.warn(
            f"Adapter {adapter_name!r} sits on {others[0].type_name} layers ({_listed([o.key for o in others])}); "
            "PEFT's MiSS supports only torch.nn.Linear, so PyTorch PEFT cannot load this folder (miss-jax can). "
            "For PyTorch, export merged weights (merge_and_unload()) or a LoRA folder (save_pretrained(..., "
            "as_lora=True)), which PEFT loads on Conv1D.",
            stacklevel=3,
        )


def replace_folder(target: str, write: Callable[[str], None]) -> None:
    """Runs `write(tmp)` on a fresh folder beside `target`, then renames it to `target`.

    An existing `target` is swapped out whole; entries of it that this save does not rewrite (other
    adapters' sub-folders, a README) are moved into the new folder, as PEFT leaves them. On any error
    (or interruption) before the rename, `target` is untouched and the temporary folder removed.
    """
    target = os.path.abspath(target)
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
    os.makedirs(tmp)
    try:
        write(tmp)
        if not os.path.exists(target):
            os.rename(tmp, target)
            return
        old = os.path.join(parent, f".{base}.{uuid.uuid4().hex[:12]}.old")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        for entry in os.listdir(old):
            if not os.path.exists(os.path.join(target, entry)):
                os.rename(os.path.join(old, entry), os.path.join(target, entry))
        shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_folders(save_directory: str, folders: Mapping[str, tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """Writes each `(adapter_config, tensors)` into `save_directory/<relative folder>` ("" is the root),
    all at once through `replace_folder`."""

    def write(root: str) -> None:
        for relative, (config, tensors) in folders.items():
            folder = os.path.join(root, relative) if relative else root
            os.makedirs(folder, exist_ok=True)
            files.write_config(folder, config)
            files.write_tensors(folder, tensors)

    replace_folder(save_directory, write)


def save_pretrained(
    model: "MissModel",
    save_directory: str,
    selected_adapters: Optional[Sequence[str]] = None,
    safe_serialization: bool = True,
    is_main_process: bool = True,
    dtype: Optional[Any] = jnp.float32,
    as_lora: bool = False,
    lora_rank: Optional[int] = None,
) -> Optional[dict[str, Any]]:
    """Writes adapters as PEFT folders: `default` at the root, the others in sub-folders named after them.

    Args:
      model: the `MissModel`.
      save_directory: the folder (created; an existing one is replaced atomically, keeping entries
        this save does not rewrite).
      selected_adapters: the adapters to save (default: all).
      safe_serialization: must be True (safetensors; miss-jax never writes pickles).
      is_main_process: write only if True (pass `jax.process_index() == 0` on multi-host runs).
      dtype: tensor dtype in the file (default float32, as PEFT); None keeps each tensor's dtype.
      as_lora: write PEFT LoRA folders instead (for vLLM and other LoRA-only servers): exact for
        balance/mini at rank r, a truncated SVD for bat (see `interop.lora`).
      lora_rank: with `as_lora`, the LoRA rank (default: exact, r for balance/mini, full for bat).

    Returns:
      None, or with `as_lora` the `LoraReport` of each adapter (rank and relative error per layer).
    """
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file.")
    if not safe_serialization:
        raise ValueError("miss-jax writes safetensors only (safe_serialization=True); it never writes pickles.")
    selected = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    bad = [n for n in selected if n not in model.peft_config]
    if bad or not selected:
        raise ValueError(
            f"You passed an invalid `selected_adapters` argument {selected}; this model has {list(model.peft_config)}."
        )
    reports = None
    if as_lora:
        from .lora import lora_state_dict

        exported = {n: lora_state_dict(model, n, lora_rank) for n in selected}
        tensors = {n: e[0] for n, e in exported.items()}
        configs = {n: e[1] for n, e in exported.items()}
        reports = {n: e[2] for n, e in exported.items()}
    else:
        tensors = {n: get_peft_model_state_dict(model, n, dtype) for n in selected}  # validates before any write
        configs = {n: adapter_config_dict(model, n) for n in selected}
        for n in selected:
            _warn_unloadable_in_torch(model, n)
    if not is_main_process:
        return reports

    write_folders(save_directory, {"" if n == "default" else n: (configs[n], tensors[n]) for n in selected})
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


def _read(model_id: str, subfolder: Optional[str], is_trainable: bool) -> tuple[str, MissConfig, dict[str, Any]]:
    folder = os.path.join(model_id, subfolder) if subfolder else model_id
    raw = files.read_config(folder)
    try:
        config, legacy = config_from_json(raw)
    except ValueError as e:
        raise ValueError(f"{os.path.join(folder, files.CONFIG_NAME)}: {e}") from None
    tensors = files.read_tensors(folder)
    if legacy:
        tensors = {k.replace(".bone_", ".miss_"): v for k, v in tensors.items()}  # PEFT's script, verbatim rule
    return folder, dataclasses.replace(config, inference_mode=not is_trainable), tensors


@contextlib.contextmanager
def _unchanged_on_error(model: "MissModel") -> Iterator[None]:
    """Restores the model's adapter state if the body raises (JAX arrays are immutable: dict copies suffice)."""

    def copy(tree: Any) -> Any:
        return {k: copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree

    before = {
        "peft_config": dict(model.peft_config),
        "_specs": dict(model._specs),
        "adapter_params": copy(model.adapter_params),
        "active_adapters": list(model.active_adapters),
        "_frozen": model._frozen,
        "_rng": model._rng,
    }
    try:
        yield
    except BaseException:
        for attr, value in before.items():
            setattr(model, attr, value)
        raise


def _in_folder(folder: str, error: ValueError) -> ValueError:
    return ValueError(f"Cannot load the adapter in {folder!r}: {error}")


def load_adapter(
    model: "MissModel",
    model_id: str,
    adapter_name: str,
    is_trainable: bool = False,
    subfolder: Optional[str] = None,
) -> None:
    """Loads the PEFT folder `model_id` (or its `subfolder`) as adapter `adapter_name` (not activated, as in PEFT).

    `is_trainable=False` marks the config `inference_mode=True`. Raises ValueError, leaving the model
    unchanged, on anything that does not fit.
    """
    folder, config, tensors = _read(model_id, subfolder, is_trainable)
    with _unchanged_on_error(model):
        try:
            model.add_adapter(adapter_name, config, low_cpu_mem_usage=True)
            set_peft_model_state_dict(model, tensors, adapter_name, source=os.path.join(folder, files.WEIGHTS_NAME))
        except ValueError as e:
            raise _in_folder(folder, e) from None


def from_pretrained(
    cls: type,
    model: Any,
    model_id: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    subfolder: Optional[str] = None,
    params: Optional[Mapping] = None,
) -> "MissModel":
    """A new `cls` (MissModel) around `model` with the adapter of PEFT folder `model_id`, active."""
    folder, config, tensors = _read(model_id, subfolder, is_trainable)
    try:
        peft_model = cls(model, config, adapter_name, params=params, low_cpu_mem_usage=True)
        set_peft_model_state_dict(peft_model, tensors, adapter_name, source=os.path.join(folder, files.WEIGHTS_NAME))
    except ValueError as e:
        raise _in_folder(folder, e) from None
    return peft_model
