"""Per-layer rematerialisation (gradient checkpointing) for transformers Flax models, without editing them.

>>> # with remat.checkpointing("nothing_saveable"):
>>> #     loss, grads = jax.value_and_grad(loss_fn)(...)      # the forward must be traced inside

Within `checkpointing(policy)`, a `flax.linen.intercept_methods` interceptor runs the `__call__` of
every *layer* under a lifted `nn.checkpoint` (`jax.checkpoint` with Linen scopes, rngs and variables
handled by Flax): the backward pass keeps each layer's inputs plus what `policy` saves, and recomputes
the rest of the layer.

What a layer is. transformers builds every stack of blocks as a list of modules named by their index
(`name=str(i)`): `model.layers.0` (Llama, Mistral, Gemma), `transformer.h.0` (GPT-2, GPT-Neo, GPT-J),
`model.decoder.layers.0` (OPT, BART decoder), `model.encoder.layers.0` (BART encoder),
`bert.encoder.layer.0` (BERT, RoBERTa), `vit.encoder.layer.0` (ViT), `encoder.block.0` /
`decoder.block.0` (T5's `FlaxT5LayerCollection`). The rule is therefore: **a layer is a Linen module
whose name is a decimal integer and that is not inside another layer** (T5's sub-layers
`block.0.layer.0`, ... are digit-named too; they run inside their block's checkpoint, not in their own).

Arguments of the layer call that are not arrays (`deterministic`, `init_cache`, `output_attentions`,
None, ints, strings) are closed over as static values; arrays (and pytrees of arrays) are traced.
Nested `intercept_methods` contexts (MiSS's adapters, `miss_jax.attention`) keep applying inside the
checkpointed layer. Outputs and gradients equal those without checkpointing, dropout included (the
lifted checkpoint hands the layer the same `"dropout"` rngs, and the recomputation reuses them).

Measuring the saving: XLA:CPU expands the optimisation barriers `jax.checkpoint` relies on and then
merges the recomputation with the forward pass, so on CPU a compiled program's `memory_analysis()`
does not drop (the jaxpr's saved residuals do: `jax.ad_checkpoint.saved_residuals`). GPU and TPU
compilers keep the barriers (not measured in this repository's CPU tests).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np

Policy = Callable[..., bool]


def _offload_policy() -> Policy:
    memories = {m.kind for m in jax.devices()[0].addressable_memories()}
    if "pinned_host" not in memories:
        raise ValueError(
            f"The 'offload' policy needs a device with a 'pinned_host' memory space; {jax.devices()[0].platform} "
            f"has {sorted(memories)}. Use 'nothing_saveable' or 'dots_with_no_batch_dims_saveable'."
        )
    return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")


# name -> factory of the jax.checkpoint policy
POLICIES: dict[str, Callable[[], Policy]] = {
    # save nothing but the layer inputs: least memory, one extra forward of every layer
    "nothing_saveable": lambda: jax.checkpoint_policies.nothing_saveable,
    # also save the output of every matmul (attention scores included): more memory, little recompute
    "dots_saveable": lambda: jax.checkpoint_policies.dots_saveable,
    # save the outputs of the weight matmuls only (no batch dims: projections, MLP), recompute attention
    "dots_with_no_batch_dims_saveable": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # as the previous one, but the saved matmul outputs live in pinned host memory until the backward
    "offload": _offload_policy,
}


def resolve_policy(policy: str) -> Policy:
    """The `jax.checkpoint` policy named `policy` (one of `POLICIES`); ValueError listing them otherwise."""
    if policy not in POLICIES:
        raise ValueError(f"Unknown checkpointing policy {policy!r}; valid policies are {sorted(POLICIES)}.")
    return POLICIES[policy]()


def is_layer_name(name: Any) -> bool:
    """True for the name of a module in a transformers layer list (`"0"`, `"1"`, ...)."""
    return isinstance(name, str) and name.isdecimal()


class _Depth(threading.local):
    """How many checkpointed layers the current trace is inside (thread-local, as Flax's interceptor stack)."""

    value: int = 0


_depth = _Depth()


@contextlib.contextmanager
def _inside_layer() -> Iterator[None]:
    _depth.value += 1
    try:
        yield
    finally:
        _depth.value -= 1


def _is_traced(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


def checkpointed_call(module: nn.Module, args: tuple, kwargs: dict, policy: Policy, prevent_cse: bool = True) -> Any:
    """`module(*args, **kwargs)` under a lifted `nn.checkpoint` with `policy` (module bound, e.g. inside
    an interceptor). Array leaves of `args`/`kwargs` are traced inputs; every other leaf is static."""
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    traced = [i for i, leaf in enumerate(leaves) if _is_traced(leaf)]

    def layer_call(mdl: nn.Module, *arrays: Any) -> Any:
        full = list(leaves)
        for i, a in zip(traced, arrays):
            full[i] = a
        a, k = jax.tree_util.tree_unflatten(treedef, full)
        with _inside_layer():  # the re-entered __call__ below (and nested layers) run as they are
            return mdl(*a, **k)

    run = nn.checkpoint(layer_call, policy=policy, prevent_cse=prevent_cse)
    return run(module, *(leaves[i] for i in traced))


@contextlib.contextmanager
def checkpointing(policy: str = "nothing_saveable", prevent_cse: bool = True) -> Iterator[None]:
    """Within this context, every transformers layer (see the module docstring) traced in a Linen call
    runs under `jax.checkpoint` with `policy` (a name of `POLICIES`).

    Enter it around the code that *traces* the forward (inside the jitted function, or around the
    `jax.jit(...)` call's first run); a jitted function traced outside it is unaffected. `prevent_cse`
    as in `jax.checkpoint` (False is safe, and cheaper, under `lax.scan`).
    """
    resolved = resolve_policy(policy)

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.method_name != "__call__" or _depth.value or not is_layer_name(context.module.name):
            return next_fun(*args, **kwargs)
        return checkpointed_call(context.module, args, kwargs, resolved, prevent_cse)

    with nn.intercept_methods(interceptor):
        yield
