"""Efficient self-attention for transformers' Flax decoders, without editing their code.

transformers' Flax attention builds the full `(B, heads, T, T)` float32 weights, and the backward pass
keeps them (one such buffer, or several, per layer). Within `efficient_attention(kernel)`, a
`flax.linen.intercept_methods` interceptor recomputes the attention of the supported modules with the
module's own submodules (projections, rotary embedding, dropout), so MiSS's interceptor on
`q_proj`/`k_proj`/`c_attn`/... still applies, and replaces the weights by one of three kernels
(frozen dataclasses, part of a compiled program's key):

  * `Blockwise(block_size)`: `blockwise_attention`, a flash-style formulation written for XLA:CPU: queries
    in blocks of `block_size`, each block against only the keys it can see (causal: up to the block's end,
    so about half of the `T x T` scores are computed; a sliding window also cuts the start), those keys
    `KEY_CHUNK` at a time with an online softmax (each step's tiles stay in cache), the softmax's
    log-sum-exp kept per query, and a `jax.custom_vjp` whose backward recomputes each block's weights from
    it, transposed (keys by queries, so that its products over the queries are row-major matmuls). Nothing
    of size `T x T` exists at any time, and the blocks run one after the other (each depends on the
    previous one's result: XLA:CPU drops optimisation barriers and would otherwise start every block's
    scores at once). On a 2-vCPU AMD EPYC, one Llama layer's attention at 2 x 2048 (8 heads of 64) takes
    0.26 s forward and backward instead of transformers' 0.82 s (`benchmarks/attention.py`; PyTorch's
    fused CPU kernel: 0.24 s).
  * `Sdpa(implementation)`: `fused_attention`, i.e. `jax.nn.dot_product_attention`, the attention of the
    library that owns it: cuDNN's flash attention on a GPU (bfloat16/float16), XLA's elsewhere. It has no
    attention dropout: a training call of a model with a dropout rate runs the module's own attention.
  * `Flash(block_size)`: the platform's attention for long sequences: on a GPU `Sdpa` (cuDNN's flash
    attention where it fits, `cudnn_fits`; XLA's for float32), elsewhere `Blockwise(block_size)`.

Covered modules (transformers class name -> family):
  * `FlaxLlamaAttention`, `FlaxGemmaAttention`: causal, RoPE, grouped-query attention.
  * `FlaxMistralAttention`: as Llama, with transformers' sliding window (a query sees the keys at most
    `config.sliding_window` positions back; `sliding_window=None` gives transformers' own diagonal-only
    mask, reproduced as is).
  * `FlaxGPT2Attention` (causal self-attention), `FlaxGPTNeoSelfAttention` (global, and local with a
    window of `config.window_size` keys), `FlaxGPTJAttention` (partial rotary), `FlaxOPTAttention`.

Masks equal transformers': the 2-D `attention_mask` `(B, S)` masks keys, the causal/window mask masks
by sequence index, and masked scores get `finfo(float32).min` added, so a query whose keys are all
masked (left padding) averages all values, as in transformers (undropped; cuDNN's output there is
another average, never read by a real token, and "sdpa" passes no gradient through such a query's
masked scores, as PyTorch's sdpa). The softmax runs in float32 (as
transformers' Llama/Mistral/Gemma; GPT-2/GPT-Neo/GPT-J/OPT in a bfloat16 model run it in bfloat16).
Attention dropout is applied with transformers' rate and rng stream, broadcast over batch and heads
as Flax does; its masks are drawn per query block, so they differ from the plain path's (same
distribution).

The original `__call__` runs instead (documented fallback) for: any other attention module (BERT,
RoBERTa, T5, BART, ViT: encoders and cross-attention, where the plain path is kept), cross-attention
or non-causal uses of the modules above, a KV cache (`init_cache=True` or a `cache` collection:
generation), `output_attentions=True` (the weights are asked for), a non-2-D `attention_mask`,
Mistral with attention dropout in training (transformers passes it no dropout rng), and `Sdpa` in a
training call of a model with attention dropout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


NEG = float(jnp.finfo(jnp.float32).min)  # added to masked scores, as transformers


def _key_range(start: int, block: int, s: int, causal: bool, window: Optional[int]) -> tuple[int, int]:
    """The keys `[lo, hi)` that queries `start .. start+block-1` may see (the rest are masked anyway)."""
    hi = min(start + block, s) if causal else s
    lo = min(max(0, start - window), s - 1) if window is not None else 0  # past the keys: all masked
    return lo, max(hi, lo + 1)


KEY_CHUNK = 512  # keys per step within a query block: one step's (block, keys) float32 tiles stay in cache


def _key_chunks(lo: int, hi: int) -> list[tuple[int, int]]:
    """`[lo, hi)` in spans of at most `KEY_CHUNK` keys."""
    return [(c, min(c + KEY_CHUNK, hi)) for c in range(lo, hi, KEY_CHUNK)]


def _allowed(start: int, block: int, lo: int, keys: int, causal: bool, window: Optional[int]) -> jax.Array:
    """Bool `(block, keys)`: query `start + i` may see key `lo + j` by position (causal, window)."""
    rows = start + jnp.arange(block)[:, None]
    cols = lo + jnp.arange(keys)[None, :]
    allowed = jnp.ones((block, keys), bool)
    if causal:
        allowed &= cols <= rows
    if window is not None:
        allowed &= rows - cols <= window
    return allowed


def _block_scores(q: jax.Array, k: jax.Array, key_ok: jax.Array, start: int, lo: int, causal: bool,
                  window: Optional[int]) -> jax.Array:
    """Masked float32 scores `(B, Hkv, G, block, hi-lo)` of query block `q` `(B, Hkv, G, block, D)` against
    keys `k` `(B, Hkv, hi-lo, D)` (sequence indices from `lo`); `key_ok` `(B, hi-lo)` bool."""
    allowed = _allowed(start, q.shape[3], lo, k.shape[2], causal, window)
    allowed = allowed[None, None, None] & key_ok[:, None, None, None, :]
    return jnp.where(allowed, _matmul(q, k, "bhqd,bhkd->bhqk"), NEG)  # = scores + NEG where masked, in float32


def _block_scores_t(q: jax.Array, k: jax.Array, key_ok: jax.Array, start: int, lo: int, causal: bool,
                    window: Optional[int]) -> jax.Array:
    """`_block_scores` transposed: float32 `(B, Hkv, hi-lo, G * block)` (keys by (group, query)) of `q`
    `(B, Hkv, G, block, D)` against `k` `(B, Hkv, hi-lo, D)`. The backward works in this orientation: its
    two products over the block's queries (`dV`, `dK`) are then plain row-major matmuls (XLA:CPU runs
    a product that contracts the leading axis of both operands 2-3x slower)."""
    b, h, g, block, d = q.shape
    allowed = jnp.tile(_allowed(start, block, lo, k.shape[2], causal, window).T, (1, g))
    allowed = allowed[None, None] & key_ok[:, None, :, None]
    scores = jnp.einsum("bhkd,bhqd->bhkq", k, q.reshape(b, h, g * block, d), preferred_element_type=jnp.float32)
    return jnp.where(allowed, scores, NEG)


def _matmul(x: jax.Array, y: jax.Array, spec: str) -> jax.Array:
    """A float32 `einsum(spec)` of a block tensor `x` `(B, Hkv, G, block, n)` with `y` `(B, Hkv, m, p)`, the
    group and query axes folded into one (one batched matmul per key/value head). Returns `(B, Hkv, G,
    block, out)`."""
    b, h, g, q = x.shape[:4]
    out = jnp.einsum(spec, x.reshape(b, h, g * q, -1), y, preferred_element_type=jnp.float32)
    return out.reshape(b, h, g, q, -1)


def _after(x: jax.Array, previous: Optional[jax.Array]) -> jax.Array:
    """`x`, made to depend on one element of `previous` (the previous block's result), so that XLA runs the
    blocks one after the other and reuses their buffers (XLA:CPU drops optimisation barriers and otherwise
    schedules every block's `(B, H, block, keys)` scores at once)."""
    if previous is None:
        return x
    first = previous.ravel()[0]
    return x + (jnp.where(jnp.isfinite(first), first, 0) * 0).astype(x.dtype)


def _dropout(rng: Optional[jax.Array], rate: float, index: int, shape: tuple[int, int]) -> Optional[jax.Array]:
    """Block `index`'s dropout multiplier `(block, keys)` (kept / keep_prob), or None without dropout."""
    if rng is None or rate == 0.0:
        return None
    keep = jax.random.bernoulli(jax.random.fold_in(rng, index), 1.0 - rate, shape)
    return keep.astype(jnp.float32) / (1.0 - rate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _flash(q: jax.Array, k: jax.Array, v: jax.Array, key_ok: jax.Array, rng: Optional[jax.Array], causal: bool,
           window: Optional[int], block: int, rate: float, out_dtype: Any) -> jax.Array:
    return _flash_forward(q, k, v, key_ok, rng, causal, window, block, rate, out_dtype)[0]


def _flash_forward(q, k, v, key_ok, rng, causal, window, block, rate, out_dtype):
    """Forward over query blocks: `q` `(B, Hkv, G, T, D)` (scaled), `k`/`v` `(B, Hkv, S, D)`. Keeps the output
    and the softmax's log-sum-exp `(B, Hkv, G, T, 1)` for the backward, nothing of size `T x S`.

    A query with no visible key (left padding) gets, as in transformers, equal weights on all `S` keys: the
    mean of `v` (without dropout); its log-sum-exp is recorded as `+inf`, which the backward reads."""
    t, s = q.shape[3], k.shape[2]
    v_mean = v.astype(jnp.float32).mean(2, keepdims=True)[:, :, None]  # (B, Hkv, 1, 1, D)
    outs, lses, previous = [], [], None
    for i, start in enumerate(range(0, t, block)):
        lo, hi = _key_range(start, block, s, causal, window)
        drop = _dropout(rng, rate, i, (min(block, t - start), hi - lo))
        q_block = q[:, :, :, start:start + block]
        # online softmax over key chunks: running max m, sum total and output acc
        m = jnp.full(q_block.shape[:4] + (1,), NEG, jnp.float32)
        total = jnp.zeros_like(m)
        acc = jnp.zeros(q_block.shape, jnp.float32)
        for c0, c1 in _key_chunks(lo, hi):
            qb = _after(q_block, previous)
            scores = _block_scores(qb, k[:, :, c0:c1], key_ok[:, c0:c1], start, c0, causal, window)
            m_new = jnp.maximum(m, scores.max(-1, keepdims=True))
            p, scale = jnp.exp(scores - m_new), jnp.exp(m - m_new)
            total = total * scale + p.sum(-1, keepdims=True)
            if drop is not None:
                p = p * drop[:, c0 - lo:c1 - lo]
            acc = acc * scale + _matmul(p.astype(v.dtype), v[:, :, c0:c1], "bhqk,bhkd->bhqd")
            m, previous = m_new, acc
        dead = m <= NEG / 2  # every visible key masked
        outs.append(jnp.where(dead, v_mean, acc / total).astype(out_dtype))
        lses.append(jnp.where(dead, jnp.inf, m + jnp.log(total)))
    out = jnp.concatenate(outs, 3)
    return out, (q, k, v, key_ok, rng, out, jnp.concatenate(lses, 3))


def _flash_backward(causal, window, block, rate, out_dtype, res, d_out):
    """Recomputes each block's weights from the log-sum-exp: `P = exp(scores - lse)`, and accumulates
    `dV = P'^T dO`, `dS = P * (dO V^T * drop - rowsum(dO * O))`, `dQ = dS K`, `dK = dS^T Q` (`P'`: dropped).

    Queries with no visible key (`lse = +inf`, so `P = 0` in the blocks) had weights `1/S` on every key;
    their terms are closed-form `(D, D)` products: with `V0 = V - mean(V)`, `dV += sum(dO) / S`,
    `dQ = dO (K^T V0 / S)^T`, `dK = V0 (Q^T dO)^T / S` (sums over those queries)."""
    # the barrier keeps XLA from computing the recomputed scores with (or instead of) the forward's
    q, k, v, key_ok, out, lse, d_out = jax.lax.optimization_barrier(res[:4] + res[5:] + (d_out,))
    rng = res[4]
    t, s = q.shape[3], k.shape[2]
    d_out = d_out.astype(jnp.float32)
    delta = (d_out * out.astype(jnp.float32)).sum(-1, keepdims=True)
    dead = jnp.isinf(lse)  # (B, Hkv, G, T, 1)
    d_dead = jnp.where(dead, d_out, 0.0)
    v0 = v.astype(jnp.float32) - v.astype(jnp.float32).mean(2, keepdims=True)  # (B, Hkv, S, D)
    kv = jnp.einsum("bhsi,bhsj->bhij", k.astype(jnp.float32), v0) / s
    qd = jnp.einsum("bhgti,bhgtj->bhij", q.astype(jnp.float32), d_dead) / s
    dq_dead = jnp.einsum("bhij,bhgtj->bhgti", kv, d_dead)
    dk = jnp.einsum("bhsj,bhij->bhsi", v0, qd)
    dv = jnp.broadcast_to(d_dead.sum((2, 3))[:, :, None] / s, v.shape)
    b, h, g = q.shape[:3]

    def fold(x: jax.Array) -> jax.Array:  # (B, Hkv, G, n, X) -> (B, Hkv, G * n, X)
        return x.reshape(b, h, g * x.shape[3], x.shape[4])

    dqs, previous = [], None
    for i, start in enumerate(range(0, t, block)):
        lo, hi = _key_range(start, block, s, causal, window)
        rows = slice(start, start + block)
        n = min(block, t - start)
        drop = _dropout(rng, rate, i, (n, hi - lo))
        lse_t, delta_t = (fold(x[:, :, :, rows]).swapaxes(2, 3) for x in (lse, delta))  # (B, Hkv, 1, G * n)
        dq = jnp.zeros((b, h, g * n, q.shape[4]), jnp.float32)
        for c0, c1 in _key_chunks(lo, hi):
            kb, vb = k[:, :, c0:c1], v[:, :, c0:c1]
            qb, dob = (_after(x[:, :, :, rows], previous) for x in (q, d_out))
            # (keys, group x query) orientation: dV and dK below are then plain matmuls
            p_t = jnp.exp(_block_scores_t(qb, kb, key_ok[:, c0:c1], start, c0, causal, window) - lse_t)
            drop_t = None if drop is None else jnp.tile(drop[:, c0 - lo:c1 - lo].T, (1, g))
            kept = p_t if drop_t is None else p_t * drop_t
            dv = dv.at[:, :, c0:c1].add(jnp.einsum("bhkq,bhqd->bhkd", kept, fold(dob)))
            dp_t = jnp.einsum("bhkd,bhqd->bhkq", vb, fold(dob), preferred_element_type=jnp.float32)
            ds_t = p_t * ((dp_t if drop_t is None else dp_t * drop_t) - delta_t)
            dk = dk.at[:, :, c0:c1].add(
                jnp.einsum("bhkq,bhqd->bhkd", ds_t, fold(qb), preferred_element_type=jnp.float32))
            dq = previous = dq + jnp.einsum("bhkq,bhkd->bhqd", ds_t, kb, preferred_element_type=jnp.float32)
        dqs.append(dq.reshape(b, h, g, n, -1))
    d_key_ok = np.zeros(key_ok.shape, jax.dtypes.float0)
    d_rng = None if rng is None else np.zeros(rng.shape, jax.dtypes.float0)
    return ((jnp.concatenate(dqs, 3) + dq_dead).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_key_ok, d_rng)


_flash.defvjp(_flash_forward, _flash_backward)


def check_block_size(block_size: Any) -> None:
    """ValueError unless `block_size` (queries per block) is a positive int."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")


def blockwise_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    key_mask: Optional[jax.Array] = None,
    *,
    causal: bool = True,
    window: Optional[int] = None,
    block_size: int = 256,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[jax.Array] = None,
) -> jax.Array:
    """Scaled dot-product attention computed one block of `block_size` queries at a time (flash style).

    Args:
      query: `(B, T, Hq, D)`; key, value: `(B, S, Hkv, D)` with `Hq % Hkv == 0` (query head `h` uses
        key/value head `h // (Hq // Hkv)`, as `jnp.repeat` in transformers). Query `i` and key `j` are
        sequence indices `0..T-1` and `0..S-1`.
      key_mask: `(B, S)`, nonzero where a key may be attended to (None: all).
      causal: query `i` sees keys `j <= i`.
      window: also `i - j <= window` (None: no window).
      block_size: queries per block. A block is scored against the keys its queries can see (causal: up
        to the block's end; window: from `window` keys before its start), so a causal model computes
        about half of the `T x S` scores, `KEY_CHUNK` (512) keys at a time with an online softmax: the
        largest transient is `(B, Hq, block_size, 512)` float32.
      dropout_rate, dropout_rng: attention dropout on the weights (broadcast over batch and heads).

    Returns `(B, T, Hq, D)` in `value`'s dtype. Scores are `query / sqrt(D) @ key^T` in float32 plus
    `finfo(float32).min` where masked, then softmax, as `flax.linen.dot_product_attention_weights`. The
    backward pass (a `jax.custom_vjp`) recomputes each block's weights from the saved log-sum-exp, so
    nothing of size `T x S` is kept between the forward and the backward.
    """
    b, t, hq, d = query.shape
    s, hkv = key.shape[1], key.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} key/value heads evenly.")
    check_block_size(block_size)
    groups = hq // hkv
    query = query / jnp.sqrt(d).astype(query.dtype)
    q = query.reshape(b, t, hkv, groups, d).transpose(0, 2, 3, 1, 4)  # (B, Hkv, G, T, D)
    k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # (B, Hkv, S, D)
    key_ok = jnp.ones((b, s), bool) if key_mask is None else key_mask != 0
    rng = dropout_rng if dropout_rate > 0.0 else None
    out = _flash(q, k, v, key_ok, rng, causal, window, block_size, float(dropout_rate), value.dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)


# --------------------------------------------------------------------------- families


def _heads(x: jax.Array, n: int) -> jax.Array:
    """`(B, T, n * D)` -> `(B, T, n, D)`."""
    return x.reshape(*x.shape[:2], n, -1)


def _merge(x: jax.Array) -> jax.Array:
    """`(B, T, H, D)` -> `(B, T, H * D)`."""
    return x.reshape(*x.shape[:2], -1)


def _dropout_rng(module: nn.Module, rate: float, deterministic: bool) -> Optional[jax.Array]:
    return module.make_rng("dropout") if rate > 0.0 and not deterministic else None


# --------------------------------------------------------------------------- kernels


def fused_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    key_mask: Optional[jax.Array] = None,
    *,
    causal: bool = True,
    window: Optional[int] = None,
    implementation: Optional[str] = None,
) -> jax.Array:
    """`jax.nn.dot_product_attention` with transformers' masks: the attention of the library that owns it
    (cuDNN's flash attention with `implementation="cudnn"`, XLA's with "xla").

    Args:
      query: `(B, T, Hq, D)`; key, value: `(B, S, Hkv, D)` with `Hq % Hkv == 0` (grouped-query attention as
        `blockwise_attention`).
      key_mask: `(B, S)`, nonzero where a key may be attended to (None: all).
      causal, window: query `i` sees keys `j <= i` and `i - j <= window`, as `blockwise_attention`.
      implementation: "xla", "cudnn" (bfloat16 / float16 inputs on a GPU), or None (cuDNN where it can
        run: `cudnn_fits`; else XLA).

    Returns `(B, T, Hq, D)` in `value`'s dtype. A batch whose keys are all valid runs without a mask (cuDNN
    then skips the masked half of the scores); otherwise the `(B, 1, T, S)` mask goes in (`lax.cond` picks
    at run time). A query that sees no key (left padding) averages all values with "xla" (as transformers'
    eager attention); cuDNN gives it another average of values (its output is unspecified, as in PyTorch's
    sdpa, and never read by a real token).
    """
    b, t = query.shape[:2]
    s = key.shape[1]
    impl = implementation or ("cudnn" if cudnn_fits(query) else "xla")
    local = None if window is None else (window, 0)

    def attend(mask: Optional[jax.Array]) -> jax.Array:
        return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=causal,
                                            local_window_size=local, implementation=impl)

    if key_mask is None:
        return attend(None)
    ok = key_mask != 0
    mask = jnp.broadcast_to(ok[:, None, None, :], (b, 1, t, s))
    return jax.lax.cond(jnp.all(ok), lambda: attend(None), lambda: attend(mask))


def cudnn_fits(query: jax.Array) -> bool:
    """Whether cuDNN's flash attention can run on `query` `(B, T, H, D)`: a GPU backend, bfloat16 or float16,
    a head size that is a multiple of 8 up to 128."""
    d = query.shape[-1]
    return (jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16)
            and d % 8 == 0 and d <= 128)


@dataclasses.dataclass(frozen=True)
class Blockwise:
    """`blockwise_attention`, `block_size` queries at a time (any platform; attention dropout included)."""

    block_size: int = 256
    name = "blockwise"
    has_dropout = True

    def __post_init__(self) -> None:
        check_block_size(self.block_size)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array], rate: float,
                 rng: Optional[jax.Array], window: Optional[int] = None) -> jax.Array:
        """`(B, T, Hq, D)` attention of `q` `(B, T, Hq, D)` over `k`, `v` `(B, S, Hkv, D)`; dropout at `rate`
        when `rng` is given (training)."""
        return blockwise_attention(q, k, v, mask, window=window, block_size=self.block_size,
                                   dropout_rate=rate if rng is not None else 0.0, dropout_rng=rng)


@dataclasses.dataclass(frozen=True)
class Sdpa:
    """`fused_attention` (`jax.nn.dot_product_attention`) with `implementation` ("xla", "cudnn", None: cuDNN
    where it fits). It has no attention dropout: a training call of a model with an attention dropout rate
    runs the model's own attention instead (`efficient_attention`)."""

    implementation: Optional[str] = None
    name = "sdpa"
    has_dropout = False

    def __post_init__(self) -> None:
        if self.implementation not in (None, "xla", "cudnn"):
            raise ValueError(f"implementation must be 'xla', 'cudnn' or None, got {self.implementation!r}.")

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array], rate: float,
                 rng: Optional[jax.Array], window: Optional[int] = None) -> jax.Array:
        """As `Blockwise.__call__`, without dropout (`rate` and `rng` unused)."""
        return fused_attention(q, k, v, mask, window=window, implementation=self.implementation)


@dataclasses.dataclass(frozen=True)
class Flash(Blockwise):
    """The platform's attention for long sequences: on a GPU `fused_attention` (cuDNN's flash attention where
    it fits, `cudnn_fits`; XLA's for float32), else, and with attention dropout, `Blockwise` with `block_size`
    (written for XLA:CPU: on a GPU its unrolled blocks compile for minutes)."""

    name = "flash"

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array], rate: float,
                 rng: Optional[jax.Array], window: Optional[int] = None) -> jax.Array:
        """As `Blockwise.__call__`."""
        if jax.default_backend() == "gpu" and (rng is None or rate == 0.0):
            return fused_attention(q, k, v, mask, window=window)  # cuDNN where it fits, else XLA's
        return super().__call__(q, k, v, mask, rate, rng, window)


Kernel = Union[Blockwise, Sdpa, Flash]
# `MissModel.set_attn_implementation`'s names (transformers' where they exist); "eager" is the model's own attention
IMPLEMENTATIONS = ("eager", "blockwise", "sdpa", "flash")


def kernel(name: str, block_size: int = 256) -> Optional[Kernel]:
    """The kernel of an implementation name in `IMPLEMENTATIONS` (None for "eager"); `block_size` goes to
    "blockwise" and "flash". ValueError naming the choices for another name."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown attention implementation {name!r}; choose one of {list(IMPLEMENTATIONS)}.")
    return {"eager": lambda: None, "blockwise": lambda: Blockwise(block_size), "sdpa": Sdpa,
            "flash": lambda: Flash(block_size)}[name]()


def _attention_dropout(module: nn.Module) -> float:
    """The attention dropout rate of a `FAMILIES` module (OPT's `dropout` field, else its config's)."""
    if isinstance(getattr(module, "dropout", None), float):
        return module.dropout
    config = module.config
    return float(getattr(config, "attention_dropout", None) or getattr(config, "attn_pdrop", None) or 0.0)

def _rope_attention(module: nn.Module, a: dict, kernel: Kernel) -> Optional[tuple]:
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
    out = kernel(q, k, v, a["attention_mask"], rate, rng, window)
    return (module.o_proj(_merge(out)),)


def _gpt2_attention(module: nn.Module, a: dict, kernel: Kernel) -> Optional[tuple]:
    """GPT-2 causal self-attention: fused `c_attn`, `c_proj`, residual dropout."""
    if a["key_value_states"] is not None or not module.causal:
        return None
    det = a["deterministic"]
    q, k, v = (_heads(x, module.num_heads) for x in jnp.split(module.c_attn(a["hidden_states"]), 3, axis=2))
    rate = module.config.attn_pdrop
    out = kernel(q, k, v, a["attention_mask"], rate, _dropout_rng(module, rate, det))
    return (module.resid_dropout(module.c_proj(_merge(out)), deterministic=det),)


def _gpt_neo_attention(module: nn.Module, a: dict, kernel: Kernel) -> Optional[tuple]:
    """GPT-Neo: unscaled scores (query pre-multiplied by sqrt(D)), local layers see `window_size` keys."""
    h, det = a["hidden_states"], a["deterministic"]
    q = _heads(module.q_proj(h) * jnp.sqrt(module.head_dim).astype(module.dtype), module.num_heads)
    k, v = _heads(module.k_proj(h), module.num_heads), _heads(module.v_proj(h), module.num_heads)
    window = module.config.window_size - 1 if module.attention_type == "local" else None
    rate = module.config.attention_dropout
    out = kernel(q, k, v, a["attention_mask"], rate, _dropout_rng(module, rate, det), window)
    return (module.resid_dropout(module.out_proj(_merge(out)), deterministic=det),)


def _gptj_attention(module: nn.Module, a: dict, kernel: Kernel) -> Optional[tuple]:
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
    out = kernel(q, k, v, a["attention_mask"], rate, _dropout_rng(module, rate, det))
    return (module.resid_dropout(module.out_proj(_merge(out)), deterministic=det),)


def _opt_attention(module: nn.Module, a: dict, kernel: Kernel) -> Optional[tuple]:
    """OPT causal self-attention; returns `(output, None)` (the layer drops the weights unless
    `output_attentions`, which falls back to the original)."""
    if a["key_value_states"] is not None or not module.causal:
        return None
    h, det = a["hidden_states"], a["deterministic"]
    q, k, v = (_heads(p(h), module.num_heads) for p in (module.q_proj, module.k_proj, module.v_proj))
    out = kernel(q, k, v, a["attention_mask"], module.dropout, _dropout_rng(module, module.dropout, det))
    return module.out_proj(_merge(out)), None


# transformers attention class name -> efficient implementation (None from it: use the original call)
FAMILIES: dict[str, Callable[[nn.Module, dict, Kernel], Optional[tuple]]] = {
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
def efficient_attention(kernel: Kernel) -> Iterator[None]:
    """Within this context, the self-attention of the modules in `FAMILIES` traced in a Linen call runs
    `kernel` (`Blockwise`, `Sdpa` or `Flash`; see the module docstring for the fallbacks to the module's
    own attention). Enter it around the code that traces the forward, as `remat.checkpointing`.
    """

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
        if not kernel.has_dropout and not a["deterministic"] and _attention_dropout(module) > 0.0:
            return next_fun(*args, **kwargs)  # before any submodule call: the dropout rng stream stays the model's
        out = efficient(module, a, kernel)
        return next_fun(*args, **kwargs) if out is None else out

    with nn.intercept_methods(interceptor):
        yield


def memory_efficient_attention(block_size: int = 256) -> contextlib.AbstractContextManager:
    """`efficient_attention(Blockwise(block_size))`: blockwise attention, `block_size` queries per block."""
    return efficient_attention(Blockwise(block_size))
