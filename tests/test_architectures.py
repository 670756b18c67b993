"""PEFT's generic MiSS checks, in JAX, on every tiny architecture of `tiny_models.ARCHS`.

One `MissModel` per architecture carries four adapters on the same layers: `zero` (balance, PEFT's
default zero init), `balance` (random init), `mini` and `bat` (blocks set by hand: PEFT inits them
to zeros, which would make the checks vacuous). Each distinct active set compiles once per
architecture, so the checks share compiled forwards (the bf16 and deleting checks run un-jitted, on
ops already compiled); the deleting check runs last in the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import tiny_models as tm
from miss_jax import MissConfig, MissModel, get_peft_model
from helpers import assert_trees_close, fill_blocks, logits

VARIANTS = {"zero": True, "balance": False, "mini": "mini", "bat": "bat"}
PAIR = ["balance", "bat"]  # the two-adapter combination: additive term on top of a bat-adapted weight

# The merge / unmerge / safe_merge set runs on two variants per architecture (each variant on at least
# five); every architecture also merges and unmerges the balance + bat pair in the two-adapter check.
MERGE_VARIANTS = {
    "llama": ("mini", "bat"), "mistral": ("mini", "bat"), "gemma": ("mini", "bat"), "gpt2": ("balance", "bat"),
    "gpt_neo": ("zero", "mini"), "opt": ("balance", "bat"), "bert": ("balance", "mini"),
    "roberta": ("zero", "balance"), "t5": ("zero", "balance"), "bart": ("zero", "balance"), "vit": ("zero", "bat"),
}
MERGE_CASES = [(arch, variant) for arch in tm.ARCHS for variant in MERGE_VARIANTS[arch]]


@dataclasses.dataclass
class Adapted:
    """An architecture's adapted model, its inputs, and the base model's own output on them."""

    arch: str
    model: MissModel
    x: dict[str, np.ndarray]
    base: np.ndarray
    base_params: Any

    def run(self, active: str | list[str]) -> np.ndarray:
        """Logits of the jitted forward with `active` set."""
        self.model.set_adapter(active)
        return logits(self.model(**self.x))

    def eager(self, params: Any = None) -> np.ndarray:
        """Logits of the un-jitted forward (`apply_fn`) of the current plan."""
        params = self.model.params if params is None else params
        return logits(self.model.apply_fn()(params, self.model.adapter_params, **self.x))


def build(arch: str) -> Adapted:
    """The four adapters (r=4, mini_r=2) on the architecture's default (or explicit) targets."""
    base_model = tm.flax_model(arch)
    x = tm.inputs(arch)
    targets = tm.targets(arch)
    model = get_peft_model(base_model, MissConfig(r=4, init_weights=True, target_modules=targets), "zero")
    for name, init in list(VARIANTS.items())[1:]:
        model.add_adapter(name, MissConfig(r=4, mini_r=2, init_weights=init, target_modules=targets))
    fill_blocks(model, "mini", 0.1, seed=1)
    fill_blocks(model, "bat", 0.1, seed=2)
    return Adapted(arch, model, x, logits(base_model(**x)), base_model.params)


@pytest.fixture(scope="module")
def adapted() -> Callable[[str], Adapted]:
    """`adapted(arch)`: the architecture's model, built once per module, handed out unmerged with its first
    adapter active. Models stay alive across tests so each compiled forward is reused."""
    cache: dict[str, Adapted] = {}

    def get(arch: str) -> Adapted:
        if arch not in cache:
            cache[arch] = build(arch)
        case = cache[arch]
        if case.model.merged_adapters:
            case.model.unmerge_adapter()
        case.model.set_adapter(next(iter(case.model.peft_config)))
        return case

    return get


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_init_and_disable(adapted: Callable[[str], Adapted], arch: str) -> None:
    case = adapted(arch)
    np.testing.assert_allclose(case.run("zero"), case.base, atol=1e-5)
    assert np.abs(case.run("balance") - case.base).max() > 1e-3
    with case.model.disable_adapter():
        np.testing.assert_allclose(logits(case.model(**case.x)), case.base, atol=1e-5)


@pytest.mark.parametrize("arch,variant", MERGE_CASES)
def test_merge_unmerge_and_safe_merge(adapted: Callable[[str], Adapted], arch: str, variant: str) -> None:
    case = adapted(arch)
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
        with pytest.raises(ValueError, match=f"Adapter '{variant}' cannot be merged safely.*NaN or inf"):
            model.merge_adapter(safe_merge=True)
        assert model.params is params and model.merged_adapters == []
    finally:
        model.adapter_params["miss"][variant] = good


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_two_adapters_combine_switch(adapted: Callable[[str], Adapted], arch: str) -> None:
    case = adapted(arch)
    balance = case.run("balance")
    both = case.run(PAIR)
    assert np.abs(both - balance).max() > 1e-4 and np.abs(both - case.base).max() > 1e-4
    case.model.set_adapter(PAIR)
    case.model.merge_adapter(safe_merge=True)
    np.testing.assert_allclose(logits(case.model(**case.x)), both, rtol=1e-5, atol=1e-5)
    case.model.unmerge_adapter()
    assert_trees_close(case.model.params, case.base_params, atol=1e-5)
    np.testing.assert_allclose(case.run("balance"), balance, atol=1e-5)


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_jit_matches_eager(adapted: Callable[[str], Adapted], arch: str) -> None:
    case = adapted(arch)
    jitted = case.run(PAIR)
    np.testing.assert_allclose(case.eager(), jitted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_bf16_base_with_float32_adapters(adapted: Callable[[str], Adapted], arch: str) -> None:
    case = adapted(arch)
    full = case.run(PAIR)
    bf16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), case.model.params)
    out = case.eager(bf16)  # un-jitted: the ops are cached from the float32 runs, no whole-model compile
    assert np.isfinite(out).all()
    assert jax.tree_util.tree_leaves(case.model.adapter_params["miss"])[0].dtype == jnp.float32
    # bf16 keeps ~3 significant digits; the adapted bf16 model still tracks the float32 one.
    assert np.abs(out - full).max() < 0.1 * np.abs(full).max() + 0.05


def adapter_grads(model: MissModel, x: dict[str, np.ndarray]) -> Any:
    """d(sum of squared logits)/d(trainable params) for the model's current plan, jit-compiled."""
    forward = model.apply_fn()

    def loss(trainable: Any) -> jax.Array:
        return jnp.sum(forward(model.params, trainable, **x)[0] ** 2)

    return jax.jit(jax.grad(loss))(model.trainable_params())


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_grads_reach_exactly_the_trainable_params(adapted: Callable[[str], Adapted], arch: str) -> None:
    case = adapted(arch)
    case.model.set_adapter(PAIR)
    trainable = case.model.trainable_params()
    grads = adapter_grads(case.model, case.x)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
    assert set(grads["miss"]) == set(PAIR) and grads["modules_to_save"] == {} and grads["bias"] == {}
    for g, t in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(trainable)):
        assert g.shape == t.shape and np.isfinite(g).all()
        assert np.abs(np.asarray(g)).max() > 0


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_delete_adapters(adapted: Callable[[str], Adapted], arch: str) -> None:
    """Runs last: it leaves the architecture's model with one adapter (checked un-jitted: no new compile)."""
    case = adapted(arch)
    case.model.set_adapter(PAIR)
    both = case.eager()
    for name in ("zero", "mini"):
        case.model.delete_adapter(name)
    assert list(case.model.peft_config) == PAIR and case.model.active_adapters == PAIR
    assert set(case.model.adapter_params["miss"]) == set(PAIR)
    np.testing.assert_allclose(case.eager(), both, atol=1e-6)
    case.model.delete_adapter("bat")
    assert case.model.active_adapters == ["balance"] and list(case.model.adapter_params["miss"]) == ["balance"]


def test_gradient_checkpointing_gives_the_same_grads() -> None:
    """transformers' Flax Llama has no gradient checkpointing (4.x); BERT's does (nn.remat per layer)."""
    x = tm.inputs("bert")
    params = tm.flax_model("bert").params
    plain = get_peft_model(tm.flax_model("bert"), MissConfig(r=4, init_weights=False))
    remat_model = transformers.FlaxBertForSequenceClassification(tm.config("bert"), _do_init=False)
    remat_model.enable_gradient_checkpointing()
    remat = get_peft_model(remat_model, MissConfig(r=4, init_weights=False), params=params)
    remat.update_params(plain.trainable_params())
    jaxpr = str(jax.make_jaxpr(lambda p: remat.apply_fn()(params, p, **x)[0])(remat.trainable_params()))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    assert_trees_close(adapter_grads(remat, x), adapter_grads(plain, x), atol=1e-5)
