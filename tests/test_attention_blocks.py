"""`attention.blockwise_attention` (flash-style `jax.custom_vjp`) against a dense softmax written in plain
`jnp`: values and gradients (w.r.t. query, key and value) for causal / windowed / non-causal masks, block
sizes that do not divide the sequence, grouped-query attention, key padding (including queries whose keys
are all masked, and a fully padded row), dropout (the per-block masks rebuilt in the reference), bfloat16,
`jax.jit`, and a numerical gradient check in float64."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from miss_jax import attention
from miss_jax.attention import blockwise_attention

NEG = float(jnp.finfo(jnp.float32).min)
TOL = dict(atol=1e-5, rtol=1e-5)
B, D = 4, 8


# --------------------------------------------------------------------------- the dense reference


def _allowed(t: int, s: int, key_mask: Optional[jax.Array], causal: bool, window: Optional[int]) -> np.ndarray:
    """`(B, T, S)` bool: query `i` may attend to key `j` (numpy: the masks are concrete)."""
    i, j = np.arange(t)[:, None], np.arange(s)[None, :]
    allowed = np.ones((t, s), bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= i - j <= window
    ok = np.ones((B, s), bool) if key_mask is None else np.asarray(key_mask) != 0
    return allowed[None] & ok[:, None, :]


def dense(q, k, v, key_mask=None, *, causal=True, window=None, drop=None):
    """Full `(B, H, T, S)` float32 scores `q / sqrt(D) @ k^T`, `+ finfo(float32).min` where masked (so a query
    with every key masked averages all values, with transformers' gradients), softmax, optional dropout
    multiplier `drop` `(B, T, S)` on the weights, `@ v`; GQA by `jnp.repeat`."""
    t, hq, d = q.shape[1:]
    s, hkv = k.shape[1:3]
    k, v = jnp.repeat(k, hq // hkv, axis=2), jnp.repeat(v, hq // hkv, axis=2)
    q = q / jnp.sqrt(d).astype(q.dtype)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    bias = jnp.where(_allowed(t, s, key_mask, causal, window), 0.0, NEG)
    weights = jax.nn.softmax(scores + bias[:, None], axis=-1)
    if drop is not None:
        weights = weights * drop[:, None]
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(jnp.float32)).astype(v.dtype)


def _span(start: int, block: int, s: int, causal: bool, window: Optional[int]) -> tuple[int, int]:
    """The keys `[lo, hi)` a query block starting at `start` is scored against (documented contract)."""
    hi = min(start + block, s) if causal else s
    lo = max(0, start - window) if window is not None else 0
    return lo, max(hi, lo + 1)


def dropout_multiplier(rng, rate, t, s, block, key_mask, causal, window) -> jax.Array:
    """`(B, T, S)` kept / keep_prob, block `i` drawn as `bernoulli(fold_in(rng, i), keep, (rows, hi - lo))`
    and embedded at its span (0 elsewhere: those keys are masked anyway); broadcast over the batch, except
    that queries with no visible key get no dropout (they output the plain mean of the values)."""

    @jax.jit
    def blocks(rng):
        full = jnp.zeros((t, s), jnp.float32)
        for i, start in enumerate(range(0, t, block)):
            rows = min(block, t - start)
            lo, hi = _span(start, block, s, causal, window)
            keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - rate, (rows, hi - lo))
            full = full.at[start:start + rows, lo:hi].set(keep / (1.0 - rate))
        return full

    dead = ~_allowed(t, s, key_mask, causal, window).any(-1, keepdims=True)  # (B, T, 1)
    return jnp.asarray(np.where(dead, 1.0, np.asarray(blocks(rng))[None]))


# --------------------------------------------------------------------------- helpers


def _inputs(t=11, s=None, hq=2, hkv=2, dtype=jnp.float32, seed=0):
    """Standard normal query `(B, T, Hq, D)`, key and value `(B, S, Hkv, D)` in `dtype`, and a float32
    projection of the output for the gradients (numpy's generator: nothing to compile per shape)."""
    s = t if s is None else s
    gen = np.random.default_rng(seed)
    shapes = [(B, t, hq, D), (B, s, hkv, D), (B, s, hkv, D), (B, t, hq, D)]
    q, k, v, proj = (gen.standard_normal(shape, np.float32) for shape in shapes)
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(proj)


def _padding(kind: Optional[str], s: int) -> Optional[jax.Array]:
    """Key masks `(B=4, S)`, one case per row ("padded"): row 0 unpadded, row 1 right padding (3 keys), row 2
    left padding (4 keys: with a causal mask its first 4 queries see no valid key), row 3 fully padded (no
    query of it sees a valid key)."""
    if kind is None:
        return None
    assert kind == "padded" and B == 4
    mask = np.ones((B, s), np.int32)
    mask[1, -3:] = mask[2, :4] = mask[3] = 0
    return jnp.asarray(mask)


# under jit (one compiled program is much faster on CPU than the unrolled blocks' ops run eagerly)
attend = jax.jit(blockwise_attention, static_argnames=("causal", "window", "block_size", "dropout_rate"))


def _value_and_grads(fn, q, k, v, proj):
    """`fn(q, k, v)` and the gradients of `sum(fn(q, k, v) * proj)` w.r.t. q, k, v."""
    loss = lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * proj).sum()  # noqa: E731
    return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _both(fn, ref, q, k, v, proj):
    """`_value_and_grads` of `fn` and of the reference `ref`, in one compiled program."""
    return jax.jit(lambda q, k, v: (_value_and_grads(fn, q, k, v, proj), _value_and_grads(ref, q, k, v, proj)))(
        q, k, v)


def _assert_close(got, expected, **tol):
    (out, grads), (out_ref, grads_ref) = got, expected
    tol = tol or TOL
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out_ref, np.float32), **tol)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), err_msg=f"d{name}",
                                   **tol)


# --------------------------------------------------------------------------- values and gradients

# (t, s, hq, hkv, block_size, causal, window)
CASES = {
    "causal_block4": (11, None, 2, 2, 4, True, None),
    "causal_block_gt_T": (11, None, 2, 2, 16, True, None),
    "causal_block1": (11, None, 2, 2, 1, True, None),
    "causal_window2": (11, None, 2, 2, 4, True, 2),
    "causal_window0_diagonal": (11, None, 2, 2, 3, True, 0),  # Mistral's sliding_window=None
    "causal_window_gt_block": (13, None, 2, 2, 3, True, 5),
    "noncausal": (11, None, 2, 2, 4, False, None),
    "noncausal_window2_gqa": (11, None, 6, 2, 4, False, 2),
    "noncausal_cross_S7": (11, 7, 2, 2, 4, False, None),
    "causal_S_gt_T": (9, 12, 2, 2, 4, True, None),
    "gqa_causal": (11, None, 6, 2, 4, True, None),
    "gqa_noncausal": (11, None, 6, 3, 5, False, None),
}


@pytest.mark.parametrize(
    "case,padding",
    [(case, "padded") for case in CASES] + [(case, None) for case in ("causal_block4", "gqa_causal")],
)
def test_values_and_grads_equal_dense(case, padding):
    """Key padding "padded": one batch row each unpadded, right-padded, left-padded (queries with no visible
    key) and fully padded; None: no key_mask."""
    _check_case(case, padding)


@pytest.mark.parametrize("case", ["causal_block4", "causal_window_gt_block", "gqa_noncausal", "causal_S_gt_T"])
def test_several_key_chunks_equal_dense(case, monkeypatch):
    """A query block's keys in chunks of 3 (`KEY_CHUNK`): the forward's online softmax, including a first
    chunk whose keys are all masked (the left-padded row) before visible ones, and the backward's sums."""
    monkeypatch.setattr(attention, "KEY_CHUNK", 3)
    _check_case(case, "padded")


def _check_case(case: str, padding: Optional[str]) -> None:
    t, s, hq, hkv, block, causal, window = CASES[case]
    q, k, v, proj = _inputs(t, s, hq, hkv)
    mask = _padding(padding, k.shape[1])
    kw = dict(causal=causal, window=window)
    got, expected = _both(lambda q, k, v: blockwise_attention(q, k, v, mask, block_size=block, **kw),
                          lambda q, k, v: dense(q, k, v, mask, **kw), q, k, v, proj)
    assert got[0].shape == q.shape and got[0].dtype == jnp.float32
    _assert_close(got, expected)


def test_queries_without_visible_keys_average_all_values():
    """Left padding: the queries whose visible keys are all masked output the mean of all S values (as
    transformers), and their gradients are transformers' (uniform-softmax) ones, not zero."""
    q, k, v, proj = _inputs(11, hq=6, hkv=2)
    mask = _padding("padded", 11)  # row 2: keys 0..3 padded, so (causal) queries 0..3 see no valid key
    fn = lambda q, k, v: blockwise_attention(q, k, v, mask, block_size=3)  # noqa: E731
    # the gradients of those queries alone (proj zero elsewhere), against the dense reference
    only_dead = np.zeros(proj.shape, np.float32)
    only_dead[2, :4] = proj[2, :4]
    got, expected = _both(fn, lambda q, k, v: dense(q, k, v, mask), q, k, v, only_dead)
    _assert_close(got, expected)
    out = got[0]
    mean = np.repeat(np.asarray(v).mean(1), 3, axis=1)  # (B, Hq, D)
    np.testing.assert_allclose(out[2, :4], np.broadcast_to(mean[2], (4, 6, D)), **TOL)
    np.testing.assert_allclose(out[3], np.broadcast_to(mean[3], (11, 6, D)), **TOL)
    assert float(jnp.abs(got[1][0][2, :4]).max()) > 1e-3  # dq of the dead queries is not zero
    assert float(jnp.abs(got[1][1][2, :4]).max()) > 1e-3  # nor dk of the padded keys


def test_a_non_finite_query_does_not_spread_to_other_queries():
    q, k, v, _ = _inputs(11)
    q = q.at[0, 0, 0, 0].set(jnp.nan)  # batch row 0, query 0 only
    out, ref = attend(q, k, v, block_size=4), dense(q, k, v)
    np.testing.assert_array_equal(np.isfinite(out).all(axis=(2, 3)), np.isfinite(ref).all(axis=(2, 3)))


def test_float_key_mask_and_bool_key_mask_agree():
    q, k, v, _ = _inputs(11)
    mask = _padding("padded", 11)
    a = attend(q, k, v, mask, block_size=4)
    b = attend(q, k, v, mask.astype(bool), block_size=4)
    c = attend(q, k, v, mask.astype(jnp.float32), block_size=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_more_queries_than_keys_with_a_window():
    """Blocks whose window starts past the last key see no key: every query there averages all values."""
    q, k, v, _ = _inputs(11)
    k, v = k[:, :5], v[:, :5]
    out, ref = attend(q, k, v, window=2, block_size=4), dense(q, k, v, window=2)
    np.testing.assert_allclose(out, ref, **TOL)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_block_size_rejected(bad):
    q = jnp.zeros((1, 5, 2, D))
    with pytest.raises(ValueError, match="block_size"):
        blockwise_attention(q, q, q, block_size=bad)


def test_uneven_heads_rejected():
    q, k, v = jnp.zeros((1, 5, 4, D)), jnp.zeros((1, 5, 3, D)), jnp.zeros((1, 5, 3, D))
    with pytest.raises(ValueError, match="evenly"):
        blockwise_attention(q, k, v)


# --------------------------------------------------------------------------- dropout

# (t, hq, hkv, block_size, causal, window, padding, rng kind: jax.random.PRNGKey or typed jax.random.key)
DROPOUT_CASES = {
    "causal_block4_typed_key": (11, 2, 2, 4, True, None, "padded", "typed"),
    "causal_block_gt_T": (11, 2, 2, 16, True, None, None, "raw"),
    "causal_block1": (5, 2, 2, 1, True, None, "padded", "raw"),
    "window2_gqa": (11, 6, 2, 3, True, 2, "padded", "raw"),
    "noncausal": (11, 2, 2, 4, False, None, "padded", "raw"),
}


@pytest.mark.parametrize("case,key_chunk", [(case, None) for case in DROPOUT_CASES] + [("window2_gqa", 2)])
def test_dropout_equals_dense_with_the_same_masks(case, key_chunk, monkeypatch):
    if key_chunk is not None:  # each block's mask split over the key chunks
        monkeypatch.setattr(attention, "KEY_CHUNK", key_chunk)
    t, hq, hkv, block, causal, window, padding, key_kind = DROPOUT_CASES[case]
    rate = 0.3
    q, k, v, proj = _inputs(t, None, hq, hkv)
    mask = _padding(padding, t)
    rng = jax.random.PRNGKey(7) if key_kind == "raw" else jax.random.key(7)
    kw = dict(causal=causal, window=window)
    drop = dropout_multiplier(rng, rate, t, t, block, mask, causal, window)
    got, expected = _both(
        lambda q, k, v: blockwise_attention(q, k, v, mask, block_size=block, dropout_rate=rate, dropout_rng=rng, **kw),
        lambda q, k, v: dense(q, k, v, mask, drop=drop, **kw), q, k, v, proj)
    _assert_close(got, expected)
    # some weights of visible keys were dropped, some kept
    visible = np.asarray(_allowed(t, t, mask, causal, window))
    drop = np.asarray(drop)
    assert (drop[visible] == 0).any() and (drop[visible] > 1).any()


def test_dropout_masks_shared_over_batch_and_heads_and_vary_with_rng():
    """All-equal values: with every key visible (non-causal), each output is sum(kept weights) * value, so a
    row equal across batch and heads shows the mask is broadcast; another rng gives another mask."""
    q, k, _, _ = _inputs(8, hq=4, hkv=2)
    q = jnp.broadcast_to(q[:1, :, :1], q.shape)  # identical queries over batch and heads
    k = jnp.broadcast_to(k[:1, :, :1], k.shape)
    v = jnp.ones_like(k)
    run = lambda rng: attend(q, k, v, causal=False, block_size=3, dropout_rate=0.5, dropout_rng=rng)[..., 0]  # noqa
    a, b = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
    np.testing.assert_allclose(a, jnp.broadcast_to(a[:1, :, :1], a.shape), **TOL)
    assert float(jnp.abs(a - b).max()) > 1e-2


def test_dropout_rate_zero_with_rng_equals_no_rng():
    q, k, v, proj = _inputs(11, hq=6, hkv=2)
    mask = _padding("padded", 11)
    with_rng, without = _both(
        lambda q, k, v: blockwise_attention(q, k, v, mask, window=2, block_size=4, dropout_rate=0.0,
                                            dropout_rng=jax.random.PRNGKey(3)),
        lambda q, k, v: blockwise_attention(q, k, v, mask, window=2, block_size=4), q, k, v, proj)
    np.testing.assert_array_equal(with_rng[0], without[0])
    for g, g0 in zip(with_rng[1], without[1]):
        np.testing.assert_array_equal(g, g0)


# --------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("padding", [None, "padded"])
def test_bfloat16_close_to_float32(padding):
    """bf16 inputs give a bf16 output (and bf16 gradients) within 2e-2 (values) / 5e-2 (gradients), absolute
    plus relative, of the float32 computation on the same (bf16-rounded) inputs."""
    q, k, v, proj = _inputs(11, hq=6, hkv=2, dtype=jnp.bfloat16)
    mask = _padding(padding, 11)
    fn = lambda q, k, v: blockwise_attention(q, k, v, mask, window=3, block_size=4)  # noqa: E731
    out, grads = jax.jit(lambda q, k, v: _value_and_grads(fn, q, k, v, proj))(q, k, v)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (out32, grads32), expected = _both(fn, lambda q, k, v: dense(q, k, v, mask, window=3), *f32, proj)
    np.testing.assert_allclose(np.asarray(out, np.float32), out32, atol=2e-2, rtol=2e-2)
    for g, g32 in zip(grads, grads32):
        np.testing.assert_allclose(np.asarray(g, np.float32), g32, atol=5e-2, rtol=5e-2)
    # and the float32 path itself is the dense reference
    _assert_close((out32, grads32), expected)


# --------------------------------------------------------------------------- jit


def test_jit_compiles_once():
    """value_and_grad (with dropout and padding) under jit: traced once for new values and rngs of the same
    shapes (values are checked against the dense reference above)."""
    traces = []
    mask = _padding("padded", 6)

    def loss(q, k, v, proj, rng):
        traces.append(None)
        out = blockwise_attention(q, k, v, mask, window=3, block_size=4, dropout_rate=0.2, dropout_rng=rng)
        return (out * proj).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    for seed in range(3):
        q, k, v, proj = _inputs(6, hq=6, hkv=2, seed=seed)
        rng = jax.random.PRNGKey(seed)
        value, grads = step(q, k, v, proj, rng)
        assert np.isfinite(float(value)) and all(np.isfinite(g).all() for g in grads)
    assert len(traces) == 1  # one jit trace (hence one compilation) for the three calls


# --------------------------------------------------------------------------- numerical gradients


@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_check_grads_float64(padding):
    """The custom VJP against finite differences, in float64 (the scores themselves are float32, hence the
    tolerance). With left padding, the queries that see no valid key output mean(v) whatever q and k are, so
    the true derivative of their output w.r.t. q and k is 0, while transformers' (autodiff through
    `scores + finfo.min`) gradient, which blockwise_attention reproduces (see the dense tests), is not: there
    only the gradient w.r.t. v is checked numerically."""
    with jax.enable_x64(True):
        gen = np.random.default_rng(0)
        shapes = [(1, 5, 4, 4), (1, 5, 2, 4), (1, 5, 2, 4)]
        q, k, v = (jnp.asarray(gen.standard_normal(shape), jnp.float64) for shape in shapes)
        mask = {None: None, "right": jnp.asarray([[1, 1, 1, 0, 0]]), "left": jnp.asarray([[0, 0, 1, 1, 1]])}[padding]
        fn = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, mask, window=2, block_size=2))
        assert fn(q, k, v).dtype == jnp.float64
        tol = dict(order=1, modes=["rev"], eps=1e-3, atol=2e-3, rtol=2e-3)
        if padding == "left":
            check_grads(lambda v: fn(q, k, v), (v,), **tol)
        else:
            check_grads(fn, (q, k, v), **tol)
