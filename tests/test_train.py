"""The train step (optax over the adapter pytree only) and orbax checkpoints, on tiny Llama and BERT."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny_models as tm
from miss_jax import MissConfig, get_peft_model
from miss_jax import train as T


def _batch(arch: str, **extra) -> dict:
    return {**{k: jnp.asarray(v) for k, v in tm.inputs(arch).items()}, **extra}


def _leaves_equal(a, b) -> bool:
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.fixture(scope="module")
def llama():
    model = tm.flax_model("llama")
    pm = get_peft_model(model, MissConfig(r=4, target_modules=["q_proj", "v_proj"], miss_dropout=0.1))
    return model, pm


def test_step_trains_only_adapter_and_loss_falls(llama):
    model, pm = llama
    base = jax.tree_util.tree_map(np.asarray, pm.params)
    tx = optax.adamw(1e-2)
    state = T.create_train_state(pm, tx)
    before = jax.tree_util.tree_map(np.asarray, state.trainable)
    step = T.make_train_step(pm, tx, T.causal_lm_loss)
    batch = _batch("llama")
    losses = []
    for i in range(12):
        state, loss = step(pm.params, state, batch, jax.random.PRNGKey(i))
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses
    assert int(state.step) == 12
    # every trainable leaf moved; the base params did not
    moved = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b), before, state.trainable)
    assert all(jax.tree_util.tree_leaves(moved))
    assert _leaves_equal(base, pm.params)
    # the trainable pytree holds the active adapter's blocks and nothing of the base model
    assert set(state.trainable["miss"]) == {"default"}
    assert state.trainable["modules_to_save"] == {} and state.trainable["bias"] == {}
    # written back, the trained adapter changes the model's output
    pm.update_params(state.trainable)
    with pm.disable_adapter():
        base_logits = pm(**tm.inputs("llama")).logits
    assert not np.allclose(pm(**tm.inputs("llama")).logits, base_logits, atol=1e-4)


def test_dropout_uses_the_callers_rng(llama):
    _, pm = llama
    pm.adapter_params = jax.tree_util.tree_map(lambda a: a + 0.5, pm.adapter_params)
    loss = jax.jit(T.make_loss_fn(pm, T.causal_lm_loss))
    batch = _batch("llama")
    a, b = (loss(pm.params, pm.trainable_params(), batch, jax.random.PRNGKey(k)) for k in (0, 1))
    again = loss(pm.params, pm.trainable_params(), batch, jax.random.PRNGKey(0))
    assert float(a) != float(b)  # dropout on the adapter path draws from the given key
    assert float(a) == float(again)
    evaluate = T.make_eval_step(pm, T.causal_lm_loss)
    assert float(evaluate(pm.params, pm.trainable_params(), batch)) == float(
        evaluate(pm.params, pm.trainable_params(), batch)
    )


def test_modules_to_save_and_bias_are_trained_too():
    pm = get_peft_model(
        tm.flax_model("bert"), MissConfig(r=4, modules_to_save=["classifier"], bias="MiSS_only", task_type="SEQ_CLS")
    )
    tx = optax.sgd(0.5)
    state = T.create_train_state(pm, tx)
    assert set(state.trainable["modules_to_save"]) == {"default"}
    bias_paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(state.trainable["bias"])]
    assert len(bias_paths) == 4  # query and value of 2 layers
    step = T.make_train_step(pm, tx, T.classification_loss)
    batch = _batch("bert", labels=jnp.array([0, 2]))
    old_head = np.asarray(state.trainable["modules_to_save"]["default"]["classifier"]["kernel"])
    old_bias = jax.tree_util.tree_map(np.asarray, state.trainable["bias"])
    new, _ = step(pm.params, state, batch, jax.random.PRNGKey(0))
    assert not np.allclose(new.trainable["modules_to_save"]["default"]["classifier"]["kernel"], old_head)
    assert not _leaves_equal(new.trainable["bias"], old_bias)
    # the step wrote them into the model; the base classifier stays as it was: the trained copy is the adapter's
    assert _leaves_equal(pm.trainable_params(), new.trainable)
    assert np.array_equal(pm.params["classifier"]["kernel"], old_head)


@pytest.mark.parametrize("freeze", [False, True])
def test_a_head_only_plan_trains_the_head(freeze):
    """A plan with the blocks off and the classifier copy on (the demo's baseline): its trainable tree has
    no block group, with or without a frozen adapter beside it."""
    import dataclasses

    pm = get_peft_model(tm.flax_model("bert"), MissConfig(r=4, modules_to_save=["classifier"], task_type="SEQ_CLS"))
    if freeze:
        pm.add_adapter("other", MissConfig(r=4))
        pm.set_adapter(["default", "other"])
        pm.set_requires_grad("other", False)
    head_only = dataclasses.replace(pm.plan, active=())
    tx = optax.sgd(0.5)
    head = jax.tree_util.tree_map(jnp.array, pm.trainable_params()["modules_to_save"])
    state = T.init_train_state(tx, {"modules_to_save": head})
    step = T.make_train_step(pm, tx, T.classification_loss, plan=head_only, update_model=False)
    old = np.asarray(state.trainable["modules_to_save"]["default"]["classifier"]["kernel"])
    new, loss = step(pm.params, state, _batch("bert", labels=jnp.array([0, 2])), jax.random.PRNGKey(0))
    assert np.isfinite(float(loss))
    assert not np.allclose(new.trainable["modules_to_save"]["default"]["classifier"]["kernel"], old)


def test_checkpoint_resume_gives_the_same_next_loss(llama, tmp_path):
    _, pm = llama
    tx = optax.adam(1e-2)
    step = T.make_train_step(pm, tx, T.causal_lm_loss, donate=False)
    batch = _batch("llama")
    state = T.create_train_state(pm, tx)
    for i in range(3):
        state, _ = step(pm.params, state, batch, jax.random.PRNGKey(i))
    path = T.save_checkpoint(str(tmp_path / "ckpt"), state, pm)
    assert path.endswith("/3") and T.latest_step(str(tmp_path / "ckpt")) == 3
    restored = T.restore_checkpoint(str(tmp_path / "ckpt"), T.create_train_state(pm, tx))
    assert int(restored.step) == 3 and _leaves_equal(restored.trainable, state.trainable)
    assert _leaves_equal(restored.opt_state, state.opt_state)
    _, next_loss = step(pm.params, state, batch, jax.random.PRNGKey(9))
    _, resumed_loss = step(pm.params, restored, batch, jax.random.PRNGKey(9))
    assert float(next_loss) == float(resumed_loss)
    meta = T.read_checkpoint_metadata(str(tmp_path / "ckpt"))
    assert meta["active"] == ["default"]
    with pytest.raises(ValueError, match=r"has no checkpoint step 2; it has \[3\]"):
        T.restore_checkpoint(str(tmp_path / "ckpt"), T.create_train_state(pm, tx), step=2)
    assert MissConfig.from_dict(meta["adapters"]["default"]) == pm.peft_config["default"]


def test_restore_from_an_empty_folder_is_a_clear_error(llama, tmp_path):
    _, pm = llama
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        T.restore_checkpoint(str(tmp_path), T.create_train_state(pm, optax.sgd(0.1)))


def test_causal_lm_loss_ignores_minus_100_labels():
    """transformers' convention: label -100 takes no part in the loss."""
    logits = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 5))
    ids = jnp.array([[1, 2, 3, 4]])
    out = type("Out", (), {"logits": logits})()
    masked = T.causal_lm_loss(out, {"input_ids": ids, "labels": jnp.array([[1, 2, -100, 4]])})
    expected = T.cross_entropy(logits[:, [0, 2]], jnp.array([[2, 4]]))
    assert abs(float(masked) - float(expected)) < 1e-6
    assert abs(float(T.causal_lm_loss(out, {"input_ids": ids})) - float(masked)) > 1e-4
