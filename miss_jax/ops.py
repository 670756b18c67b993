"""The maths of MiSS, once, as pure `jnp` functions, and the table of its variants (docs/DESIGN.md §1).

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

Everything that differs between the variants lives in one table, `VARIANTS` (`variant(name)`): block
shape, validation, init, the effective additive block, merge and unmerge, and which block axis
follows the kernel's `out` axis. Linen, NNX, sharding and interop ask the table, never the name.

>>> v = variant("bat"); v.block_shape(in_features=8, out_features=12, r=4), v.additive
((3, 4, 4), False)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union

import jax
import jax.numpy as jnp

Layout = Literal["flax", "torch"]
Array = jax.Array
AxisEntry = Union[None, str, tuple[str, ...]]  # a PartitionSpec entry: replicated, one mesh axis or several


def axis_names(entry: AxisEntry) -> tuple[str, ...]:
    """The mesh axes a partition-spec entry names: `()` for None, one name, or the tuple's names."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


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


def out_entry(kernel_spec: Sequence[AxisEntry], out_axes: Sequence[int]) -> AxisEntry:
    """The partition entry of a kernel's flattened `out` axis: `out_axes` flattened row-major (as
    `layer_rules.KernelRule` flattens them), from the kernel's partition spec `kernel_spec` (entries it
    lacks at the end are replicated).

    That is the first `out` axis's entry when the other `out` axes are replicated (each shard then holds one
    contiguous run of the flattened `out`, as a 2-D kernel's `out` shard does), else None (replicated).

    >>> out_entry(("data", "model"), (1,)), out_entry((None, "model"), (1, 2)), out_entry((None, None, "model"), (1, 2))
    ('model', 'model', None)
    """
    entries = tuple(kernel_spec) + (None,) * (max(out_axes) + 1 - len(kernel_spec))
    first, *rest = (entries[a] for a in out_axes)
    return first if all(e is None for e in rest) else None


def _check_mini(out_features: int, mini_r: int) -> None:
    if mini_r <= 0 or out_features % mini_r:
        raise ValueError(f"mini needs out_features ({out_features}) divisible by mini_r ({mini_r}).")


def _check_bat(in_features: int, out_features: int, r: int) -> None:
    if in_features % r or out_features % r:
        raise ValueError(
            f"bat needs the weight to split into r x r blocks: in_features ({in_features}) and out_features "
            f"({out_features}) must both be divisible by r ({r})."
        )


def expand_mini(block: Array, out_features: int) -> Array:
    """Mini block `(r, mini_r)` -> effective balance block `(r, out)`; column j is `block[:, j % mini_r]`."""
    mini_r = block.shape[-1]
    _check_mini(out_features, mini_r)
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


FUSED_MIN_ROWS = 256  # input rows (tokens) from which `adapted_matmul` is the faster form of a balance layer


def fuses(rows: int, dtypes: Sequence[jnp.dtype]) -> bool:
    """Whether a layer's base matmul and its balance terms run as one `adapted_matmul`: at least
    `FUSED_MIN_ROWS` input rows (decoding a few tokens reads each kernel once, and building the adapted
    kernel would read and write it again) and one dtype for input, kernel and blocks (a bf16 base keeps
    the adapter's float32 term, as PEFT's autocast does)."""
    return rows >= FUSED_MIN_ROWS and len(set(map(jnp.dtype, dtypes))) == 1


def _adapted(kernel: Array, blocks: Sequence[Array]) -> Array:
    """`kernel + sum_i balance_delta(blocks[i])`, `(in, out)`."""
    for block in blocks:
        kernel = kernel + balance_delta(block, kernel.shape[0])
    return kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def adapted_matmul(x: Array, kernel: Array, blocks: tuple[Array, ...], precision: Any = None) -> Array:
    """`x @ kernel + sum_i balance_output(x, blocks[i])` as one matmul with the adapted kernel, `(..., in)` ->
    `(..., out)`; `kernel` `(in, out)`, each block `(r_i, out)`, all of one dtype (`fuses`).

    The same numbers as the two-matmul form up to rounding, at the cost of the base matmul plus one pass
    over the kernel: the small `(T, r) @ (r, out)` products run far below a GEMM's peak on a CPU (a MiniLM
    layer's r=64 product took 46% of its base matmul's time for 17% of its FLOPs). The gradient is custom:
    `d blocks = fold_input(x)^T @ g` (never the dense `x^T @ g`, which only a perturbed kernel pays for), and
    `dx = g @ adapted^T`, the adapted kernel rebuilt rather than kept for the backward pass.

    >>> x = jnp.ones((3, 4)); k = jnp.ones((4, 2)); d = jnp.ones((2, 2))
    >>> bool(jnp.allclose(adapted_matmul(x, k, (d,)), x @ k + balance_output(x, d)))
    True
    """
    return _matmul(x, _adapted(_after(kernel, x), blocks), precision)


def _after(kernel: Array, x: Array) -> Array:
    """`kernel`, unchanged, made to depend on `x`: the adapted kernel is then built when its layer runs.
    Without it, XLA:CPU's concurrency-optimised scheduler builds every layer's adapted kernel at the
    program's start and holds them all (an extra copy of every adapted kernel; `optimization_barrier` does
    not stop it). `isfinite` keeps a NaN in `x` out of the kernel. CPU only, where the hoisting was measured
    (XLA's memory analysis): on an accelerator one element of a sharded `x` would cost a collective per layer."""
    if jax.default_backend() != "cpu":
        return kernel
    return kernel + jnp.isfinite(x.reshape(-1)[0]).astype(kernel.dtype) * jnp.zeros((), kernel.dtype)


def _matmul(x: Array, kernel: Array, precision: Any) -> Array:
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _adapted_fwd(x: Any, kernel: Any, blocks: Any, precision: Any) -> tuple[Array, tuple]:
    values = (x.value, kernel.value, tuple(b.value for b in blocks))
    perturbed = (x.perturbed, kernel.perturbed, tuple(b.perturbed for b in blocks))
    return adapted_matmul(*values, precision), (values, perturbed)


def _adapted_bwd(precision: Any, res: tuple, g: Array) -> tuple:
    (x, kernel, blocks), (x_perturbed, kernel_perturbed, blocks_perturbed) = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, (None,) * len(blocks)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # 2-D: no transposed copies on XLA:CPU
    dx = _matmul(g, _adapted(kernel, blocks).T, precision) if x_perturbed else None
    dkernel = _matmul(x2.T, g2, precision) if kernel_perturbed else None
    dblocks = tuple(
        _matmul(fold_input(x2, b.shape[0]).T, g2, precision) if p else None for b, p in zip(blocks, blocks_perturbed)
    )
    return dx, dkernel, dblocks


adapted_matmul.defvjp(_adapted_fwd, _adapted_bwd, symbolic_zeros=True)


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
    _check_bat(in_features, out_features, r)
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


MAX_UNMERGE_CONDITION = 1e3  # bat: largest condition number of I + B[a] that `safe_merge` accepts


def is_finite(x: Array) -> bool:
    """True when every element of `x` is finite (no NaN, no inf)."""
    return bool(jnp.isfinite(x).all())


# --------------------------------------------------------------------------- the variant table


def _check_r(in_features: int, r: int) -> None:
    if r <= 0:
        raise ValueError(f"`r` should be a positive integer value but the value passed is {r}.")
    if r > in_features:
        raise ValueError(f"`r` ({r}) must be less than or equal to in_features ({in_features}).")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One MiSS variant (PEFT's `init_weights` mode). Subclasses override what differs.

    `additive` variants add `balance_output(x, effective_block(block))` to the layer's output; the
    others (bat) run the layer with the transformed kernel `merge(kernel, block)`.
    """

    name: str
    init_weights: object  # the `MissConfig.init_weights` value that selects this variant
    additive: bool = True

    def validate(self, in_features: int, out_features: int, r: int, mini_r: int = 1) -> None:
        """Raises ValueError (PEFT's rule, one message each) when a layer cannot carry this variant."""
        _check_r(in_features, r)

    def block_shape(self, in_features: int, out_features: int, r: int, mini_r: int = 1) -> tuple[int, ...]:
        """The trainable block's shape, after `validate`."""
        self.validate(in_features, out_features, r, mini_r)
        return (r, out_features)

    def init(
        self,
        rng: Optional[Array],
        in_features: int,
        out_features: int,
        r: int,
        mini_r: int = 1,
        random: bool = False,
        dtype: jnp.dtype = jnp.float32,
    ) -> Array:
        """A fresh block: zeros (PEFT's init for every variant; `random` applies to balance only)."""
        return jnp.zeros(self.block_shape(in_features, out_features, r, mini_r), dtype)

    def effective_block(self, block: Array, out_features: int) -> Array:
        """The `(r, out)` block the forward adds through (additive variants only)."""
        return block

    def merge(self, kernel: Array, block: Array, layout: Layout = "flax") -> Array:
        """The kernel with the adapter merged in (float32 maths, the kernel's dtype)."""
        return merge_balance(kernel, self.effective_block(block, to_torch(kernel, layout).shape[0]), layout)

    def unmerge(self, kernel: Array, block: Array, layout: Layout = "flax") -> Array:
        """`merge`'s inverse."""
        return merge_balance(kernel, self.effective_block(block, to_torch(kernel, layout).shape[0]), layout, -1.0)

    def out_axis(self, block_shape: tuple[int, ...]) -> tuple[int, int]:
        """`(axis, size)`: the block axis indexed along the kernel's `out` axis, and its length (a sharded
        kernel's block may be sharded along it when `size` divides over the same mesh axes)."""
        return 1, block_shape[1]

    def partition(
        self, block_shape: tuple[int, ...], out: AxisEntry, mesh_shape: Optional[Mapping[str, int]]
    ) -> tuple[AxisEntry, ...]:
        """A block's partition spec, one entry per axis of `block_shape`, from the spec entry `out` (None, a
        mesh axis name or a tuple of them) of its kernel's `out` axis on a mesh of axis sizes `mesh_shape`.

        The `out_axis` takes `out` when its length is known to divide over those mesh axes; everything else
        is replicated (None), also when the mesh is unknown (`mesh_shape` None) or lacks one of the axes.

        >>> bat = variant("bat")
        >>> bat.partition((8, 4, 4), "model", {"model": 4}), bat.partition((3, 4, 4), "model", {"model": 4})
        (('model', None, None), (None, None, None))
        """
        spec: list[AxisEntry] = [None] * len(block_shape)
        names = axis_names(out)
        if names and mesh_shape is not None and all(n in mesh_shape for n in names):
            axis, size = self.out_axis(block_shape)
            if size % math.prod(mesh_shape[n] for n in names) == 0:
                spec[axis] = out
        return tuple(spec)

    def unmerge_problem(self, block: Array) -> Optional[str]:
        """Why unmerging `block` would not give the base kernel back (None: it would, up to rounding)."""
        return None


@dataclasses.dataclass(frozen=True)
class Balance(Variant):
    """`D` `(r, out)`: zeros, or kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(out), 1/sqrt(out)) when `random`."""

    def init(self, rng, in_features, out_features, r, mini_r=1, random=False, dtype=jnp.float32):  # noqa: D102
        if not random:
            return super().init(rng, in_features, out_features, r, mini_r, random, dtype)
        shape = self.block_shape(in_features, out_features, r, mini_r)
        # torch's kaiming_uniform_(a=sqrt(5)) on an (r, out) tensor: fan_in = out, bound = 1/sqrt(out).
        bound = 1.0 / (out_features**0.5)
        return jax.random.uniform(rng, shape, dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class Mini(Variant):
    """`D` `(r, mini_r)`, tiled over `out` (`expand_mini`)."""

    def validate(self, in_features, out_features, r, mini_r=1):  # noqa: D102
        _check_r(in_features, r)
        _check_mini(out_features, mini_r)

    def block_shape(self, in_features, out_features, r, mini_r=1):  # noqa: D102
        self.validate(in_features, out_features, r, mini_r)
        return (r, mini_r)

    def effective_block(self, block, out_features):  # noqa: D102
        return expand_mini(block, out_features)


@dataclasses.dataclass(frozen=True)
class Bat(Variant):
    """`B` `(out // r, r, r)`: the kernel's `r x r` blocks become `W + W @ B + B` (`bat_kernel`)."""

    def validate(self, in_features, out_features, r, mini_r=1):  # noqa: D102
        _check_r(in_features, r)
        _check_bat(in_features, out_features, r)

    def block_shape(self, in_features, out_features, r, mini_r=1):  # noqa: D102
        self.validate(in_features, out_features, r, mini_r)
        return (out_features // r, r, r)

    def effective_block(self, block, out_features):  # noqa: D102
        raise ValueError("bat is not additive: it transforms the kernel (use merge).")

    def merge(self, kernel, block, layout="flax"):  # noqa: D102
        return bat_kernel(kernel, block, layout)

    def unmerge(self, kernel, block, layout="flax"):  # noqa: D102
        return bat_unmerge(kernel, block, layout)

    def out_axis(self, block_shape):  # noqa: D102
        return 0, block_shape[0]

    def unmerge_problem(self, block):  # noqa: D102
        b = jnp.asarray(block, jnp.float32)
        cond = jnp.linalg.cond(jnp.eye(b.shape[-1], dtype=jnp.float32) + b)  # one per block row `a`
        worst = float(jnp.max(jnp.where(jnp.isnan(cond), jnp.inf, cond)))
        if worst <= MAX_UNMERGE_CONDITION:
            return None
        return (
            f"I + B is singular or ill-conditioned (condition number {worst:.3g} > {MAX_UNMERGE_CONDITION:g}), so "
            "unmerging it could not restore the base weights"
        )


VARIANTS: dict[str, Variant] = {
    v.name: v for v in (Balance("balance", True), Mini("mini", "mini"), Bat("bat", "bat", additive=False))
}


def variant_of(init_weights: object) -> Variant:
    """The variant PEFT's `init_weights` value selects: True / False (random init) -> balance, or the
    `Variant.init_weights` string of another variant; ValueError listing the allowed values otherwise."""
    if init_weights is True or init_weights is False:
        return VARIANTS["balance"]
    for v in VARIANTS.values():
        if isinstance(init_weights, str) and v.init_weights == init_weights:
            return v
    allowed = ["True", "False"] + [repr(v.init_weights) for v in VARIANTS.values() if isinstance(v.init_weights, str)]
    raise ValueError(f"Unknown `init_weights` {init_weights!r}; allowed: {', '.join(allowed)}.")


def composition_order(variants: Mapping[str, str], names: Sequence[str]) -> tuple[str, ...]:
    """The order several adapters on one layer apply (and merge) in: kernel-transforming variants first, then
    additive ones, each group as given (`variants` maps each name to its variant's name; docs/DESIGN.md §1).

    >>> composition_order({"a": "balance", "b": "bat", "c": "mini"}, ["a", "b", "c"])
    ('b', 'a', 'c')
    """
    first = tuple(n for n in names if not variant(variants[n]).additive)
    return first + tuple(n for n in names if n not in first)


def merge_schedule(
    variants: Mapping[str, str], merged: Sequence[str], new: Sequence[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """How to merge adapters `new` into a kernel that already holds `merged` (in their order) so that the
    result is `composition_order` of all of them: `(unmerge, merge)`, the adapters to take out first (last
    first) and those to merge after, in order. When a kernel-transforming adapter joins merged additive
    ones, everything is taken out and merged again; otherwise only `new` is merged.

    >>> merge_schedule({"a": "balance", "b": "bat"}, ["a"], ["b"])
    (('a',), ('b', 'a'))
    >>> merge_schedule({"a": "bat", "b": "balance"}, ["a"], ["b"])
    ((), ('b',))
    """
    merged = tuple(merged)
    order = composition_order(variants, merged + tuple(n for n in new if n not in merged))
    if order[: len(merged)] == merged:
        return (), order[len(merged):]
    return merged, order


def partial_merge_problem(
    variants: Mapping[str, str], active: Sequence[str], merged: Sequence[str]
) -> Optional[str]:
    """Why a layer whose kernel holds `merged` (in merge order) while its forward applies the `active` adapters
    not in it would not compute what the unmerged layer computes, or None.

    The forward applies the unmerged kernel-transforming (bat) adapters to the kernel it holds: with an
    additive adapter merged in, that is bat(W + dW), not the unmerged bat(W) + dW; with a bat adapter merged
    that the activation order applies after them, the two kernel transforms swap. Additive adapters left
    unmerged are always exact (their term does not read the kernel).

    >>> partial_merge_problem({"a": "balance", "b": "bat"}, ["a", "b"], ["a"]) is not None
    True
    >>> partial_merge_problem({"a": "bat", "b": "balance"}, ["a", "b"], ["a"]) is None
    True
    """
    merged = [n for n in merged if n in variants]
    bats = [n for n in active if n not in merged and n in variants and not variant(variants[n]).additive]
    if not bats or not merged:
        return None
    added = [n for n in merged if variant(variants[n]).additive]
    if added:
        return (f"the unmerged bat adapters {bats} would transform a kernel that holds the merged additive adapters "
                f"{added} (bat(W + dW) instead of bat(W) + dW)")
    first = min(list(active).index(n) for n in bats)
    late = [n for n in merged if n in active and list(active).index(n) > first]
    if late:
        return (f"the merged bat adapters {late} would apply before the unmerged {bats}, which come first in "
                f"{list(active)}")
    return None


def variant(name: str) -> Variant:
    """The `Variant` called `name` ('balance', 'mini' or 'bat')."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown MiSS variant {name!r}; expected one of {list(VARIANTS)}.") from None
