"""Losses: `loss_fn(outputs, batch) -> scalar` for `miss_jax.train` (cross-entropy, classification, causal LM),
the loss of `labels=` as transformers computes it, and a causal-LM loss that never materialises the
float32 `(B, T, vocab)` logits for the backward pass.

>>> # step = train.make_train_step(peft_model, tx, losses.ChunkedCausalLMLoss(chunk_size=1024))
>>> # (by hand: with losses.lm_head_inputs(): outputs = forward(params, trainable, **inputs)
>>> #           loss = losses.chunked_causal_lm_loss(outputs, batch))   # = causal_lm_loss's value

Within `lm_head_inputs()`, the output projection of a transformers Flax causal LM (the `nn.Dense`
named `lm_head`: Llama, Mistral, Gemma, GPT-2, GPT-Neo, GPT-J, OPT, ...) does not run: it returns an
`LMHeadInputs` holding its input hidden states and its kernel (and bias), and the model passes that
on as `outputs.logits`. Tied embeddings are covered: those models call
`lm_head.apply({"params": {"kernel": embedding.T}}, hidden)`, so the captured kernel is the
transposed embedding and gradients reach it. `chunked_causal_lm_loss` then computes the
cross-entropy over `chunk_size` tokens at a time (a `lax.scan`), and, when differentiated, each block's
gradient with its logits (a `jax.custom_vjp`): the logits exist one `(chunk_size, vocab)` float32 block
at a time (with that block's softmax), and each is computed once.

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
import optax

LossFn = Callable[[Any, Mapping[str, jax.Array]], jax.Array]  # (model outputs, batch) -> scalar
IGNORE_INDEX = -100  # transformers' label for "no loss here"


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """Mean token/example cross-entropy: `logits` `(..., C)`, integer `labels` `(...)`, optional 0/1 `mask`."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    if mask is None:
        return losses.mean()
    mask = mask.astype(jnp.float32)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def classification_loss(outputs: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Cross-entropy of `outputs.logits` `(B, C)` against `batch["labels"]` `(B,)`."""
    return cross_entropy(outputs.logits, batch["labels"])


def causal_lm_loss(outputs: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Next-token cross-entropy: `outputs.logits` `(B, T, V)` predicts `batch["labels"]` (default
    `batch["input_ids"]`) shifted by one, masked by `batch["attention_mask"]` when present; label -100
    is ignored, as in transformers."""
    labels, mask = shifted_labels(batch)
    return cross_entropy(outputs.logits[:, :-1], jnp.where(mask, labels, 0), mask)


def labels_loss(model: Any, outputs: Any, labels: jax.Array) -> jax.Array:
    """The loss transformers' PyTorch twin of the Flax `model` computes for `labels=` (what `MissModel.__call__`
    returns as `outputs.loss`), from `outputs[0]` (the logits):

    * causal LMs (`*ForCausalLM`, `*LMHeadModel`): next-token cross-entropy, label -100 ignored
      (`causal_lm_loss` on `{"labels": labels}`; unlike a train batch, `attention_mask` does not mask it);
    * `*ForSequenceClassification` / `*ForImageClassification`: by `config.problem_type` as transformers
      picks it: regression (MSE, `num_labels == 1`), single-label (cross-entropy over integer `labels` `(B,)`,
      -100 ignored) or multi-label (BCE with logits over float `labels` `(B, C)`).

    Other heads raise ValueError naming the call that computes a loss of your choice.
    """
    name = type(model).__name__
    logits = outputs[0]
    labels = jnp.asarray(labels)
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return _causal_lm_labels_loss(logits, labels)
    if name.endswith(("ForSequenceClassification", "ForImageClassification")):
        config = model.config
        kind = config.problem_type or (
            "regression" if config.num_labels == 1
            else "single_label_classification" if jnp.issubdtype(labels.dtype, jnp.integer)
            else "multi_label_classification"
        )
        return _CLASSIFICATION_LOSSES[kind](logits, labels)
    raise ValueError(
        f"labels= computes the loss of causal LMs and sequence/image classifiers as transformers does; {name} is "
        "neither. Compute it from the outputs: `loss = my_loss(peft_model(**inputs), batch)`, or train with "
        "miss_jax.train.make_train_step(peft_model, tx, my_loss), where my_loss(outputs, batch) -> scalar."
    )


@jax.jit
def _causal_lm_labels_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return causal_lm_loss(LogitsOutput(logits), {"labels": labels})


@flax.struct.dataclass
class LogitsOutput:
    """A model output holding `logits` only (what the loss functions read)."""

    logits: jax.Array


_CLASSIFICATION_LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "regression": jax.jit(lambda logits, labels: jnp.mean(
        (jnp.squeeze(logits.astype(jnp.float32)) - jnp.squeeze(labels.astype(jnp.float32))) ** 2)),
    "single_label_classification": jax.jit(lambda logits, labels: cross_entropy(
        logits.reshape(-1, logits.shape[-1]), jnp.where(labels.reshape(-1) == IGNORE_INDEX, 0, labels.reshape(-1)),
        labels.reshape(-1) != IGNORE_INDEX)),
    "multi_label_classification": jax.jit(lambda logits, labels: optax.sigmoid_binary_cross_entropy(
        logits.astype(jnp.float32), labels.astype(jnp.float32)).mean()),
}


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


def check_chunk_size(chunk_size: Any) -> None:
    """ValueError unless `chunk_size` (rows per block of the chunked losses) is a positive int."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (rows per logits block), got {chunk_size!r}.")


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
      chunk_size: rows per block; the largest transients are two `(chunk_size, V)` float32 blocks.

    Returns `(loss_sum, count)`, float32 scalars. Logits are computed in float32
    (`preferred_element_type`), one block at a time. Differentiated (reverse mode), each block's
    gradient `(softmax - onehot) @ kernel^T` is computed with the block's logits in the forward pass and
    kept (`(N, H)` float32), so the logits are never computed twice (a checkpointed block would recompute
    them in the backward: a third `N x H x V` matmul); kernel and bias gradients are accumulated the same
    way, only when they are being differentiated.
    """
    check_chunk_size(chunk_size)
    n, h = hidden.shape
    n_chunks = -(-n // chunk_size)
    pad = n_chunks * chunk_size - n
    hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(n_chunks, chunk_size, h)
    labels = jnp.pad(jnp.where(mask, labels, 0), (0, pad)).reshape(n_chunks, chunk_size)
    mask = jnp.pad(mask, (0, pad)).reshape(n_chunks, chunk_size)
    return _cross_entropy_sum(hidden, kernel, bias, labels, mask), mask.sum().astype(jnp.float32)


def _block_logits(hidden: jax.Array, kernel: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    """float32 `(n, V)` logits of `hidden` `(n, H)`."""
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
    return logits if bias is None else logits + bias.astype(jnp.float32)


def _block_terms(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(summed loss, log-sum-exp (n,))` of one block's logits `(n, V)`."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(mask, lse - picked, 0.0)), lse


@jax.custom_vjp
def _cross_entropy_sum(hidden: jax.Array, kernel: jax.Array, bias: Optional[jax.Array], labels: jax.Array,
                       mask: jax.Array) -> jax.Array:
    """Summed masked cross-entropy of `hidden` `(C, n, H)` blocks (labels, mask `(C, n)`): the value only."""

    def block(total: jax.Array, xs: tuple) -> tuple[jax.Array, None]:
        h, y, m = xs
        return total + _block_terms(_block_logits(h, kernel, bias), y, m)[0], None

    return jax.lax.scan(block, jnp.zeros((), jnp.float32), (hidden, labels, mask))[0]


def _cross_entropy_sum_fwd(hidden: Any, kernel: Any, bias: Any, labels: Any, mask: Any) -> tuple[jax.Array, tuple]:
    """The value and, per differentiated input, its gradient (the residuals). The arguments are
    `CustomVJPPrimal`s (`symbolic_zeros=True`): `.perturbed` says which gradients are wanted."""
    h_all, k, y_all, m_all = hidden.value, kernel.value, labels.value, mask.value
    b = None if bias is None else bias.value
    want_b = bias is not None and bias.perturbed
    vocab = k.shape[1]

    def block(carry: tuple, xs: tuple) -> tuple[tuple, Optional[jax.Array]]:
        total, dk, db = carry
        h, y, m = xs
        logits = _block_logits(h, k, b)
        loss, lse = _block_terms(logits, y, m)
        probs = jnp.exp(logits - lse[:, None])
        d_logits = jnp.where(m[:, None], jnp.where(jnp.arange(vocab) == y[:, None], probs - 1.0, probs), 0.0)
        dh = jnp.dot(d_logits, k.T, preferred_element_type=jnp.float32) if hidden.perturbed else None
        if kernel.perturbed:
            dk = dk + jnp.dot(h.T, d_logits, preferred_element_type=jnp.float32)
        if want_b:
            db = db + d_logits.sum(0)
        return (total + loss, dk, db), dh

    zeros = (jnp.zeros(k.shape, jnp.float32) if kernel.perturbed else None,
             jnp.zeros(vocab, jnp.float32) if want_b else None)
    (total, dk, db), dh = jax.lax.scan(block, (jnp.zeros((), jnp.float32), *zeros), (h_all, y_all, m_all))
    cast = lambda grad, like: None if grad is None else grad.astype(like.dtype)  # noqa: E731
    return total, (cast(dh, h_all), cast(dk, k), cast(db, b))


def _cross_entropy_sum_bwd(res: tuple, g: jax.Array) -> tuple:
    """The kept gradients times the loss's cotangent `g`; none for labels and mask."""
    return *((None if grad is None else (g * grad).astype(grad.dtype)) for grad in res), None, None


_cross_entropy_sum.defvjp(_cross_entropy_sum_fwd, _cross_entropy_sum_bwd, symbolic_zeros=True)


def shifted_labels(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """`(labels, mask)`, both `(B, T-1)`: `batch["labels"]` (default `batch["input_ids"]`) shifted by one,
    masked where the label is negative (-100) or `batch["attention_mask"]` is 0."""
    labels = (batch["labels"] if "labels" in batch else batch["input_ids"])[:, 1:]
    mask = labels >= 0
    if "attention_mask" in batch:
        mask = mask & (batch["attention_mask"][:, 1:] > 0)
    return labels, mask


def chunked_causal_lm_loss(outputs: Any, batch: Mapping[str, jax.Array], chunk_size: int = 1024) -> jax.Array:
    """Next-token cross-entropy from `outputs.logits`, an `LMHeadInputs` (a forward traced inside
    `lm_head_inputs()`): equal to `causal_lm_loss` on the real logits, chunked over tokens.

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
                f"Use losses.causal_lm_loss, or adapt {name!r} with init_weights='bat' or modules_to_save=[{name!r}]."
            )


@dataclasses.dataclass(frozen=True)
class ChunkedCausalLMLoss:
    """`chunked_causal_lm_loss` as a loss for `miss_jax.train` (`make_train_step(..., loss_fn=this)`).

    It carries what the train step needs to know: `forward_context()` (the forward is traced inside
    `lm_head_inputs()`) and `check(plan)` (`check_plan`). Same value and gradients as
    `causal_lm_loss`; the logits exist one `(chunk_size, vocab)` float32 block at a time, each computed once.
    """

    chunk_size: int = 1024

    def __post_init__(self) -> None:
        check_chunk_size(self.chunk_size)

    def __call__(self, outputs: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        return chunked_causal_lm_loss(outputs, batch, self.chunk_size)

    def forward_context(self) -> contextlib.AbstractContextManager:
        return lm_head_inputs()

    def check(self, plan: Any) -> None:
        check_plan(plan)
