"""A causal-LM loss that never materialises the float32 `(B, T, vocab)` logits for the backward pass.

>>> # step = train.make_train_step(peft_model, tx, losses.ChunkedCausalLMLoss(chunk_size=1024))
>>> # (by hand: with losses.lm_head_inputs(): outputs = forward(params, trainable, **inputs)
>>> #           loss = losses.chunked_causal_lm_loss(outputs, batch))   # = train.causal_lm_loss's value

Within `lm_head_inputs()`, the output projection of a transformers Flax causal LM (the `nn.Dense`
named `lm_head`: Llama, Mistral, Gemma, GPT-2, GPT-Neo, GPT-J, OPT, ...) does not run: it returns an
`LMHeadInputs` holding its input hidden states and its kernel (and bias), and the model passes that
on as `outputs.logits`. Tied embeddings are covered: those models call
`lm_head.apply({"params": {"kernel": embedding.T}}, hidden)`, so the captured kernel is the
transposed embedding and gradients reach it. `chunked_causal_lm_loss` then computes the
cross-entropy over `chunk_size` tokens at a time in a `jax.checkpoint`ed `lax.map`: at most one
`(chunk_size, vocab)` float32 block exists, forward and backward.

MiSS adapters on the lm_head: `bat` adapters, `modules_to_save` copies and trained biases change the
params the model runs with, so the captured kernel includes them; balance/mini adapters add a term in
the lm_head's own call, which `lm_head_inputs` skips: `check_plan` rejects that case.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class LMHeadInputs:
    """What the lm_head would have multiplied: `hidden` `(B, T, H)`, `kernel` `(H, V)`, `bias` `(V,)` or None."""

    hidden: jax.Array
    kernel: jax.Array
    bias: Optional[jax.Array] = None


@contextlib.contextmanager
def lm_head_inputs(name: str = "lm_head") -> Iterator[None]:
    """Within this context, every traced call of an `nn.Dense` named `name` returns `LMHeadInputs`
    instead of its output. Enter it around the code that traces the forward."""

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__" or module.name != name or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        params = module.variables["params"]
        return LMHeadInputs(args[0], params["kernel"], params.get("bias"))

    with nn.intercept_methods(interceptor):
        yield


def chunked_cross_entropy(
    hidden: jax.Array,
    kernel: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    bias: Optional[jax.Array] = None,
    chunk_size: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy of the logits `hidden @ kernel + bias` against `labels`, over rows where `mask`.

    Args:
      hidden: `(N, H)`; kernel: `(H, V)`; bias: `(V,)` or None.
      labels: `(N,)` integers in `[0, V)` where `mask` (ignored elsewhere); mask: `(N,)` bool.
      chunk_size: rows per block; the largest transient is `(chunk_size, V)` float32.

    Returns `(loss_sum, count)`, float32 scalars. Logits are computed in float32
    (`preferred_element_type`); each block is rematerialised in the backward pass.
    """
    n, h = hidden.shape
    n_chunks = -(-n // chunk_size)
    pad = n_chunks * chunk_size - n
    hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(n_chunks, chunk_size, h)
    labels = jnp.pad(jnp.where(mask, labels, 0), (0, pad)).reshape(n_chunks, chunk_size)
    mask = jnp.pad(mask, (0, pad)).reshape(n_chunks, chunk_size)

    def one_chunk(h_chunk: jax.Array, y: jax.Array, m: jax.Array) -> jax.Array:
        logits = jnp.dot(h_chunk, kernel, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(m, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0))

    sums = jax.lax.map(lambda xs: jax.checkpoint(one_chunk, prevent_cse=False)(*xs), (hidden, labels, mask))
    return sums.sum(), mask.sum().astype(jnp.float32)


def shifted_labels(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """`(labels, mask)`, both `(B, T-1)`: `batch["labels"]` (default `batch["input_ids"]`) shifted by one,
    masked where the label is negative (-100) or `batch["attention_mask"]` is 0 (as `train.causal_lm_loss`)."""
    labels = (batch["labels"] if "labels" in batch else batch["input_ids"])[:, 1:]
    mask = labels >= 0
    if "attention_mask" in batch:
        mask = mask & (batch["attention_mask"][:, 1:] > 0)
    return labels, mask


def chunked_causal_lm_loss(outputs: Any, batch: Mapping[str, jax.Array], chunk_size: int = 1024) -> jax.Array:
    """Next-token cross-entropy from `outputs.logits`, an `LMHeadInputs` (a forward traced inside
    `lm_head_inputs()`): equal to `train.causal_lm_loss` on the real logits, chunked over tokens.

    The hidden state at position `t` predicts the label at `t + 1`; the mean is over unmasked tokens.
    """
    head = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    if not isinstance(head, LMHeadInputs):
        raise ValueError(
            "chunked_causal_lm_loss needs the lm_head's inputs: trace the forward inside "
            f"`miss_jax.losses.lm_head_inputs()` (outputs.logits is a {type(head).__name__})."
        )
    labels, mask = shifted_labels(batch)
    hidden = head.hidden[:, :-1]
    total, count = chunked_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.kernel, labels.reshape(-1), mask.reshape(-1), head.bias, chunk_size
    )
    return total / jnp.maximum(count, 1.0)


def check_plan(plan: Any, name: str = "lm_head") -> None:
    """Raises ValueError when an applied additive (balance/mini) adapter of `plan` (a
    `miss_jax.adapters.Plan`) targets the module named `name`: its term is added in the lm_head's call,
    which `lm_head_inputs` skips."""
    for adapter in plan.active:
        spec = plan.spec(adapter)
        if not spec.variant.additive:
            continue
        hit = [layer.key for layer in spec.layers if layer.path and layer.path[-1] == name]
        if hit:
            raise ValueError(
                f"Adapter {adapter!r} ({spec.variant.name}) adapts {hit}, whose call the chunked causal-LM loss "
                "skips. "
                f"Use train.causal_lm_loss, or adapt {name!r} with init_weights='bat' or modules_to_save=[{name!r}]."
            )


@dataclasses.dataclass(frozen=True)
class ChunkedCausalLMLoss:
    """`chunked_causal_lm_loss` as a loss for `miss_jax.train` (`make_train_step(..., loss_fn=this)`).

    It carries what the train step needs to know: `forward_context()` (the forward is traced inside
    `lm_head_inputs()`) and `check(plan)` (`check_plan`). Same value and gradients as
    `train.causal_lm_loss`; at most one `(chunk_size, vocab)` float32 block of logits exists at a time.
    """

    chunk_size: int = 1024

    def __call__(self, outputs: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        return chunked_causal_lm_loss(outputs, batch, self.chunk_size)

    def forward_context(self) -> contextlib.AbstractContextManager:
        return lm_head_inputs()

    def check(self, plan: Any) -> None:
        check_plan(plan)
