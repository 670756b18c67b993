"""The files of a PEFT adapter folder: `adapter_config.json` and `adapter_model.safetensors`.

Only JSON and safetensors are ever read, so loading executes no code (PEFT's legacy pickle file
`adapter_model.bin` is refused with a clear message). The writers write one file at a given path;
`interop.folder_write` writes them under temporary names beside the final ones
(`.adapter_model.safetensors.<token>.tmp`, see `temp_path`), weights before config, and renames
them into place. A config temporary file whose weights temporary file is gone therefore marks a save
interrupted between its two renames: the readers refuse such a folder with the one-line fix.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import safetensors.flax
from safetensors import SafetensorError, safe_open

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # PEFT's legacy torch.save file: never loaded here
_TEMP = re.compile(r"\.(" + re.escape(CONFIG_NAME) + "|" + re.escape(WEIGHTS_NAME) + r")\.([0-9a-f]{12})\.tmp")
# safetensors dtypes JAX reads; others (F8_*, C64, ...) are refused with a message naming the fix
_LOADABLE_DTYPES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16",
                              "BF16", "F32", "F64"})


def temp_path(path: str, token: str) -> str:
    """The temporary name a save writes `path` under before renaming it: `.<name>.<token>.tmp` beside it.

    `token` is 12 lowercase hex digits, one per save (`temp_files` recognises these names).
    """
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{token}.tmp")


def temp_files(folder: str) -> dict[tuple[str, str], str]:
    """The save temporary files in `folder` (regular files named by `temp_path` for the config or the
    weights): `{(final name, token): path}`. Any other file, whatever its name, is not one."""
    found = {}
    for entry in os.listdir(folder):
        match = _TEMP.fullmatch(entry)
        path = os.path.join(folder, entry)
        if match and os.path.isfile(path) and not os.path.islink(path):
            found[(match.group(1), match.group(2))] = path
    return found


def _read_bytes(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _refuse_interrupted(folder: str) -> None:
    """ValueError if `folder`'s weights are newer than its config: there is a config temporary file (a
    save writes all its temporaries, weights first, before its first rename) whose weights temporary
    file is gone, and its content differs from `adapter_config.json` (equal configs are consistent)."""
    temps = temp_files(folder)
    config = os.path.join(folder, CONFIG_NAME)
    for (name, token), path in sorted(temps.items()):
        if name == CONFIG_NAME and (WEIGHTS_NAME, token) not in temps and _read_bytes(path) != _read_bytes(config):
            raise ValueError(
                f"{folder!r} holds the {WEIGHTS_NAME} of a save that was interrupted (or is still running) before "
                f"it renamed {os.path.basename(path)} to {CONFIG_NAME}, so its {CONFIG_NAME} is the previous "
                f"adapter's. Finish that save: mv {path} {config} (the next save_pretrained into this folder "
                "does it too), or save the adapter again."
            )


def _corrupt(path: str, error: SafetensorError) -> ValueError:
    return ValueError(
        f"{path} is not a readable safetensors file ({error}); it is truncated or corrupt. Save the adapter again."
    )


def write_config(path: str, config: Mapping[str, Any]) -> None:
    """Writes an `adapter_config.json` at `path` as PEFT does (sorted keys, indent 2)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
        f.write("\n")


def write_tensors(path: str, tensors: Mapping[str, Any]) -> None:
    """Writes an `adapter_model.safetensors` at `path` (JAX or NumPy arrays) with PEFT's metadata (`format: pt`).

    The bytes are serialised in memory and written here with `open()` (the usual mode, no temporary file of
    safetensors' own beside `path`, which a killed save would leave behind)."""
    data = safetensors.flax.save({k: jnp.asarray(v) for k, v in tensors.items()}, metadata={"format": "pt"})
    with open(path, "wb") as f:
        f.write(data)


def read_config(folder: str) -> dict[str, Any]:
    """The JSON object of `folder/adapter_config.json`; ValueError if `folder` is not a PEFT adapter folder."""
    if not os.path.isdir(folder):
        raise ValueError(
            f"{folder!r} is not a folder. miss-jax reads local PEFT adapter folders (download Hub adapters first, "
            "e.g. with huggingface_hub.snapshot_download)."
        )
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        _refuse_interrupted(folder)
        subs = sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, CONFIG_NAME)))
        hint = f" It has adapter sub-folders {subs}: pass subfolder=<name>." if subs else ""
        raise ValueError(
            f"{folder!r} is not a PEFT adapter folder: it has no {CONFIG_NAME}. Pass the folder that "
            f"save_pretrained wrote (adapters other than 'default' live in sub-folders named after them).{hint}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it may be truncated or corrupt.") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{path} is not a PEFT adapter config: it has no 'peft_type' field.")
    return config


def read_header(folder: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{key: (shape, safetensors dtype name)}` of `folder/adapter_model.safetensors`, from its header only.

    ValueError if the file is missing (or only a pickle is there), is not a readable safetensors file,
    or belongs to a save interrupted before it renamed the config into place.
    """
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(folder, PICKLE_NAME)):
            raise ValueError(
                f"{folder!r} holds only {PICKLE_NAME}, a pickle, which miss-jax never loads (unpickling can run "
                f"code). Convert it in PyTorch: safetensors.torch.save_file(torch.load(path, weights_only=True), "
                f"'{WEIGHTS_NAME}'), or save the adapter again with safe_serialization=True."
            )
        raise ValueError(f"{folder!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}.")
    _refuse_interrupted(folder)
    try:
        with safe_open(path, "np") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except SafetensorError as e:
        raise _corrupt(path, e) from None


def read_tensors(folder: str) -> dict[str, jax.Array]:
    """Every tensor of `folder/adapter_model.safetensors`, by key (dtypes as stored).

    ValueError as `read_header`, and for dtypes JAX does not load here (float8, complex): the message
    names the tensor and how to cast the file.
    """
    header = read_header(folder)
    path = os.path.join(folder, WEIGHTS_NAME)
    odd = sorted((k, dtype) for k, (_, dtype) in header.items() if dtype not in _LOADABLE_DTYPES)
    if odd:
        key, dtype = odd[0]
        raise ValueError(
            f"{path} stores {len(odd)} tensor(s) as {dtype} (e.g. {key}), which miss-jax does not load "
            "(float8 and complex adapters are not supported). Save the adapter as float32 or bfloat16, e.g. "
            "in PyTorch: save_file({k: v.float() for k, v in load_file(path).items()}, path, "
            "metadata={'format': 'pt'})."
        )
    try:
        return safetensors.flax.load_file(path)
    except SafetensorError as e:
        raise _corrupt(path, e) from None
