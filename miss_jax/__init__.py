"""miss-jax: MiSS (Matrix Shard Sharing) adapters for JAX/Flax, with PEFT-format interop.

Public API (docs/DESIGN.md §4 draws how the modules depend on each other):
  MissConfig, get_peft_model, MissModel  -- PEFT's names and semantics
  config                                 -- MissConfig and the PEFT format constants
  targeting                              -- module discovery and PEFT's target-matching rules
  ops                                    -- the pure maths and the variant table (balance / mini / bat)
  tree                                   -- nested-dict pytrees addressed by paths
  adapters                               -- adapter specs, the static Plan, the adapter pytree
  linen                                  -- the functional Linen transform (apply, overlay, merge)
  lifecycle                              -- PEFT's adapter lifecycle, once for MissModel and MissNnxModel
  nnx_layers                             -- the NNX transform: MissLinear, ModulesToSave, apply_miss
  nnx                                    -- PEFT's model for NNX (MissNnxModel)
  nnx_generation                         -- MissNnxModel.generate
  nnx_variables                          -- which NNX params train, by type (nnx.LoRAParam: tunix's PeftTrainer)
  layer_rules                            -- which NNX layers MiSS adapts, and their kernels' in/out axes
  losses                                 -- losses for train steps (causal LM, classification, chunked)
  attention, remat                       -- blockwise attention and gradient checkpointing (long sequences)
  generation                             -- MissModel.generate
  rope                                   -- RoPE as transformers computes it (frequencies of rope_theta/rope_scaling)
  fidelity                               -- Flax configs computed as PyTorch does (RoPE, tied lm_head), or refused
  programs                               -- the jitted forward and merge, shared per model configuration
  status                                 -- PEFT's layer / model status dataclasses
  train                                  -- optax train step, orbax checkpoints
  sharding                               -- mesh rules, sharded adapters, sharded train step
  nnx_sharding                           -- NNX models on a mesh by their own annotations (tunix's), a step
  quantized                              -- (needs qwix; not imported here) a qwix-quantized frozen base for NNX (QMiSS)
"""

from . import (
    adapters, attention, config, fidelity, generation, layer_rules, lifecycle, linen, losses, nnx, nnx_generation,
    nnx_layers, nnx_sharding, nnx_variables, ops, programs, remat, rope, sharding, status, targeting, train, tree,
)
from .adapters import AdapterSpec, Plan
from .config import MissConfig
from .model import MissModel, get_peft_model

__all__ = [
    "AdapterSpec", "MissConfig", "MissModel", "Plan", "adapters", "attention", "config", "fidelity", "generation",
    "get_peft_model", "layer_rules", "lifecycle", "linen", "losses", "nnx", "nnx_generation", "nnx_layers",
    "nnx_sharding", "nnx_variables", "ops", "programs", "remat", "rope", "sharding", "status", "targeting", "train",
    "tree",
]
__version__ = "0.1.0"
