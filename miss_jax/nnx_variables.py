"""Which NNX variables train, told by their type: trainable ones are `nnx.LoRAParam`, the rest `nnx.Param`.

Flax NNX tools pick what to train by variable type. tunix's `PeftTrainer` trains the `nnx.LoRAParam`s of a
model, or every `nnx.Param` when it has none (`tunix.sft.utils.is_lora_enabled`); its checkpoints then hold
only the `nnx.LoRAParam`s, and its `Sampler` swaps in new weights for exactly the variables whose type is
`nnx.LoRAParam`. So MiSS blocks are born `nnx.LoRAParam` (`MissParam`), and a PEFT model over an NNX model
(`miss_jax.nnx.MissNnxModel`) re-types its variables whenever the set it trains changes
(`mark_trainable`): what its `trainable` filter selects (the active adapters' blocks, their
`modules_to_save` copies, the biases they train) becomes `nnx.LoRAParam`; every other param, a frozen or
inactive adapter's block or copy, a base weight, a LoRA param of another tool, becomes `nnx.Param`, as
PEFT sets `requires_grad=False` on everything but the adapter it trains.

A variable keeps its identity, value and metadata (sharding); only its class changes, between two classes of
one layout. A param of another `nnx.Param` subclass `X` trains as a subclass of both `X` and
`nnx.LoRAParam` (`trainable_type`), and is an `X` again once frozen.

With nothing to train (every adapter frozen, e.g. loaded without `is_trainable=True`, or adapters
disabled) a model holds no `nnx.LoRAParam`, and tunix's `PeftTrainer` would train every weight:
`check_trainable` refuses such a model, naming the fix.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from flax import nnx

MissParam = nnx.LoRAParam
"""The type of trainable MiSS blocks: `nnx.LoRAParam` itself, so every tool that trains, saves or swaps
`nnx.LoRAParam`s (tunix's `PeftTrainer`, its checkpoints and `Sampler`; `wrt=MissParam`) sees exactly them."""

FROZEN = "frozen_type"  # the class attribute of a `trainable_type` class naming the class it was made from


@functools.cache
def trainable_type(cls: type[nnx.Param]) -> type[nnx.LoRAParam]:
    """The class a param of class `cls` has while it trains: `nnx.LoRAParam` for `nnx.Param`, `cls` itself for
    an `nnx.LoRAParam` (sub)class, else a subclass of both `cls` and `nnx.LoRAParam` (one per class)."""
    if issubclass(cls, nnx.LoRAParam):
        return cls
    if cls is nnx.Param:
        return nnx.LoRAParam
    return type(f"Trainable{cls.__name__}", (cls, nnx.LoRAParam), {"__module__": __name__, FROZEN: cls})


def frozen_type(cls: type[nnx.Param]) -> type[nnx.Param]:
    """The class a param of class `cls` has while it does not train: the class a `trainable_type` class was made
    from, `nnx.Param` for any other `nnx.LoRAParam` (sub)class, else `cls` itself."""
    if not issubclass(cls, nnx.LoRAParam):
        return cls
    return vars(cls).get(FROZEN, nnx.Param)


def mark_trainable(model: nnx.Module, trainable: Callable[[Any, nnx.Variable], bool]) -> None:
    """Re-types, in place, every param of `model` (any `nnx.Param`): `trainable_type` where
    `trainable(path, variable)` (path from `model`), `frozen_type` elsewhere."""
    for path, node in nnx.iter_graph(model):
        cls = type(node)
        if issubclass(cls, nnx.Param):
            new = trainable_type(cls) if trainable(path, node) else frozen_type(cls)
            if new is not cls:
                object.__setattr__(node, "__class__", new)


def check_trainable(model: nnx.Module) -> None:
    """ValueError unless `model` holds an `nnx.LoRAParam`: without one, tunix's `PeftTrainer` (and any tool that
    trains LoRA params when there are some, else all params) would fine-tune every weight of the model."""
    if not any(isinstance(node, nnx.LoRAParam) for _, node in nnx.iter_graph(model)):
        raise ValueError(
            "Nothing in this model is trainable (no nnx.LoRAParam): tunix's PeftTrainer would train every weight. "
            "Unfreeze an adapter first: set_requires_grad(name, True), set_adapter(name), or load it with "
            "is_trainable=True; and call it outside disable_adapter()."
        )
