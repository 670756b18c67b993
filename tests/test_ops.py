"""`miss_jax.ops` against an independent NumPy reference (tests/reference.py, docs/DESIGN.md §1) and PEFT's torch MissLinear.

Shapes cover `in % r != 0`, `r == in`, `r == 1`; both kernel layouts ('flax' `(in, out)`, 'torch'
`(out, in)`); bf16 kernels (merges compute in float32, then cast back).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from peft.tuners.miss.layer import MissLinear

from miss_jax import ops
from reference import ref_balance_output, ref_bat, ref_dense_delta, ref_expand_mini, rand, to_layout

# (in_features, out_features, r): uneven shards, r == in, r == 1, several whole shards.
BALANCE_SHAPES = [(10, 6, 4), (8, 12, 8), (7, 5, 1), (12, 9, 3), (5, 4, 5)]
# bat needs in % r == out % r == 0.
BAT_SHAPES = [(8, 12, 4), (6, 6, 6), (9, 3, 3), (4, 8, 2)]
LAYOUTS = ["flax", "torch"]


# ----------------------------------------------------------------------------- balance / mini


@pytest.mark.parametrize("in_f,out_f,r", BALANCE_SHAPES)
def test_fold_input_and_balance_output_match_reference(in_f: int, out_f: int, r: int) -> None:
    rng = np.random.default_rng(in_f * 100 + r)
    x, block = rand(rng, 2, 3, in_f), rand(rng, r, out_f)
    folded = np.zeros((2, 3, r))
    for i in range(in_f):
        folded[..., i % r] += x[..., i]
    np.testing.assert_allclose(ops.fold_input(jnp.asarray(x), r), folded, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ops.balance_output(jnp.asarray(x), jnp.asarray(block)),
                               ref_balance_output(x, block), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("in_f,out_f,r", BALANCE_SHAPES)
def test_balance_merge_unmerge_match_reference(in_f: int, out_f: int, r: int, layout: str) -> None:
    rng = np.random.default_rng(in_f * 10 + out_f)
    weight, block, x = rand(rng, out_f, in_f), rand(rng, r, out_f), rand(rng, 4, in_f)
    kernel = jnp.asarray(to_layout(weight, layout))
    want = weight + ref_dense_delta(block, in_f)
    np.testing.assert_allclose(ops.balance_delta(jnp.asarray(block), in_f, layout),
                               to_layout(ref_dense_delta(block, in_f), layout), atol=0)
    merged = ops.merge_balance(kernel, jnp.asarray(block), layout)
    np.testing.assert_allclose(merged, to_layout(want, layout), rtol=1e-6, atol=1e-6)
    # The merged weight computes base + adapter term: x W'^T == x W^T + balance_output(x, D).
    w_merged = to_layout(np.asarray(merged, np.float64), layout)  # back to torch layout
    np.testing.assert_allclose(x @ w_merged.T, x @ weight.T.astype(np.float64) + ref_balance_output(x, block),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ops.merge_balance(merged, jnp.asarray(block), layout, sign=-1), kernel, atol=1e-5)


@pytest.mark.parametrize("in_f,out_f,r,mini_r", [(10, 6, 4, 3), (8, 8, 8, 2), (6, 4, 2, 4), (5, 6, 3, 1)])
def test_mini_expands_then_acts_as_balance(in_f: int, out_f: int, r: int, mini_r: int) -> None:
    rng = np.random.default_rng(mini_r)
    block, x, weight = rand(rng, r, mini_r), rand(rng, 3, in_f), rand(rng, out_f, in_f)
    full = ops.expand_mini(jnp.asarray(block), out_f)
    np.testing.assert_array_equal(full, ref_expand_mini(block, out_f))
    np.testing.assert_allclose(ops.balance_output(jnp.asarray(x), full),
                               ref_balance_output(x, ref_expand_mini(block, out_f)), rtol=1e-5, atol=1e-5)
    merged = ops.merge_balance(jnp.asarray(weight), full, "torch")
    np.testing.assert_allclose(merged, weight + ref_dense_delta(ref_expand_mini(block, out_f), in_f),
                               rtol=1e-6, atol=1e-6)


def test_expand_mini_rejects_non_dividing_mini_r() -> None:
    with pytest.raises(ValueError, match=r"out_features \(6\).*mini_r \(4\)"):
        ops.expand_mini(jnp.zeros((2, 4)), 6)


# ----------------------------------------------------------------------------- bat


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("in_f,out_f,r", BAT_SHAPES)
def test_bat_kernel_and_unmerge_match_reference(in_f: int, out_f: int, r: int, layout: str) -> None:
    rng = np.random.default_rng(in_f + out_f + r)
    weight, block = rand(rng, out_f, in_f), rand(rng, out_f // r, r, r, scale=0.3)
    kernel = jnp.asarray(to_layout(weight, layout))
    adapted = ops.bat_kernel(kernel, jnp.asarray(block), layout)
    np.testing.assert_allclose(adapted, to_layout(ref_bat(weight, block), layout), rtol=1e-5, atol=1e-5)
    restored = ops.bat_unmerge(adapted, jnp.asarray(block), layout)
    np.testing.assert_allclose(restored, kernel, rtol=1e-5, atol=1e-5)


def test_bat_rejects_non_divisible_weight() -> None:
    with pytest.raises(ValueError, match=r"in_features \(6\).*out_features \(8\).*r \(4\)"):
        ops.bat_kernel(jnp.zeros((6, 8)), jnp.zeros((2, 4, 4)), "flax")


def test_bat_kernel_is_differentiable_in_block_and_kernel() -> None:
    rng = np.random.default_rng(3)
    weight, block, x = rand(rng, 8, 4), rand(rng, 4, 2, 2, scale=0.3), rand(rng, 5, 4)

    def loss(k: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.sum((x @ ops.bat_kernel(k, b, "flax")) ** 2)

    gk, gb = jax.grad(loss, argnums=(0, 1))(jnp.asarray(weight.T), jnp.asarray(block))
    eps = 1e-3
    bump = np.zeros_like(block)
    bump[1, 0, 1] = eps
    numeric = (loss(weight.T, block + bump) - loss(weight.T, block - bump)) / (2 * eps)
    np.testing.assert_allclose(gb[1, 0, 1], numeric, rtol=2e-2)
    assert gk.shape == (4, 8) and float(jnp.abs(gk).max()) > 0


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_kernels_merge_in_float32_and_cast_back(layout: str) -> None:
    rng = np.random.default_rng(11)
    weight, block, bat_block = rand(rng, 8, 12), rand(rng, 4, 8), rand(rng, 2, 4, 4, scale=0.3)
    w16 = weight.astype(jnp.bfloat16)
    kernel = jnp.asarray(to_layout(w16, layout))
    merged = ops.merge_balance(kernel, jnp.asarray(block), layout)
    assert merged.dtype == jnp.bfloat16
    want = (w16.astype(np.float32) + ref_dense_delta(block, 12).astype(np.float32)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(merged, np.float32), to_layout(want.astype(np.float32), layout))
    adapted = ops.bat_kernel(kernel, jnp.asarray(bat_block), layout)
    assert adapted.dtype == jnp.bfloat16
    want_bat = ref_bat(w16.astype(np.float32), bat_block).astype(jnp.bfloat16).astype(np.float32)
    # One bf16 ulp at most: float32 sums in another order may round the other way.
    np.testing.assert_allclose(np.asarray(adapted, np.float32), to_layout(want_bat, layout), rtol=2**-7, atol=1e-6)


def test_balance_output_promotes_input_to_block_dtype() -> None:
    x = jnp.ones((2, 6), jnp.bfloat16)
    assert ops.balance_output(x, jnp.ones((3, 4), jnp.float32)).dtype == jnp.float32


# ----------------------------------------------------------------------------- init, dropout


@pytest.mark.parametrize(
    "variant,in_f,out_f,r,mini_r,shape",
    [("balance", 10, 6, 4, 1, (4, 6)), ("mini", 10, 6, 4, 3, (4, 3)), ("bat", 8, 12, 4, 1, (3, 4, 4))],
)
def test_variant_init_shapes_are_zero(variant: str, in_f: int, out_f: int, r: int, mini_r: int,
                                      shape: tuple[int, ...]) -> None:
    v = ops.variant(variant)
    block = v.init(jax.random.PRNGKey(0), in_f, out_f, r, mini_r)
    assert block.shape == shape == v.block_shape(in_f, out_f, r, mini_r)
    assert not np.asarray(block).any()
    assert ops.variant({True: "balance"}.get(v.init_weights, v.init_weights)) is v  # init_weights selects it


def test_variant_table_is_the_only_place_a_variant_is_named() -> None:
    """Each variant's behaviour is read off the table: additive variants fold, the others transform the kernel."""
    assert sorted(ops.VARIANTS) == ["balance", "bat", "mini"]
    assert [n for n, v in ops.VARIANTS.items() if not v.additive] == ["bat"]
    assert ops.variant("bat").out_axis((3, 4, 4)) == (0, 3) and ops.variant("mini").out_axis((4, 2)) == (1, 2)


def test_random_balance_init_is_kaiming_uniform() -> None:
    block = np.asarray(ops.variant("balance").init(jax.random.PRNGKey(1), 64, 100, 16, random=True))
    bound = 1 / np.sqrt(100)
    assert block.shape == (16, 100) and np.abs(block).max() <= bound
    assert np.abs(block).max() > 0.9 * bound and abs(block.mean()) < 0.1 * bound


@pytest.mark.parametrize(
    "args,message",
    [
        (("balance", 8, 8, 0), r"positive integer.*\b0\b"),
        (("balance", 8, 8, 9), r"`r` \(9\).*in_features \(8\)"),
        (("bat", 8, 6, 4), r"in_features \(8\).*out_features \(6\).*r \(4\)"),
        (("mini", 8, 6, 4, 4), r"out_features \(6\).*mini_r \(4\)"),
        (("lora", 8, 8, 4), r"'lora'"),
    ],
)
def test_variant_init_rejects_bad_shapes(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ops.variant(args[0]).init(jax.random.PRNGKey(0), *args[1:])


def test_unknown_layout_is_rejected() -> None:
    with pytest.raises(ValueError, match="'jax'"):
        ops.balance_delta(jnp.zeros((2, 3)), 4, "jax")


def test_dropout_keeps_scaled_values_or_zeros() -> None:
    x = jnp.arange(1.0, 401.0).reshape(20, 20)
    assert ops.dropout(x, 0.0, jax.random.PRNGKey(0)) is x and ops.dropout(x, 0.5, None) is x
    y = np.asarray(ops.dropout(x, 0.25, jax.random.PRNGKey(0)))
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    assert 0.6 < kept.mean() < 0.9


# ----------------------------------------------------------------------------- PEFT's torch MissLinear


def peft_layer(in_f: int, out_f: int, r: int, init_weights: object, mini_r: int, seed: int) -> MissLinear:
    """A PEFT MissLinear on a random torch Linear, its miss_block filled with random values."""
    torch.manual_seed(seed)
    base = torch.nn.Linear(in_f, out_f)
    layer = MissLinear(base, "default", config=peft.MissConfig(r=r, init_weights=init_weights, mini_r=mini_r), r=r)
    with torch.no_grad():
        block = layer.miss_block["default"]
        block.copy_(0.3 * torch.randn_like(block))
    return layer


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "init_weights,in_f,out_f,r,mini_r",
    [(True, 10, 6, 4, 1), (False, 8, 12, 8, 1), ("mini", 10, 6, 4, 3), ("mini", 12, 8, 3, 2), ("bat", 8, 12, 4, 1)],
)
def test_ops_match_peft_miss_linear(init_weights: object, in_f: int, out_f: int, r: int, mini_r: int,
                                    layout: str) -> None:
    layer = peft_layer(in_f, out_f, r, init_weights, mini_r, seed=in_f + r)
    variant = init_weights if isinstance(init_weights, str) else "balance"
    weight = layer.base_layer.weight.detach().numpy().copy()
    bias = layer.base_layer.bias.detach().numpy().copy()
    block = jnp.asarray(layer.miss_block["default"].detach().numpy())
    x = np.random.default_rng(0).standard_normal((2, 3, in_f)).astype(np.float32)
    kernel = jnp.asarray(to_layout(weight, layout))

    with torch.no_grad():
        peft_out = layer(torch.from_numpy(x)).numpy()
    v = ops.variant(variant)
    merged = v.merge(kernel, block, layout)
    if v.additive:
        y = x @ weight.T + bias + np.asarray(ops.balance_output(jnp.asarray(x), v.effective_block(block, out_f)))
    else:
        y = x @ to_layout(np.asarray(merged), layout).T + bias
    np.testing.assert_allclose(y, peft_out, rtol=1e-5, atol=1e-5)

    layer.merge()
    np.testing.assert_allclose(merged, to_layout(layer.base_layer.weight.detach().numpy(), layout),
                               rtol=1e-5, atol=1e-5)
    layer.unmerge()
    restored = v.unmerge(merged, block, layout)
    np.testing.assert_allclose(restored, to_layout(layer.base_layer.weight.detach().numpy(), layout),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the fused balance matmul


@pytest.mark.parametrize("in_f,out_f,r", [(10, 6, 4), (12, 9, 3), (8, 12, 8)])
def test_adapted_matmul_matches_peft_forward_and_gradients(in_f: int, out_f: int, r: int) -> None:
    """One matmul with the adapted kernel equals PEFT's MissLinear (base + fold(x) @ D): the output, and
    torch autograd's gradients of the input and the block through our custom VJP."""
    layer = peft_layer(in_f, out_f, r, True, 1, seed=in_f * r)
    rng = np.random.default_rng(r)
    x, g = rand(rng, 2, 5, in_f), rand(rng, 2, 5, out_f)
    xt = torch.tensor(x, requires_grad=True)
    out_t = layer(xt)
    (out_t * torch.tensor(g)).sum().backward()
    kernel = jnp.asarray(layer.base_layer.weight.detach().numpy().T)
    bias = jnp.asarray(layer.base_layer.bias.detach().numpy())
    block = jnp.asarray(layer.miss_block["default"].detach().numpy())

    def loss(x: jax.Array, block: jax.Array) -> jax.Array:
        return jnp.vdot(ops.adapted_matmul(x, kernel, (block,)) + bias, jnp.asarray(g))

    out = ops.adapted_matmul(jnp.asarray(x), kernel, (block,)) + bias
    np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=1e-5, atol=1e-5)
    dx, dblock = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), block)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dblock, layer.miss_block["default"].grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("argnums", [(0,), (1,), (2,), (3,), (2, 3), (0, 1, 2, 3)])
def test_adapted_matmul_gradients_equal_the_two_matmul_form(argnums: tuple[int, ...]) -> None:
    """Every subset of perturbed inputs (a frozen kernel is never differentiated; a perturbed one gets
    `x^T g`), two blocks of different `r` on one kernel, `in % r != 0`."""
    rng = np.random.default_rng(0)
    args = tuple(jnp.asarray(a) for a in (rand(rng, 2, 5, 12), rand(rng, 12, 6), rand(rng, 4, 6), rand(rng, 5, 6)))
    g = jnp.asarray(rand(rng, 2, 5, 6))

    def two(x, k, d1, d2):
        return x @ k + ops.balance_output(x, d1) + ops.balance_output(x, d2)

    def one(x, k, d1, d2):
        return ops.adapted_matmul(x, k, (d1, d2))

    np.testing.assert_allclose(one(*args), two(*args), rtol=1e-5, atol=1e-5)
    want = jax.grad(lambda *a: jnp.vdot(two(*a), g), argnums)(*args)
    got = jax.jit(jax.grad(lambda *a: jnp.vdot(one(*a), g), argnums))(*args)
    for w, h in zip(want, got):
        np.testing.assert_allclose(h, w, rtol=1e-4, atol=1e-4)


def test_fuses_needs_enough_rows_and_one_dtype() -> None:
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert ops.fuses(ops.FUSED_MIN_ROWS, [f32, f32, f32])
    assert not ops.fuses(ops.FUSED_MIN_ROWS - 1, [f32, f32, f32])      # decoding: the two-matmul form
    assert not ops.fuses(ops.FUSED_MIN_ROWS, [bf16, bf16, f32])        # bf16 base, float32 adapter (autocast)
