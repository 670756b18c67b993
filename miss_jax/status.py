"""PEFT's status dataclasses (`get_layer_status()` / `get_model_status()` of `MissModel`), same fields and
meaning as `peft.tuners.tuners_utils.TunerLayerStatus` / `TunerModelStatus`."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import jax

def platforms(leaves: Any) -> list[str]:
    """The device platforms (`cpu`, `gpu`, `tpu`) holding the arrays of `leaves`, sorted."""
    found = set()
    for x in jax.tree_util.tree_leaves(leaves):
        found |= {d.platform for d in x.devices()} if isinstance(x, jax.Array) else {"cpu"}
    return sorted(found)


MISS_LAYER_TYPE = "miss.MissLinear"  # PEFT's `module_type` of an adapted layer
MODULES_TO_SAVE_TYPE = "ModulesToSaveWrapper"  # ... and of a `modules_to_save` module


@dataclasses.dataclass
class TunerLayerStatus:
    """PEFT's `TunerLayerStatus` (same fields, same meaning): one adapted layer or `modules_to_save` module."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, str]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclasses.dataclass
class TunerModelStatus:
    """PEFT's `TunerModelStatus` (same fields, same meaning): the adapters' state over the whole model."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, str]
    active_adapters: Union[list[str], str]
    merged_adapters: Union[list[str], str]
    requires_grad: dict[str, Union[bool, str]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]
