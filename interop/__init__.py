"""PEFT-format interop for miss-jax: adapter folders PyTorch PEFT reads and writes.

  peft_io         -- save_pretrained / load_adapter / from_pretrained (MissModel delegates here)
  state_dict      -- get_peft_model_state_dict / set_peft_model_state_dict: an adapter's tensors by PEFT key
  folder_write    -- atomic, file-by-file folder writes that never touch a user's files
  lora            -- LoRA export (save_pretrained(as_lora=True), miss-jax convert --to lora)
  nnx_io          -- PEFT folders for Flax NNX models through name maps (tunix's Llama 3 / Qwen 3)
  torch_ref, cli  -- the PyTorch reference check and the `miss-jax` command
  names           -- Flax param path <-> PEFT / torch state-dict key mapping
  safetensors_io  -- the folder's two files (JSON + safetensors only: loading runs no code)
"""

from .peft_io import config_from_json, from_pretrained, load_adapter, save_pretrained
from .state_dict import get_peft_model_state_dict, set_peft_model_state_dict

__all__ = [
    "config_from_json",
    "from_pretrained",
    "get_peft_model_state_dict",
    "load_adapter",
    "save_pretrained",
    "set_peft_model_state_dict",
]
