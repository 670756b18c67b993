"""Checked updates and clear errors (issue 12): bat unmerges that would write NaN, `update_params`, steps built
before a merge, dtypes that cannot hold weights, misleading messages, checkpoints that do not fit."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tiny_models as tm
from helpers import fill_blocks, snapshot
from miss_jax import MissConfig, get_peft_model, ops, train
from miss_jax.nnx import apply_miss, miss_layers

QV = ["q_proj", "v_proj"]


def llama(config: MissConfig, name: str = "default"):
    return get_peft_model(tm.flax_model("llama"), config, name)


def singular_bat(pm, name: str = "default", scale: float = -1.0) -> None:
    """Sets block row 0 of every bat block to `scale * I`: with -1, `I + B[0]` is the zero matrix."""
    blocks = pm.adapter_params["miss"][name]
    new = jax.tree_util.tree_map(lambda b: b.at[0].set(scale * jnp.eye(b.shape[-1], dtype=b.dtype)), blocks)
    pm.update_params({"miss": {name: new}})


def all_finite(tree) -> bool:
    return all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------- bat with a singular I + B


def test_safe_merge_refuses_a_singular_bat_adapter_and_changes_nothing() -> None:
    pm = llama(MissConfig(r=4, init_weights="bat", target_modules=QV))
    singular_bat(pm)
    before = snapshot(pm)
    with pytest.raises(ValueError, match=r"'default'.*I \+ B is singular or ill-conditioned"):
        pm.merge_adapter(safe_merge=True)
    assert snapshot(pm) == before


def test_safe_merge_refuses_an_ill_conditioned_bat_adapter() -> None:
    pm = llama(MissConfig(r=4, init_weights="bat", target_modules=QV))
    blocks = pm.adapter_params["miss"]["default"]
    # I + B[0] = diag(1, 1, 1, 1e-5): invertible, condition number 1e5
    near = jax.tree_util.tree_map(
        lambda b: b.at[0].set(jnp.diag(jnp.array([0.0] * (b.shape[-1] - 1) + [-(1 - 1e-5)], b.dtype))), blocks)
    pm.update_params({"miss": {"default": near}})
    assert ops.variant("bat").unmerge_problem(jax.tree_util.tree_leaves(near)[0]) is not None
    with pytest.raises(ValueError, match="condition number"):
        pm.merge_adapter(safe_merge=True)
    assert not pm.merged_adapters


@pytest.mark.parametrize("how", ["unmerge_adapter", "disable_adapter"])
def test_unmerging_a_singular_bat_adapter_never_writes_nan(how: str) -> None:
    pm = llama(MissConfig(r=4, init_weights="bat", target_modules=QV))
    singular_bat(pm)
    pm.merge_adapter()  # without safe_merge the merge itself is fine: W' = W + W B + B is finite
    merged = pm.params
    with pytest.raises(ValueError, match="NaNs or infs.*unmerging"):
        if how == "unmerge_adapter":
            pm.unmerge_adapter()
        else:
            with pm.disable_adapter():
                pass
    assert pm.params is merged and pm.merged_adapters == ["default"] and all_finite(pm.params)


def test_nnx_merge_and_unmerge_check_the_same_way() -> None:
    class Two(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.q_proj = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, x):
            return self.q_proj(x)

    model = apply_miss(Two(nnx.Rngs(0)), MissConfig(r=4, init_weights="bat", target_modules=["q_proj"]), nnx.Rngs(1))
    layer = miss_layers(model)["q_proj"]
    layer.miss_block["default"][...] = layer.miss_block["default"][...].at[0].set(-jnp.eye(4))
    with pytest.raises(ValueError, match="I \\+ B is singular"):
        layer.merge(safe_merge=True)
    layer.merge()
    kernel = layer.base_layer.kernel[...]
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.unmerge()
    assert layer.merged and bool(jnp.isfinite(layer.base_layer.kernel[...]).all())
    np.testing.assert_array_equal(layer.base_layer.kernel[...], kernel)


# --------------------------------------------------------------------------- update_params


def test_update_params_refuses_wrong_shapes_dtypes_names_and_paths() -> None:
    pm = llama(MissConfig(r=4, target_modules=QV))
    before = snapshot(pm)
    block = pm.adapter_params["miss"]["default"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["miss_block"]
    path = {"model": {"layers": {"0": {"self_attn": {"q_proj": {"miss_block": None}}}}}}

    def at(value):
        return {"miss": {"default": {"model": {"layers": {"0": {"self_attn": {"q_proj": {"miss_block": value}}}}}}}}

    cases = [
        (at(jnp.zeros((1, block.shape[1]))), r"q_proj/miss_block: float32\[1, 32\], expected float32\[4, 32\]"),
        (at(jnp.zeros(block.shape, jnp.bfloat16)), r"bfloat16\[4, 32\], expected float32"),
        (at("zeros"), "not an array"),
        ({"miss": {"nope": path}}, r"miss/nope/.*no such adapter param \(adapters: \['default'\]\)"),
        ({"blocks": {"x": jnp.zeros(1)}}, "not a leaf of the adapter pytree"),
    ]
    for update, message in cases:
        with pytest.raises(ValueError, match=message):
            pm.update_params(update)
        assert snapshot(pm) == before
    pm.update_params(at(jnp.ones_like(block)))
    assert float(pm.adapter_params["miss"]["default"]["model"]["layers"]["0"]["self_attn"]["q_proj"]
                 ["miss_block"].sum()) == block.size


# --------------------------------------------------------------------------- steps built before a merge


def test_a_step_built_before_a_merge_refuses_until_unmerged() -> None:
    pm = llama(MissConfig(r=4, target_modules=QV))
    fill_blocks(pm, "default", 0.05, seed=0)
    tx = optax.sgd(0.0)
    step = train.make_train_step(pm, tx, train.causal_lm_loss, donate=False)
    evaluate = train.make_eval_step(pm, train.causal_lm_loss)
    batch = {k: jnp.asarray(v) for k, v in tm.inputs("llama").items()}
    state = train.create_train_state(pm, tx)
    want = float(evaluate(pm.params, state.trainable, batch))
    pm.merge_adapter()
    for call in (lambda: step(pm.params, state, batch, jax.random.PRNGKey(0)),
                 lambda: evaluate(pm.params, state.trainable, batch)):
        with pytest.raises(ValueError, match=r"\['default'\] were merged.*twice.*unmerge_adapter"):
            call()
    pm.unmerge_adapter()
    assert float(evaluate(pm.params, state.trainable, batch)) == pytest.approx(want, abs=1e-6)


# --------------------------------------------------------------------------- saving and messages


def test_save_refuses_dtypes_that_cannot_hold_weights(tmp_path) -> None:
    pm = llama(MissConfig(r=4, target_modules=QV))
    with pytest.raises(ValueError, match="dtype=int8 cannot hold adapter weights"):
        pm.save_pretrained(str(tmp_path / "out"), dtype=jnp.int8)
    assert not os.path.exists(tmp_path / "out")


def test_safe_merge_blames_the_broken_adapter() -> None:
    pm = llama(MissConfig(r=4, target_modules=QV), "good")
    fill_blocks(pm, "good", 0.01, seed=0)
    pm.add_adapter("broken", MissConfig(r=4, target_modules=QV))
    nan = jax.tree_util.tree_map(lambda b: jnp.full_like(b, jnp.nan), pm.adapter_params["miss"]["broken"])
    pm.update_params({"miss": {"broken": nan}})
    with pytest.raises(ValueError, match=r"Adapter 'broken' cannot be merged safely.*NaN") as err:
        pm.merge_adapter(["good", "broken"], safe_merge=True)
    assert "'good'" not in str(err.value) and not pm.merged_adapters


def test_exclusions_that_remove_every_target_say_so() -> None:
    with pytest.raises(ValueError, match=r"Every module that target_modules \['q_proj'\] matches is excluded") as e:
        llama(MissConfig(r=4, target_modules=["q_proj"], exclude_modules=["q_proj"]))
    assert "Did you mean" not in str(e.value)


def test_peft_style_scalars_and_strings_are_accepted(tmp_path) -> None:
    config = MissConfig(r=np.int64(4), mini_r=np.int32(2), target_modules=QV, modules_to_save="lm_head")
    assert (config.r, config.mini_r, config.modules_to_save) == (4, 2, ("lm_head",))
    assert type(config.r) is int
    pm = llama(config)
    pm.save_pretrained(str(tmp_path), selected_adapters="default")
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("name", ["a\0b", "x" * 300])
def test_adapter_names_that_cannot_be_folders_are_refused_at_once(name: str) -> None:
    pm = llama(MissConfig(r=4, target_modules=QV))
    with pytest.raises(ValueError, match="cannot be a folder name"):
        pm.add_adapter(name, MissConfig(r=4, target_modules=QV))
    assert list(pm.peft_config) == ["default"]


# --------------------------------------------------------------------------- checkpoints


def saved_checkpoint(tmp_path) -> tuple[str, object, train.TrainState]:
    pm = llama(MissConfig(r=4, target_modules=QV))
    state = train.create_train_state(pm, optax.adam(1e-3))
    folder = str(tmp_path / "ckpt")
    train.save_checkpoint(folder, state, pm)
    return folder, pm, state


def test_an_empty_step_folder_is_not_a_checkpoint(tmp_path) -> None:
    folder, _, state = saved_checkpoint(tmp_path)
    os.makedirs(os.path.join(folder, "5"))
    assert train.latest_step(folder) == 0
    restored = train.restore_checkpoint(folder, state)
    assert int(restored.step) == 0


def test_a_checkpoint_of_another_shape_names_the_leaves(tmp_path) -> None:
    folder, _, _ = saved_checkpoint(tmp_path)
    other = llama(MissConfig(r=8, target_modules=QV))
    with pytest.raises(ValueError, match=r"does not fit the template.*q_proj/miss_block: \(4, 32\) saved, \(8, 32\)"):
        train.restore_checkpoint(folder, train.create_train_state(other, optax.adam(1e-3)))


def test_restoring_from_a_missing_folder_creates_nothing(tmp_path) -> None:
    _, pm, state = saved_checkpoint(tmp_path)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="No checkpoint folder"):
        train.restore_checkpoint(missing, state)
    assert not os.path.exists(missing)


# --------------------------------------------------------------------------- review fixes


def test_deleting_the_bias_adapter_keeps_the_biases_it_trained() -> None:
    """PEFT trains biases in place, so they outlive the adapter; so do miss-jax's (written into the base)."""
    pm = get_peft_model(tm.flax_model("bert"), MissConfig(r=4, bias="MiSS_only", target_modules=["query", "value"]))
    trained = jax.tree_util.tree_map(lambda b: b + 0.5, pm.adapter_params["bias"])
    pm.update_params({"bias": trained})
    x = tm.inputs("bert")
    before = np.asarray(pm(**x).logits)  # zero blocks: the adapter adds nothing but its trained biases
    with pytest.warns(UserWarning, match="was active which is now deleted"):
        pm.add_adapter("other", MissConfig(r=4, target_modules=["query"]))
        pm.delete_adapter("default")
    np.testing.assert_allclose(np.asarray(pm(**x).logits), before, atol=1e-6)
    assert not jax.tree_util.tree_leaves(pm.adapter_params["bias"])


def test_trainable_count_survives_a_merge_and_lora_export_keeps_the_dtype(tmp_path) -> None:
    from safetensors import safe_open

    pm = llama(MissConfig(r=4, target_modules=QV))
    count = pm.get_nb_trainable_parameters()[0]
    pm.merge_adapter()
    assert pm.get_nb_trainable_parameters()[0] == count > 0  # PEFT counts requires_grad params, merged or not
    pm.unmerge_adapter()
    pm.save_pretrained(str(tmp_path), as_lora=True, dtype=jnp.bfloat16)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_a_shapes_only_adapter_cannot_start_training() -> None:
    pm = get_peft_model(tm.flax_model("llama"), MissConfig(r=4, target_modules=QV), low_cpu_mem_usage=True)
    with pytest.raises(ValueError, match="low_cpu_mem_usage=True and has no weights yet"):
        train.create_train_state(pm, optax.adam(1e-3))


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_merging_in_two_calls_equals_the_unmerged_forward(framework: str) -> None:
    """balance merged first, then a bat adapter on the same layers: the kernel is redone in composition order
    (bat first), so merged equals unmerged, in both transforms."""
    bal = MissConfig(r=4, init_weights=False, target_modules=["q_proj"])
    bat = MissConfig(r=4, init_weights="bat", target_modules=["q_proj"])
    if framework == "linen":
        pm = llama(bal, "a")
        pm.add_adapter("b", bat)
        fill_blocks(pm, "b", 0.1, seed=3)
        x = {"input_ids": tm.inputs("llama")["input_ids"]}
        run = lambda: np.asarray(pm(**x).logits)  # noqa: E731
    else:
        from miss_jax.nnx import get_peft_model as nnx_peft

        class Two(nnx.Module):
            def __init__(self, rngs: nnx.Rngs):
                self.q_proj = nnx.Linear(8, 8, rngs=rngs)

            def __call__(self, x):
                return self.q_proj(x)

        pm = nnx_peft(Two(nnx.Rngs(0)), bal, "a", rngs=nnx.Rngs(1))
        pm.add_adapter("b", bat)
        (layer,) = miss_layers(pm).values()
        layer.miss_block["b"][...] = 0.1 * jax.random.normal(jax.random.PRNGKey(3), layer.miss_block["b"][...].shape)
        x = jnp.ones((2, 8)) * jnp.arange(8)
        run = lambda: np.asarray(pm(x))  # noqa: E731
    pm.set_adapter(["a", "b"])
    unmerged = run()
    pm.set_adapter(["a"])  # balance alone cannot be merged under an active unmerged bat (test_hostile_review.py)
    pm.merge_adapter(["a"])
    pm.merge_adapter(["b"])
    pm.set_adapter(["a", "b"])
    np.testing.assert_allclose(run(), unmerged, atol=1e-5)
    pm.unmerge_adapter()
    np.testing.assert_allclose(run(), unmerged, atol=1e-5)


def test_nnx_refuses_a_second_bias_adapter_as_peft_does() -> None:
    from miss_jax.nnx import get_peft_model as nnx_peft

    class Two(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.q_proj = nnx.Linear(8, 8, rngs=rngs)
            self.v_proj = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, x):
            return self.v_proj(self.q_proj(x))

    pm = nnx_peft(Two(nnx.Rngs(0)), MissConfig(r=4, bias="all", target_modules=["q_proj"]), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"supports only 1 adapter with bias \(adapter 'default' has bias='all'\)"):
        pm.add_adapter("other", MissConfig(r=4, bias="MiSS_only", target_modules=["v_proj"]))
    assert list(pm.peft_config) == ["default"]
