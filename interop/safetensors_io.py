"""The files of a PEFT adapter folder: `adapter_config.json` and `adapter_model.safetensors`.

Only JSON and safetensors are ever read, so loading executes no code (PEFT's legacy pickle file
`adapter_model.bin` is refused with a clear message).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import safetensors.flax
from safetensors import SafetensorError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # PEFT's legacy torch.save file: never loaded here


def write_config(folder: str, config: Mapping[str, Any]) -> None:
    """Writes `adapter_config.json` as PEFT does (sorted keys, indent 2)."""
    with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
        f.write("\n")


def write_tensors(folder: str, tensors: Mapping[str, Any]) -> None:
    """Writes `adapter_model.safetensors` (JAX or NumPy arrays) with PEFT's metadata (`format: pt`)."""
    path = os.path.join(folder, WEIGHTS_NAME)
    safetensors.flax.save_file({k: jnp.asarray(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors creates the file 0600; give it the mode open() would


def read_config(folder: str) -> dict[str, Any]:
    """The JSON object of `folder/adapter_config.json`; ValueError if `folder` is not a PEFT adapter folder."""
    if not os.path.isdir(folder):
        raise ValueError(
            f"{folder!r} is not a folder. miss-jax reads local PEFT adapter folders (download Hub adapters first, "
            "e.g. with huggingface_hub.snapshot_download)."
        )
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
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


def read_tensors(folder: str) -> dict[str, jax.Array]:
    """Every tensor of `folder/adapter_model.safetensors`, by key (dtypes as stored)."""
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(folder, PICKLE_NAME)):
            raise ValueError(
                f"{folder!r} holds only {PICKLE_NAME}, a pickle, which miss-jax never loads (unpickling can run "
                f"code). Convert it in PyTorch: safetensors.torch.save_file(torch.load(path, weights_only=True), "
                f"'{WEIGHTS_NAME}'), or save the adapter again with safe_serialization=True."
            )
        raise ValueError(f"{folder!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}.")
    try:
        return safetensors.flax.load_file(path)
    except SafetensorError as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt. Save the adapter again."
        ) from None
