"""PEFT-format interop for miss-jax: adapter folders PyTorch PEFT reads and writes.

  peft_io         -- save_pretrained / load_adapter / from_pretrained (MissModel delegates here),
                     get_peft_model_state_dict / set_peft_model_state_dict
  names           -- Flax param path <-> PEFT / torch state-dict key mapping
  safetensors_io  -- the folder's two files (JSON + safetensors only: loading runs no code)
"""

from .peft_io import (
    config_from_json,
    from_pretrained,
    get_peft_model_state_dict,
    load_adapter,
    save_pretrained,
    set_peft_model_state_dict,
)

__all__ = [
    "config_from_json",
    "from_pretrained",
    "get_peft_model_state_dict",
    "load_adapter",
    "save_pretrained",
    "set_peft_model_state_dict",
]
