"""Memory-efficient self-attention for transformers' Flax decoders, without editing their code.

transformers' Flax attention builds the full `(B, heads, T, T)` float32 weights, and the backward pass
keeps them (one such buffer, or several, per layer). Within `memory_efficient_attention(block_size)`,
a `flax.linen.intercept_methods` interceptor recomputes the attention of the supported modules with
the module's own submodules (projections, rotary embedding, dropout), so MiSS's interceptor on
`q_proj`/`k_proj`/`c_attn`/... still applies, and replaces the weights by `blockwise_attention`: a
`lax.map` over query blocks whose body is `jax.checkpoint`ed, so at most one `(B, heads, block, T)`
block exists at a time, forward and backward, and nothing of size `T x T` is kept for the backward.

Covered modules (transformers class name -> family):
  * `FlaxLlamaAttention`, `FlaxGemmaAttention`: causal, RoPE, grouped-query attention.
  * `FlaxMistralAttention`: as Llama, with transformers' sliding window (a query sees the keys at most
    `config.sliding_window` positions back; `sliding_window=None` gives transformers' own diagonal-only
    mask, reproduced as is).
  * `FlaxGPT2Attention` (causal self-attention), `FlaxGPTNeoSelfAttention` (global, and local with a
    window of `config.window_size` keys), `FlaxGPTJAttention` (partial rotary), `FlaxOPTAttention`.

Masks equal transformers': the 2-D `attention_mask` `(B, S)` masks keys, the causal/window mask masks
by sequence index, and masked scores get `finfo(float32).min` added, so a query whose keys are all
masked (left padding) averages all values, as in transformers. The softmax runs in float32 (as
transformers' Llama/Mistral/Gemma; GPT-2/GPT-Neo/GPT-J/OPT in a bfloat16 model run it in bfloat16).
Attention dropout is applied with transformers' rate and rng stream, broadcast over batch and heads
as Flax does; its masks are drawn per query block, so they differ from the plain path's (same
distribution).

The original `__call__` runs instead (documented fallback) for: any other attention module (BERT,
RoBERTa, T5, BART, ViT: encoders and cross-attention, where the plain path is kept), cross-attention
or non-causal uses of the modules above, a KV cache (`init_cache=True` or a `cache` collection:
generation), `output_attentions=True` (the weights are asked for), a non-2-D `attention_mask`, and
Mistral with attention dropout in training (transformers passes it no dropout rng).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def blockwise_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    key_mask: Optional[jax.Array] = None,
    *,
    causal: bool = True,
    window: Optional[int] = None,
    block_size: int = 512,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[jax.Array] = None,
) -> jax.Array:
    """Scaled dot-product attention computed one block of `block_size` queries at a time.

    Args:
      query: `(B, T, Hq, D)`; key, value: `(B, S, Hkv, D)` with `Hq % Hkv == 0` (query head `h` uses
        key/value head `h // (Hq // Hkv)`, as `jnp.repeat` in transformers). Query `i` and key `j` are
        sequence indices `0..T-1` and `0..S-1`.
      key_mask: `(B, S)`, nonzero where a key may be attended to (None: all).
      causal: query `i` sees keys `j <= i`.
      window: also `i - j <= window` (None: no window).
      block_size: queries per block; the largest transient is `(B, Hq, block_size, S)` float32.
      dropout_rate, dropout_rng: attention dropout on the weights (broadcast over batch and heads).

    Returns `(B, T, Hq, D)` in `value`'s dtype. Scores are `query / sqrt(D) @ key^T` in float32 plus
    `finfo(float32).min` where masked, then softmax, as `flax.linen.dot_product_attention_weights`.
    The block body is rematerialised: the backward pass recomputes each block's weights.
    """
    b, t, hq, d = query.shape
    s, hkv = key.shape[1], key.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} key/value heads evenly.")
    groups = hq // hkv
    n_blocks = -(-t // block_size)
    query = query / jnp.sqrt(d).astype(query.dtype)
    query = jnp.pad(query, ((0, 0), (0, n_blocks * block_size - t), (0, 0), (0, 0)))
    # (n_blocks, B, block, Hkv, groups, D)
    blocks = query.reshape(b, n_blocks, block_size, hkv, groups, d).swapaxes(0, 1)
    keys_allowed = jnp.ones((b, s), bool) if key_mask is None else key_mask != 0
    big_neg = jnp.finfo(jnp.float32).min
    keep_prob = 1.0 - dropout_rate

    def one_block(q_block: jax.Array, index: jax.Array) -> jax.Array:
        rows = index * block_size + jnp.arange(block_size)[:, None]  # (block, 1) query indices
        cols = jnp.arange(s)[None, :]  # (1, S) key indices
        allowed = jnp.ones((block_size, s), bool)
        if causal:
            allowed &= cols <= rows
        if window is not None:
            allowed &= rows - cols <= window
        allowed = allowed[None, None, None] & keys_allowed[:, None, None, None, :]  # (B, 1, 1, block, S)
        scores = jnp.einsum("bqhgd,bkhd->bhgqk", q_block, key, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(scores + jnp.where(allowed, 0.0, big_neg), axis=-1)
        if dropout_rate > 0.0:
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, index), keep_prob, (block_size, s))
            weights = weights * (keep.astype(weights.dtype) / keep_prob)
        return jnp.einsum("bhgqk,bkhd->bqhgd", weights.astype(value.dtype), value)

    out = jax.lax.map(lambda xs: jax.checkpoint(one_block, prevent_cse=False)(*xs), (blocks, jnp.arange(n_blocks)))
    return out.swapaxes(0, 1).reshape(b, n_blocks * block_size, hq, d)[:, :t]


# --------------------------------------------------------------------------- families


def _heads(x: jax.Array, n: int) -> jax.Array:
    """`(B, T, n * D)` -> `(B, T, n, D)`."""
    return x.reshape(*x.shape[:2], n, -1)


def _merge(x: jax.Array) -> jax.Array:
    """`(B, T, H, D)` -> `(B, T, H * D)`."""
    return x.reshape(*x.shape[:2], -1)


def _dropout_rng(module: nn.Module, rate: float, deterministic: bool) -> Optional[jax.Array]:
    return module.make_rng("dropout") if rate > 0.0 and not deterministic else None


def _attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array], rate: float, rng: Optional[jax.Array],
    block_size: int, window: Optional[int] = None,
) -> jax.Array:
    """`blockwise_attention` with dropout at `rate` when `rng` is given (training), none otherwise."""
    return blockwise_attention(
        q, k, v, mask, window=window, block_size=block_size, dropout_rate=rate if rng is not None else 0.0,
        dropout_rng=rng,
    )


def _rope_attention(module: nn.Module, a: dict, block_size: int) -> Optional[tuple]:
    """Llama, Mistral, Gemma: `q/k/v/o_proj`, `rotary_emb(key, query, position_ids)`, GQA."""
    mistral = type(module).__name__ == "FlaxMistralAttention"
    rate, det = module.config.attention_dropout, a["deterministic"]
    if mistral and rate > 0.0 and not det:
        return None
    h = a["hidden_states"]
    q = _heads(module.q_proj(h), module.num_heads)
    k = _heads(module.k_proj(h), module.num_key_value_heads)
    v = _heads(module.v_proj(h), module.num_key_value_heads)
    k, q = module.rotary_emb(k, q, a["position_ids"])
    rng = None if mistral else _dropout_rng(module, rate, det)
    window = (module.config.sliding_window or 0) if mistral else None
    out = _attend(q, k, v, a["attention_mask"], rate, rng, block_size, window)
    return (module.o_proj(_merge(out)),)


def _gpt2_attention(module: nn.Module, a: dict, block_size: int) -> Optional[tuple]:
    """GPT-2 causal self-attention: fused `c_attn`, `c_proj`, residual dropout."""
    if a["key_value_states"] is not None or not module.causal:
        return None
    det = a["deterministic"]
    q, k, v = (_heads(x, module.num_heads) for x in jnp.split(module.c_attn(a["hidden_states"]), 3, axis=2))
    rate = module.config.attn_pdrop
    out = _attend(q, k, v, a["attention_mask"], rate, _dropout_rng(module, rate, det), block_size)
    return (module.resid_dropout(module.c_proj(_merge(out)), deterministic=det),)


def _gpt_neo_attention(module: nn.Module, a: dict, block_size: int) -> Optional[tuple]:
    """GPT-Neo: unscaled scores (query pre-multiplied by sqrt(D)), local layers see `window_size` keys."""
    h, det = a["hidden_states"], a["deterministic"]
    q = _heads(module.q_proj(h) * jnp.sqrt(module.head_dim).astype(module.dtype), module.num_heads)
    k, v = _heads(module.k_proj(h), module.num_heads), _heads(module.v_proj(h), module.num_heads)
    window = module.config.window_size - 1 if module.attention_type == "local" else None
    rate = module.config.attention_dropout
    out = _attend(q, k, v, a["attention_mask"], rate, _dropout_rng(module, rate, det), block_size, window)
    return (module.resid_dropout(module.out_proj(_merge(out)), deterministic=det),)


def _gptj_attention(module: nn.Module, a: dict, block_size: int) -> Optional[tuple]:
    """GPT-J: rotary embedding on the first `rotary_dim` features (all when None)."""
    h, det = a["hidden_states"], a["deterministic"]
    q, k, v = (_heads(p(h), module.num_heads) for p in (module.q_proj, module.k_proj, module.v_proj))
    sincos = jnp.split(jnp.take(module.embed_positions, a["position_ids"], axis=0), 2, axis=-1)
    r = module.rotary_dim or q.shape[-1]
    # only reached for a transformers GPT-J module, so transformers' Flax code is there
    from transformers.models.gptj.modeling_flax_gptj import apply_rotary_pos_emb as gptj_rotary

    q = jnp.concatenate([gptj_rotary(q[..., :r], sincos), q[..., r:]], axis=-1)
    k = jnp.concatenate([gptj_rotary(k[..., :r], sincos), k[..., r:]], axis=-1)
    rate = module.config.attn_pdrop
    out = _attend(q, k, v, a["attention_mask"], rate, _dropout_rng(module, rate, det), block_size)
    return (module.resid_dropout(module.out_proj(_merge(out)), deterministic=det),)


def _opt_attention(module: nn.Module, a: dict, block_size: int) -> Optional[tuple]:
    """OPT causal self-attention; returns `(output, None)` (the layer drops the weights unless
    `output_attentions`, which falls back to the original)."""
    if a["key_value_states"] is not None or not module.causal:
        return None
    h, det = a["hidden_states"], a["deterministic"]
    q, k, v = (_heads(p(h), module.num_heads) for p in (module.q_proj, module.k_proj, module.v_proj))
    out = _attend(q, k, v, a["attention_mask"], module.dropout, _dropout_rng(module, module.dropout, det), block_size)
    return module.out_proj(_merge(out)), None


# transformers attention class name -> efficient implementation (None from it: use the original call)
FAMILIES: dict[str, Callable[[nn.Module, dict, int], Optional[tuple]]] = {
    "FlaxLlamaAttention": _rope_attention,
    "FlaxMistralAttention": _rope_attention,
    "FlaxGemmaAttention": _rope_attention,
    "FlaxGPT2Attention": _gpt2_attention,
    "FlaxGPTNeoSelfAttention": _gpt_neo_attention,
    "FlaxGPTJAttention": _gptj_attention,
    "FlaxOPTAttention": _opt_attention,
}


@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.__call__)


def _bound(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    bound = _signature(type(module)).bind(module, *args, **kwargs)
    bound.apply_defaults()
    return dict(list(bound.arguments.items())[1:])


class _Plain(threading.local):
    """Depth of calls made with `output_attentions=True` (their attention must give real weights)."""

    value: int = 0


_plain = _Plain()


@contextlib.contextmanager
def memory_efficient_attention(block_size: int = 512) -> Iterator[None]:
    """Within this context, the self-attention of the modules in `FAMILIES` traced in a Linen call runs
    `blockwise_attention` with `block_size` queries per block (see the module docstring for the
    fallbacks). Enter it around the code that traces the forward, as `remat.checkpointing`.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}.")

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if kwargs.get("output_attentions") is True:  # e.g. OPT's layers, whose attention always returns weights
            _plain.value += 1
            try:
                return next_fun(*args, **kwargs)
            finally:
                _plain.value -= 1
        efficient = FAMILIES.get(type(context.module).__name__)
        if efficient is None or _plain.value:
            return next_fun(*args, **kwargs)
        module = context.module
        a = _bound(module, args, kwargs)
        mask = a.get("attention_mask")
        if (
            a.get("output_attentions") or a.get("init_cache") or module.has_variable("cache", "cached_key")
            or (mask is not None and mask.ndim != 2)
        ):
            return next_fun(*args, **kwargs)
        out = efficient(module, a, block_size)
        return next_fun(*args, **kwargs) if out is None else out

    with nn.intercept_methods(interceptor):
        yield
