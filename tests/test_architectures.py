"""PEFT's generic MiSS checks, in JAX, on every tiny architecture of `tiny_models.ARCHS`.

One `MissModel` per architecture carries four adapters on the same layers: `zero` (balance, PEFT's
default zero init), `balance` (random init), `mini` and `bat` (blocks set by hand: PEFT inits them
to zeros, which would make the checks vacuous). Each distinct active set compiles once per
architecture, so the checks share compiled forwards; the deleting check runs last in the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import tiny_models as tm
from miss_jax import MissConfig, MissModel, get_peft_model
from test_lifecycle import assert_trees_close, fill_blocks, logits

VARIANTS = {"zero": True, "balance": False, "mini": "mini", "bat": "bat"}
PAIR = ["balance", "bat"]  # the two-adapter combination: additive term on top of a bat-adapted weight


@dataclasses.dataclass
class Adapted:
    """An architecture's adapted model, its inputs, and the base model's own output on them."""

    arch: str
    model: MissModel
    x: dict[str, np.ndarray]
    base: np.ndarray
    base_params: Any

    def run(self, active: str | list[str]) -> np.ndarray:
        self.model.set_adapter(active)
        return logits(self.model(**self.x))


@pytest.fixture(scope="module", params=tm.ARCHS)
def adapted(request: pytest.FixtureRequest) -> Adapted:
    arch = request.param
    base_model = tm.flax_model(arch)
    x = tm.inputs(arch)
    targets = tm.targets(arch)
    model = get_peft_model(base_model, MissConfig(r=4, init_weights=True, target_modules=targets), "zero")
    for name, init in list(VARIANTS.items())[1:]:
        model.add_adapter(name, MissConfig(r=4, mini_r=2, init_weights=init, target_modules=targets))
    fill_blocks(model, "mini", 0.1, seed=1)
    fill_blocks(model, "bat", 0.1, seed=2)
    return Adapted(arch, model, x, logits(base_model(**x)), base_model.params)


@pytest.fixture()
def case(adapted: Adapted) -> Iterator[Adapted]:
    """The architecture's model, left unmerged with its first adapter active after each test."""
    yield adapted
    if adapted.model.merged_adapters:
        adapted.model.unmerge_adapter()
    adapted.model.set_adapter(next(iter(adapted.model.peft_config)))


def test_init_and_disable(case: Adapted) -> None:
    np.testing.assert_allclose(case.run("zero"), case.base, atol=1e-5)
    assert np.abs(case.run("balance") - case.base).max() > 1e-3
    with case.model.disable_adapter():
        np.testing.assert_allclose(logits(case.model(**case.x)), case.base, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_unmerge_and_safe_merge(case: Adapted, variant: str) -> None:
    model = case.model
    unmerged = case.run(variant)
    if variant != "zero":
        assert np.abs(unmerged - case.base).max() > 1e-4
    model.merge_adapter(safe_merge=True)
    np.testing.assert_allclose(logits(model(**case.x)), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    assert_trees_close(model.params, case.base_params, atol=1e-5)

    good = model.adapter_params["miss"][variant]
    broken = jax.tree_util.tree_map(lambda b: b.at[(0,) * b.ndim].set(jnp.nan), good)
    model.adapter_params["miss"][variant] = broken
    params = model.params
    try:
        with pytest.raises(ValueError, match=f"NaNs or infs.*'{variant}'"):
            model.merge_adapter(safe_merge=True)
        assert model.params is params and model.merged_adapters == []
    finally:
        model.adapter_params["miss"][variant] = good


def test_two_adapters_combine_switch(case: Adapted) -> None:
    both = case.run(PAIR)
    singles = {name: case.run(name) for name in PAIR}
    for single in singles.values():
        assert np.abs(both - single).max() > 1e-4
    case.model.set_adapter(PAIR)
    case.model.merge_adapter(safe_merge=True)
    np.testing.assert_allclose(logits(case.model(**case.x)), both, rtol=1e-5, atol=1e-5)
    case.model.unmerge_adapter()
    assert_trees_close(case.model.params, case.base_params, atol=1e-5)
    np.testing.assert_allclose(case.run("balance"), singles["balance"], atol=1e-6)


def test_jit_matches_eager(case: Adapted) -> None:
    jitted = case.run(PAIR)
    eager = logits(case.model.apply_fn()(case.model.params, case.model.adapter_params, **case.x))
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)


def test_bf16_base_with_float32_adapters(case: Adapted) -> None:
    full = case.run(PAIR)
    bf16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), case.model.params)
    out = logits(case.model(**case.x, params=bf16))
    assert np.isfinite(out).all()
    assert jax.tree_util.tree_leaves(case.model.adapter_params["miss"])[0].dtype == jnp.float32
    # bf16 keeps ~3 significant digits; the adapted bf16 model still tracks the float32 one.
    assert np.abs(out - full).max() < 0.1 * np.abs(full).max() + 0.05


def adapter_grads(model: MissModel, x: dict[str, np.ndarray], params: Any = None) -> Any:
    """d(sum of squared logits)/d(trainable params) for the model's current plan, jit-compiled."""
    forward = model.apply_fn()
    params = model.params if params is None else params

    def loss(trainable: Any) -> jax.Array:
        return jnp.sum(forward(params, trainable, **x)[0] ** 2)

    return jax.jit(jax.grad(loss))(model.trainable_params())


def test_grads_reach_exactly_the_trainable_params(case: Adapted) -> None:
    case.model.set_adapter(PAIR)
    trainable = case.model.trainable_params()
    grads = adapter_grads(case.model, case.x)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
    assert set(grads["miss"]) == set(PAIR) and grads["modules_to_save"] == {} and grads["bias"] == {}
    for g, t in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(trainable)):
        assert g.shape == t.shape and np.isfinite(g).all()
        assert np.abs(np.asarray(g)).max() > 0


def test_delete_adapters(case: Adapted) -> None:
    balance = case.run("balance")
    for name in ("zero", "mini"):
        case.model.delete_adapter(name)
    assert list(case.model.peft_config) == ["balance", "bat"] and case.model.active_adapters == ["balance"]
    assert set(case.model.adapter_params["miss"]) == {"balance", "bat"}
    np.testing.assert_allclose(case.run("balance"), balance, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_grads() -> None:
    x = tm.inputs("llama")
    params = tm.flax_model("llama").params
    plain = get_peft_model(tm.flax_model("llama"), MissConfig(r=4, init_weights=False))
    remat_model = transformers.FlaxLlamaForCausalLM(tm.config("llama"), _do_init=False, gradient_checkpointing=True)
    remat = get_peft_model(remat_model, MissConfig(r=4, init_weights=False), params=params)
    remat.update_params(plain.trainable_params())
    jaxpr = str(jax.make_jaxpr(lambda p: remat.apply_fn()(params, p, **x)[0])(remat.trainable_params()))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    assert_trees_close(adapter_grads(remat, x), adapter_grads(plain, x), atol=1e-5)
