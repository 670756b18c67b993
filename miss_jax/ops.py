"""The maths of MiSS, once, as pure `jnp` functions (DESIGN.md §1).

Layouts: a torch `nn.Linear` weight `W` is `(out, in)`; a Flax `nn.Dense` kernel `K` is `(in, out)`,
`K = W.T`. Functions that touch a weight take `layout="flax"` (default) or `layout="torch"`.

Blocks:
  balance: `D` `(r, out)`; mini: `D` `(r, mini_r)`, tiled to `(r, out)`; bat: `B` `(out // r, r, r)`.

>>> import jax.numpy as jnp
>>> x = jnp.ones((2, 5)); d = jnp.ones((2, 3))
>>> balance_output(x, d).shape     # fold x (in=5) into r=2 shards, project to out=3
(2, 3)
>>> k = jnp.zeros((5, 3))
>>> bool(jnp.allclose(x @ merge_balance(k, d) , balance_output(x, d)))
True
"""

from __future__ import annotations

import functools
from typing import Literal, Optional

import jax
import jax.numpy as jnp

Layout = Literal["flax", "torch"]
Array = jax.Array


def _check_layout(layout: str) -> None:
    if layout not in ("flax", "torch"):
        raise ValueError(f"Unknown kernel layout {layout!r}; expected 'flax' (in, out) or 'torch' (out, in).")


def to_torch(kernel: Array, layout: Layout) -> Array:
    """The weight in torch layout `(out, in)`."""
    _check_layout(layout)
    return kernel.T if layout == "flax" else kernel


def from_torch(weight: Array, layout: Layout) -> Array:
    """A torch-layout `(out, in)` weight back in `layout`."""
    _check_layout(layout)
    return weight.T if layout == "flax" else weight


def expand_mini(block: Array, out_features: int) -> Array:
    """Mini block `(r, mini_r)` -> effective balance block `(r, out)`; column j is `block[:, j % mini_r]`."""
    mini_r = block.shape[-1]
    if out_features % mini_r:
        raise ValueError(f"mini_r ({mini_r}) must divide out_features ({out_features}).")
    return jnp.tile(block, (1, out_features // mini_r))


def fold_input(x: Array, r: int) -> Array:
    """`x` `(..., in)` -> `(..., r)`: zero-pad `in` to `n*r`, view as `(..., n, r)`, sum over `n`."""
    if r == 1:
        return x.sum(axis=-1, keepdims=True)
    n = -(-x.shape[-1] // r)
    pad = n * r - x.shape[-1]
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return _fold_2d(x.reshape(-1, n * r), r).reshape(*x.shape[:-1], r)


_MAX_SLICES = 32  # slices summed per level of `_fold_2d` (bounds the size of the traced program)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _fold_2d(x: Array, r: int) -> Array:
    """`(T, n*r)` -> `(T, r)`, summing the `n` column slices of width `r` (several levels when `n` is large).

    A sum of slices of a 2-D view, not a reduce over `(T, n, r)`: XLA:CPU fuses the layer input's producer
    (a GELU, a LayerNorm) into such a reduce, splits that producer into several passes and runs the reduce
    unvectorised; slices of the materialised input cost one read. The tangent is the plain reduce, whose
    transpose (a broadcast) is what the backward pass needs.
    """
    n = x.shape[1] // r
    while n > _MAX_SLICES:
        per = -(-n // _MAX_SLICES)  # r-chunks in each wide slice
        wide = -(-n // per)  # wide slices summed at this level
        if wide * per > n:
            x = jnp.pad(x, ((0, 0), (0, (wide * per - n) * r)))
        x, n = _sum_slices(x, per * r), per
    return _sum_slices(x, r)


@_fold_2d.defjvp
def _fold_2d_jvp(r: int, primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (dx,) = primals, tangents
    return _fold_2d(x, r), dx.reshape(dx.shape[0], -1, r).sum(axis=1)


def _sum_slices(x: Array, width: int) -> Array:
    """`(T, k*width)` -> `(T, width)`: the sum of the `k` column slices."""
    out = x[:, :width]
    for i in range(1, x.shape[1] // width):
        out = out + x[:, i * width : (i + 1) * width]
    return out


def balance_output(x: Array, block: Array) -> Array:
    """The balance adapter's output term: `fold_input(x, r) @ block`, `(..., in)` -> `(..., out)`.

    This is the efficient form: no dense `(in, out)` delta is ever built. It runs in the wider of the
    two dtypes (a bf16 input meets a float32 block in float32, as PEFT casts the input to the adapter's
    dtype; a float32 input is never narrowed to a bf16 block).
    """
    x = x.astype(jnp.promote_types(x.dtype, block.dtype))
    folded = fold_input(x, block.shape[0])
    # A 2-D matmul: with (..., r) operands XLA:CPU transposes a copy of the output gradient for d(block).
    out = folded.reshape(-1, folded.shape[-1]) @ block
    return out.reshape(*folded.shape[:-1], block.shape[-1])


def balance_delta(block: Array, in_features: int, layout: Layout = "flax") -> Array:
    """The dense update of a balance block: `dK[i, o] = block[i % r, o]`, `(in, out)` (or its transpose)."""
    r = block.shape[0]
    n = -(-in_features // r)
    delta = jnp.tile(block, (n, 1))[:in_features]
    _check_layout(layout)
    return delta.T if layout == "torch" else delta


def _cast_like(x: Array, like: Array) -> Array:
    return x.astype(like.dtype)


def merge_balance(kernel: Array, block: Array, layout: Layout = "flax", sign: float = 1.0) -> Array:
    """`kernel + sign * balance_delta(block)`, computed in float32 and cast back to the kernel's dtype.

    `block` is `(r, out)` (expand a mini block first with `expand_mini`). `sign=-1` unmerges.
    """
    in_features = to_torch(kernel, layout).shape[1]
    delta = balance_delta(block.astype(jnp.float32), in_features, layout)
    return _cast_like(kernel.astype(jnp.float32) + sign * delta, kernel)


def _flax(kernel: Array, layout: Layout) -> Array:
    """The kernel in flax layout `(in, out)`."""
    return to_torch(kernel, layout).T


def _bat_blocks(kernel: Array, r: int) -> Array:
    """Flax-layout `(in, out)` -> `(in//r, r, out//r, r)`: `[c, j, a, i] = K[c*r + j, a*r + i] = W[a*r + i, c*r + j]`.

    Block `[c, :, a, :]` is `W[a, c]` transposed. The bat maths runs on this view of the kernel: its
    products are batched over `a` with `c` and `i` as free axes, which XLA runs faster than the
    torch-layout view (whose blocks it would first transpose).
    """
    in_features, out_features = kernel.shape
    if out_features % r or in_features % r:
        raise ValueError(
            f"bat needs in_features ({in_features}) and out_features ({out_features}) divisible by r ({r})."
        )
    return kernel.reshape(in_features // r, r, out_features // r, r)


def _bat_left(m: Array, blocks: Array) -> Array:
    """`[c, k, a, i] = sum_j m[a, j, k] blocks[c, j, a, i]`: each `W[a, c] @ m[a]`, in the flax view."""
    return jnp.einsum("ajk,cjai->ckai", m, blocks)


def _bat_bias(block: Array) -> Array:
    """`B[a]` broadcast over `c` in the flax view: `[j, a, i] = B[a, i, j]`."""
    return jnp.transpose(block, (2, 0, 1))


def bat_kernel(kernel: Array, block: Array, layout: Layout = "flax") -> Array:
    """The bat-adapted weight `W'[a, c] = W[a, c] + W[a, c] @ B[a] + B[a]` (r x r blocks of torch-layout W).

    `block` is `(out // r, r, r)`. Computed in float32, returned in the kernel's dtype and layout.
    Differentiable in both arguments; this is both the bat forward's weight and its merge.
    """
    k = _flax(kernel, layout).astype(jnp.float32)
    b = block.astype(jnp.float32)
    kb = _bat_blocks(k, b.shape[-1])
    out = (kb + _bat_left(b, kb) + _bat_bias(b)).reshape(k.shape)
    return _cast_like(from_torch(out.T, layout), kernel)


def bat_unmerge(kernel: Array, block: Array, layout: Layout = "flax") -> Array:
    """Inverse of `bat_kernel`: `W[a, c] = (W'[a, c] - B[a]) @ inv(I + B[a])`, inverse in float32."""
    k = _flax(kernel, layout).astype(jnp.float32)
    b = block.astype(jnp.float32)
    r = b.shape[-1]
    inv = jnp.linalg.inv(jnp.eye(r, dtype=jnp.float32) + b)
    out = _bat_left(inv, _bat_blocks(k, r) - _bat_bias(b)).reshape(k.shape)
    return _cast_like(from_torch(out.T, layout), kernel)


def dropout(x: Array, rate: float, rng: Optional[Array]) -> Array:
    """Inverted dropout on `x` (identity when `rate == 0` or `rng is None`)."""
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def init_block(
    rng: Optional[Array],
    variant: str,
    in_features: int,
    out_features: int,
    r: int,
    mini_r: int = 1,
    random: bool = False,
    dtype: jnp.dtype = jnp.float32,
) -> Array:
    """A fresh adapter block, validated against the layer's shape as PEFT validates it.

    balance: `(r, out)` zeros, or kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(out), 1/sqrt(out)) when
    `random`; mini: `(r, mini_r)` zeros; bat: `(out // r, r, r)` zeros.
    """
    if r <= 0:
        raise ValueError(f"`r` should be a positive integer value but the value passed is {r}.")
    if r > in_features:
        raise ValueError(f"`r` ({r}) must be less than or equal to in_features ({in_features}).")
    if variant == "bat":
        if in_features % r or out_features % r:
            raise ValueError(
                f"bat needs the weight to split into r x r blocks: in_features ({in_features}) and out_features "
                f"({out_features}) must both be divisible by r ({r})."
            )
        return jnp.zeros((out_features // r, r, r), dtype)
    if variant == "mini":
        if out_features % mini_r:
            raise ValueError(f"mini needs out_features ({out_features}) divisible by mini_r ({mini_r}).")
        return jnp.zeros((r, mini_r), dtype)
    if variant != "balance":
        raise ValueError(f"Unknown MiSS variant {variant!r}; expected 'balance', 'mini' or 'bat'.")
    if not random:
        return jnp.zeros((r, out_features), dtype)
    # torch's kaiming_uniform_(a=sqrt(5)) on an (r, out) tensor: fan_in = out, bound = 1/sqrt(out).
    bound = 1.0 / (out_features**0.5)
    return jax.random.uniform(rng, (r, out_features), dtype, -bound, bound)


def block_shape(variant: str, in_features: int, out_features: int, r: int, mini_r: int = 1) -> tuple[int, ...]:
    """Shape of the block `init_block` makes (after the same validation)."""
    return jax.eval_shape(lambda: init_block(None, variant, in_features, out_features, r, mini_r)).shape
