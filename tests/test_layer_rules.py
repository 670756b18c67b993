"""`miss_jax.layer_rules`: layers beyond `nnx.Linear` (LinearGeneral, Einsum, bridged Linen DenseGeneral, a
user-declared einsum module) against the `nnx.Linear` they flatten to, and the errors for bad rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from miss_jax import MissConfig
from miss_jax.layer_rules import KernelRule, einsum_rule, register
from miss_jax.nnx import apply_miss, merge_and_unload, miss_layers

X = jax.random.normal(jax.random.key(0), (2, 3, 8))


class MyEinsum(nnx.Module):
    """An einsum-style module as LLM libraries write them: kernel `w`, no bias."""

    def __init__(self, einsum_str: str, shape: tuple[int, ...], rngs: nnx.Rngs):
        self.einsum_str = einsum_str
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape))

    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.w[...])


register(MyEinsum, lambda m: einsum_rule(m.einsum_str, kernel="w", bias=None))


def bridged_dense_general() -> nnx.Module:
    layer = nnx.bridge.ToNNX(nn.DenseGeneral((2, 4)), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(layer, X)
    return layer


LAYERS = {  # layer, its input, how the torch (out, in) weight's out axis is ordered
    "LinearGeneral": (lambda: nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), rngs=nnx.Rngs(0)), X.reshape(2, 3, 2, 4)),
    "Einsum": (lambda: nnx.Einsum("btd,dnh->btnh", (8, 2, 4), (2, 4), rngs=nnx.Rngs(0)), X),
    "DenseGeneral": (bridged_dense_general, X),
    "q_proj": (lambda: MyEinsum("BTD,DNH->BTNH", (8, 2, 4), nnx.Rngs(0)), X),
    "o_proj": (lambda: MyEinsum("BTNH,NHD->BTD", (2, 4, 8), nnx.Rngs(0)), X.reshape(2, 3, 2, 4)),
}


@pytest.mark.parametrize("init", [False, "mini", "bat"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_equals_its_flattened_linear(kind, init):
    make, x = LAYERS[kind]

    class Holder(nnx.Module):
        def __init__(self):
            self.proj = make()

        def __call__(self, x):
            return self.proj(x)

    model = apply_miss(Holder(), MissConfig(r=4, mini_r=2, init_weights=init, target_modules=["proj"]), nnx.Rngs(1))
    layer = miss_layers(model)["proj"]
    for block in layer.miss_block.values():
        block[...] = 0.1 * jax.random.normal(jax.random.key(2), block.shape)
    rule = layer.rule
    # the same map as an nnx.Linear on the flattened (in, out) kernel
    linear = nnx.Linear(layer.in_features, layer.out_features, use_bias=False, rngs=nnx.Rngs(0))
    linear.kernel.set_value(rule.to_matrix(layer.kernel[...]))
    twin = apply_miss(nnx.Sequential(linear), MissConfig(r=4, mini_r=2, init_weights=init, target_modules="all-linear"),
                      nnx.Rngs(1))
    miss_layers(twin)["layers.0"].miss_block["default"][...] = layer.miss_block["default"][...]
    bias = getattr(layer.base_layer, rule.bias, None) if rule.bias else None
    y = rule.unflatten_output(twin(rule.flatten_input(x, layer.kernel.shape)), layer.kernel.shape)
    y = y + (bias[...] if bias is not None else 0.0)
    np.testing.assert_allclose(model(x), y, atol=1e-5)
    out = model(x)
    layer.merge()
    np.testing.assert_allclose(model(x), out, atol=1e-5)
    layer.unmerge()
    merge_and_unload(model)
    np.testing.assert_allclose(model(x), out, atol=1e-5)


def test_attention_projection_flattens_heads_major():
    """tunix's q_proj kernel (d_model, heads, head_dim) is torch's q_proj.weight (heads*head_dim, d_model)."""
    rule = einsum_rule("BTD,DNH->BTNH", kernel="w")
    w = jnp.arange(8 * 2 * 4.0).reshape(8, 2, 4)
    torch_weight = np.asarray(w).reshape(8, 8).T  # row n*4 + h is head n, dim h
    np.testing.assert_array_equal(rule.to_matrix(w).T, torch_weight)
    np.testing.assert_array_equal(rule.from_matrix(rule.to_matrix(w), w.shape), w)


class NoRule(nnx.Module):
    def __init__(self):
        self.kernel = nnx.Param(jnp.ones((8, 8)))

    def __call__(self, x):
        return x @ self.kernel[...]


class BadRule(NoRule):
    pass


register(BadRule, KernelRule(in_axes=(0,), out_axes=(0,)))


@pytest.mark.parametrize(
    "make, message",
    [
        (NoRule, r"proj is a NoRule, which has no layer rule.*layer_rules.register\(NoRule"),
        (BadRule, r"layer rule for proj \(BadRule\).*do not split its 'kernel' of shape \(8, 8\).*Fix the rule"),
        (lambda: MyEinsum("BDT,DNH->BTNH", (8, 2, 4), nnx.Rngs(0)), r"proj: einsum.*not a linear map"),
        (lambda: MyEinsum("EBD,EDH->EBH", (3, 8, 4), nnx.Rngs(0)), r"batched or summed"),
        (lambda: nnx.LinearGeneral(8, 4, axis=0, rngs=nnx.Rngs(0)), r"proj: nnx.LinearGeneral with axis=\(0,\)"),
    ],
    ids=["no-rule", "axes-do-not-split", "einsum-not-trailing", "einsum-batched", "linear-general-axis"],
)
def test_bad_rules_raise_naming_the_module_and_change_nothing(make, message):
    class Holder(nnx.Module):
        def __init__(self):
            self.proj = make()

    model = Holder()
    with pytest.raises(ValueError, match=message):
        apply_miss(model, MissConfig(r=4, target_modules=["proj"]), nnx.Rngs(1))
    assert miss_layers(model) == {}
