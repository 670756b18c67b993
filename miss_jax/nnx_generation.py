"""`MissNnxModel.generate`: greedy or sampled decoding with the active adapters, over any NNX causal LM.

The model is called on the whole sequence at each step (no KV cache: simple, exact, and right for short
outputs and tests; for long generation use tunix's `Sampler` on `peft_model.base_model`, which applies the
unmerged adapters too). Two calling conventions are understood (`causal_logits`): tunix's LLMs,
`model(tokens, positions, cache, attention_mask) -> (logits, cache)`, and any model `model(ids) -> logits`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """What `generate` returns, as transformers' Flax `generate` names it: `sequences` `(batch, prompt +
    new tokens)` int32, prompt included; rows that ended with `eos_token_id` are filled with `pad_token_id`."""

    sequences: jax.Array


def causal_logits(model: Any, ids: jax.Array) -> jax.Array:
    """`model`'s logits `(batch, seq, vocab)` on token ids `(batch, seq)`: tunix's convention (positions, no
    cache, causal mask) when its `__call__` takes `positions`, else `model(ids)` (a tuple's first entry)."""
    if "positions" in inspect.signature(model.__call__).parameters:
        b, t = ids.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        out = model(ids, positions, None, mask)
    else:
        out = model(ids)
    return out[0] if isinstance(out, tuple) else out


def next_token(logits: jax.Array, do_sample: bool, temperature: float, top_k: Optional[int],
               key: jax.Array) -> jax.Array:
    """`(batch,)` next tokens from the last position's logits `(batch, vocab)`: argmax, or a sample at
    `temperature` among the `top_k` most likely tokens (all when None)."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def generate(
    peft_model: Any,
    input_ids: Any,
    attention_mask: Optional[Any] = None,
    *,
    max_new_tokens: Optional[int] = None,
    max_length: Optional[int] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    prng_key: Optional[jax.Array] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: int = 0,
) -> GenerateOutput:
    """Decodes from `input_ids` `(batch, prompt_len)` with the model's active adapters (merged or not).

    Args:
      max_new_tokens / max_length: how many tokens to add / the total length (one of them; transformers' names).
      do_sample, temperature, top_k, prng_key: sampling (default greedy; `prng_key` default `PRNGKey(0)`).
      eos_token_id, pad_token_id: a row that produced `eos_token_id` continues with `pad_token_id`.
      attention_mask: only an all-ones mask (or None): prompts are not padded here.

    Raises ValueError, changing nothing, for a length left unset or not positive, a padded prompt, or
    `temperature` not positive.
    """
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, prompt_len) token ids, got shape {tuple(ids.shape)}.")
    if attention_mask is not None and not bool(jnp.all(jnp.asarray(attention_mask) == 1)):
        raise ValueError("A padded prompt (attention_mask with zeros) is not supported by the NNX generate: "
                         "generate each prompt unpadded, or use tunix's Sampler on peft_model.base_model.")
    if (max_new_tokens is None) == (max_length is None):
        raise ValueError("Pass exactly one of max_new_tokens and max_length.")
    new = max_new_tokens if max_new_tokens is not None else max_length - ids.shape[1]
    if new <= 0:
        raise ValueError(f"Nothing to generate: {new} new tokens (max_length must exceed the prompt's length).")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}.")
    key = jax.random.PRNGKey(0) if prng_key is None else prng_key
    done = jnp.zeros((ids.shape[0],), bool)
    for _ in range(new):
        key, step = jax.random.split(key)
        token = next_token(causal_logits(peft_model.base_model, ids)[:, -1], do_sample, temperature, top_k, step)
        token = jnp.where(done, pad_token_id, token).astype(jnp.int32)
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        ids = jnp.concatenate([ids, token[:, None]], axis=1)
    return GenerateOutput(ids)
