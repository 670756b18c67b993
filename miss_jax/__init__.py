"""miss-jax: MiSS (Matrix Shard Sharing) adapters for JAX/Flax, with PEFT-format interop.

Public API:
  MissConfig, get_peft_model, MissModel  -- PEFT's names and semantics
  ops                                    -- the pure maths (balance / mini / bat, merge, unmerge)
  linen                                  -- the functional Linen transform (Plan, apply, merge)
  nnx                                    -- the NNX transform (MissLinear, apply_miss, merge_and_unload)
  train                                  -- optax train step, orbax checkpoints
  sharding                               -- mesh rules, sharded adapters, sharded train step
"""

from . import linen, nnx, ops, sharding, train
from .config import MissConfig
from .model import MissModel, get_peft_model

__all__ = ["MissConfig", "MissModel", "get_peft_model", "linen", "nnx", "ops", "sharding", "train"]
__version__ = "0.1.0"
