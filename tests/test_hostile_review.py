"""Issue 22's hostile review, one class of silent wrong result per section: compiled programs keyed on
everything that changes what they compute (and bounded, freed with their model); merges that never change
what the model computes (Linen and NNX, one rule); NNX training, loading and saving held to the Linen
path's checks; donated train states that never hold the model's own arrays nor get refused after the
donation; and named errors instead of raw tracebacks."""

from __future__ import annotations

import gc
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

import tiny_models as tm
from helpers import fill_blocks, logits, snapshot
from interop import nnx_io
from interop import safetensors_io as files
from interop.cli import main
from miss_jax import MissConfig, MissModel, get_peft_model, losses, programs
from miss_jax import train as T
from miss_jax.adapters import MergeStateError
from miss_jax.nnx import get_peft_model as nnx_peft_model
from test_nnx import X as NNX_X
from test_nnx import base_model as nnx_base, randomize

QV = ["q_proj", "v_proj"]


def _llama(vocab_extra: int, seed: int = 0):
    """A fresh tiny Llama with a vocabulary of its own (its own configuration: no program shared with other
    tests), seeded."""
    config = tm.config("llama")
    config.vocab_size += vocab_extra
    return transformers.FlaxLlamaForCausalLM(config, seed=seed)


IDS = tm.inputs("llama")["input_ids"]


# ----------------------------------------------------------------------------- 1. stale compiled programs


def test_a_config_edit_after_the_first_call_is_honoured_as_by_the_plain_model():
    pm = get_peft_model(_llama(31), MissConfig(r=4, target_modules=QV))
    assert pm(input_ids=IDS).hidden_states is None
    pm.config.output_hidden_states = True
    out = pm(input_ids=IDS)
    assert out.hidden_states is not None and len(out.hidden_states) == 3
    pm.config.output_hidden_states = False


def test_editing_one_models_config_leaves_a_twin_of_the_same_configuration_alone():
    a, b = (get_peft_model(_llama(37), MissConfig(r=4, target_modules=QV)) for _ in range(2))
    before = logits(b(input_ids=IDS))
    np.testing.assert_allclose(logits(a(input_ids=IDS)), before, atol=0)  # one shared program, same weights
    a.config.rms_norm_eps = 0.5
    edited = logits(a(input_ids=IDS))
    np.testing.assert_allclose(edited, logits(a.base_model(input_ids=IDS)), atol=1e-5)  # the plain model's answer
    assert np.abs(edited - before).max() > 1e-2
    np.testing.assert_allclose(logits(b(input_ids=IDS)), before, atol=0)  # the twin kept its own program
    longer = np.concatenate([IDS, IDS], axis=1)  # a shape compiled after the edit
    np.testing.assert_allclose(logits(b(input_ids=longer)), logits(b.base_model(input_ids=longer)), atol=1e-5)


def test_a_train_step_refuses_a_config_edited_after_it_was_built():
    pm = get_peft_model(_llama(41), MissConfig(r=4, target_modules=QV))
    tx = optax.sgd(1e-2)
    state = T.create_train_state(pm, tx)
    step = T.make_train_step(pm, tx, T.causal_lm_loss)
    pm.config.rms_norm_eps = 0.5
    with pytest.raises(ValueError, match="config was edited after this step was built"):
        step(pm.params, state, {"input_ids": jnp.asarray(IDS)}, jax.random.PRNGKey(0))
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(state))


def test_program_caches_are_bounded_and_programs_are_freed_with_their_model():
    cache = programs.ProgramCache(2)
    traced = []

    class Model:
        pass

    def build(current):
        return jax.jit(lambda x: (traced.append(current()), x + 1)[1])

    m = Model()
    for n in range(5):
        cache.get(m, ("k", n), build)(jnp.zeros(n))
    assert cache.count(m) == 2 and len(traced) == 5
    del m, traced[:]
    gc.collect()
    assert cache.count() == 0

    held = programs.cached_programs()
    pm = get_peft_model(_llama(43), MissConfig(r=4, target_modules=QV))
    for length in (3, 4, 5):
        pm(input_ids=IDS[:, :length])
    assert programs.cached_programs(pm.base_model) == 3
    assert programs.cached_programs() == held + 3
    del pm
    gc.collect()
    assert programs.cached_programs() == held


def _generating_pair(vocab_extra: int):
    """A MissModel whose adapter computes the identity (balance blocks start at zero) and a plain model with
    the same weights, each with its own config object."""
    pm = get_peft_model(_llama(vocab_extra), MissConfig(r=4, target_modules=QV))
    plain = _llama(vocab_extra)
    return pm, plain


def test_generate_honours_an_edited_model_config_as_transformers_does():
    pm, plain = _generating_pair(47)
    first = np.asarray(pm.generate(IDS, max_new_tokens=6).sequences)
    eos = int(first[0, IDS.shape[1] + 1])  # the second new token of the first row
    pm.config.eos_token_id = eos
    plain.config.eos_token_id = eos
    with pytest.warns(UserWarning, match="modified the pretrained model configuration"):
        ours = np.asarray(pm.generate(IDS, max_new_tokens=6).sequences)
    with pytest.warns(UserWarning, match="modified the pretrained model configuration"):
        theirs = np.asarray(plain.generate(IDS, max_new_tokens=6).sequences)
    np.testing.assert_array_equal(ours, theirs)
    assert (ours != first).any()  # the first row stopped at eos (then padding)


def test_generate_checks_positions_against_a_max_length_set_in_the_model_config():
    pm, _ = _generating_pair(53)
    pm.config.max_length = 100  # more than the 64 positions
    with pytest.raises(ValueError, match="Generation needs 100 positions but .* has 64"), pytest.warns(UserWarning):
        pm.generate(IDS)


# ----------------------------------------------------------------------------- 2. partial merges


def _balance_and_bat():
    pm = get_peft_model(tm.flax_model("llama"), MissConfig(r=4, init_weights=False, target_modules=["q_proj"]))
    pm.add_adapter("bat", MissConfig(r=4, init_weights="bat", target_modules=["q_proj"]))
    fill_blocks(pm, "bat", 0.05, seed=3)
    pm.set_adapter(["default", "bat"])
    return pm


def test_linen_refuses_a_merge_that_would_change_the_outputs():
    pm = _balance_and_bat()
    x = tm.inputs("llama")
    unmerged = logits(pm(**x))
    before = snapshot(pm)
    with pytest.raises(MergeStateError, match=r"bat\(W \+ dW\).*merge_adapter\(\['default', 'bat'\]\)"):
        pm.merge_adapter(["default"])
    assert snapshot(pm) == before
    pm.merge_adapter(["default", "bat"])
    np.testing.assert_allclose(logits(pm(**x)), unmerged, atol=1e-5)
    pm.unmerge_adapter()
    pm.set_adapter(["default"])
    pm.merge_adapter(["default"])  # bat inactive: exact
    with pytest.raises(MergeStateError, match="set_adapter refused"):
        pm.set_adapter(["default", "bat"])
    assert pm.active_adapters == ["default"]


def test_nnx_refuses_the_same_merge_with_the_same_rule():
    pm = nnx_peft_model(nnx_base(), MissConfig(r=4, target_modules=["q_proj"]))
    pm.add_adapter("bat", MissConfig(r=4, init_weights="bat", target_modules=["q_proj"]))
    randomize(pm.base_model)
    pm.set_adapter(["default", "bat"])
    unmerged = pm(NNX_X)
    with pytest.raises(MergeStateError, match=r"bat\(W \+ dW\)"):
        pm.merge_adapter(["default"])
    assert pm.merged_adapters == []
    np.testing.assert_allclose(pm(NNX_X), unmerged, atol=0)
    pm.merge_adapter(["default", "bat"])
    np.testing.assert_allclose(pm(NNX_X), unmerged, atol=1e-5)
    pm.unmerge_adapter()
    pm.set_adapter(["default"])
    pm.merge_adapter(["default"])
    with pytest.raises(MergeStateError, match="set_adapter refused"):
        pm.set_adapter(["default", "bat"])


def test_merge_and_unload_of_some_adapters_gives_peft_result_and_leaves_the_model_unmerged():
    pm = _balance_and_bat()
    x = tm.inputs("llama")
    pm.set_adapter(["default"])
    only_default = logits(pm(**x))
    pm.set_adapter(["default", "bat"])
    both = logits(pm(**x))
    model, params = pm.merge_and_unload(adapter_names=["default"], return_params=True)
    np.testing.assert_allclose(logits(model(**x, params=params)), only_default, atol=1e-5)
    assert pm.merged_adapters == []
    np.testing.assert_allclose(logits(pm(**x)), both, atol=1e-6)


# ----------------------------------------------------------------------------- 3. NNX training while merged


def test_nnx_refuses_to_train_while_merged():
    pm = nnx_peft_model(nnx_base(), MissConfig(r=4, target_modules=QV))
    randomize(pm.base_model)
    taken = pm.trainable  # a filter taken before the merge
    pm.merge_adapter()
    with pytest.raises(ValueError, match="merged; call unmerge_adapter"):
        pm.trainable_paths()
    with pytest.raises(ValueError, match="merged; call unmerge_adapter"):
        nnx.Optimizer(pm, optax.adamw(1e-2, weight_decay=0.1), wrt=pm.trainable)
    with pytest.raises(ValueError, match="was merged at .* after this trainable filter was taken"):
        nnx.Optimizer(pm, optax.adamw(1e-2, weight_decay=0.1), wrt=taken)
    assert pm.get_nb_trainable_parameters()[0] > 0  # merged blocks still count, as PEFT's
    pm.unmerge_adapter()
    nnx.Optimizer(pm, optax.adamw(1e-2), wrt=taken)


# ----------------------------------------------------------------------------- 4. NNX folders, as the Linen loader


MAP = nnx_io.NameMap(((r"layers\.(\d+)\.(q|k|v|o)_proj", r"model.layers.\1.self_attn.\2_proj"),
                      (r"(up|down)_proj", r"model.mlp.\1_proj")))


@pytest.fixture(scope="module")
def nnx_folder(tmp_path_factory):
    pm = nnx_peft_model(nnx_base(), MissConfig(r=4, target_modules=QV))
    randomize(pm.base_model)
    folder = tmp_path_factory.mktemp("nnx") / "adapter"
    nnx_io.save_pretrained(pm, str(folder), MAP)
    return folder


def _edited(src, dst, edit) -> str:
    os.makedirs(dst)
    files.write_config(os.path.join(dst, files.CONFIG_NAME), files.read_config(str(src)))
    tensors = {k: np.asarray(v) for k, v in files.read_tensors(str(src)).items()}
    edit(tensors)
    files.write_tensors(os.path.join(dst, files.WEIGHTS_NAME), tensors)
    return str(dst)


def test_nnx_loader_refuses_a_bias_its_config_does_not_train(nnx_folder, tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"
    folder = _edited(nnx_folder, tmp_path / "biased", lambda t: t.__setitem__(key, np.full(16, 7.0, np.float32)))
    model = nnx_base()
    with pytest.raises(ValueError, match=r"a bias for \['layers.0.q_proj'\].*bias='none'"):
        MissModel.from_pretrained(model, folder, name_map=MAP)
    np.testing.assert_allclose(model(NNX_X), nnx_base()(NNX_X), atol=0)


def test_nnx_loader_refuses_a_folder_missing_targeted_blocks(nnx_folder, tmp_path):
    key = "base_model.model.model.layers.1.self_attn.v_proj.miss_block"
    folder = _edited(nnx_folder, tmp_path / "short", lambda t: t.pop(key))
    pm = nnx_peft_model(nnx_base(), MissConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"no miss_block for \['layers.1.v_proj'\]"):
        nnx_io.load_adapter(pm, folder, "other", MAP)
    assert list(pm.adapters) == ["default"]
    every = _edited(nnx_folder, tmp_path / "empty", lambda t: [t.pop(k) for k in list(t)])
    with pytest.raises(ValueError, match="no miss_block for"):
        MissModel.from_pretrained(nnx_base(), every, name_map=MAP)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.bool_])
def test_nnx_save_refuses_integer_dtypes(tmp_path, dtype):
    pm = nnx_peft_model(nnx_base(), MissConfig(r=4, target_modules=QV))
    with pytest.raises(ValueError, match="cannot hold adapter weights"):
        nnx_io.save_pretrained(pm, str(tmp_path / "x"), MAP, dtype=dtype)
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("name", ["a" * 300, "nul\0name"])
def test_both_paths_refuse_an_adapter_name_no_folder_can_take(name):
    nnx_model = nnx_peft_model(nnx_base(), MissConfig(r=4, target_modules=QV))
    linen_model = get_peft_model(tm.flax_model("llama"), MissConfig(r=4, target_modules=QV))
    for pm in (nnx_model, linen_model):
        with pytest.raises(ValueError, match="cannot be a folder name"):
            pm.add_adapter(name, MissConfig(r=4, target_modules=QV))
        assert list(pm.peft_config) == ["default"]


# ----------------------------------------------------------------------------- 5. donated state


def _saving_model():
    return get_peft_model(tm.flax_model("llama"), MissConfig(r=4, target_modules=QV, modules_to_save=["lm_head"]))


@pytest.mark.parametrize("update_model", [True, False])
def test_a_donating_step_never_deletes_the_models_own_arrays(update_model):
    pm = _saving_model()
    x = tm.inputs("llama")
    before = logits(pm(**x))
    head = np.asarray(pm.params["lm_head"]["kernel"])
    tx = optax.adamw(1e-3)
    step = T.make_train_step(pm, tx, T.causal_lm_loss, update_model=update_model)
    batch = {"input_ids": jnp.asarray(x["input_ids"])}
    # the public init, and a state built by hand from the model's very arrays
    for state in (T.init_train_state(tx, pm.trainable_params()),
                  T.TrainState(jnp.zeros((), jnp.int32), pm.trainable_params(), tx.init(pm.trainable_params()))):
        state, _ = step(pm.params, state, batch, jax.random.PRNGKey(0))
        np.testing.assert_array_equal(np.asarray(pm.params["lm_head"]["kernel"]), head)
        out = logits(pm(**x))  # no "Array has been deleted"
        if not update_model:
            np.testing.assert_allclose(out, before, atol=0)


def test_a_step_refuses_a_replaced_adapter_before_donating_the_state():
    pm = get_peft_model(tm.flax_model("llama"), MissConfig(r=4, target_modules=QV))
    tx = optax.sgd(1e-2)
    state = T.create_train_state(pm, tx)
    step = T.make_train_step(pm, tx, T.causal_lm_loss)
    pm.add_adapter("spare", MissConfig(r=4, target_modules=QV))
    pm.set_adapter("spare")
    pm.delete_adapter("default")
    pm.add_adapter("default", MissConfig(r=8, init_weights="bat", target_modules=QV))
    pm.set_adapter("default")
    with pytest.raises(ValueError, match="deleted and added again"):
        step(pm.params, state, {"input_ids": jnp.asarray(IDS)}, jax.random.PRNGKey(0))
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(state))


# ----------------------------------------------------------------------------- 6. named errors


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True])
def test_chunked_loss_refuses_a_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        losses.ChunkedCausalLMLoss(chunk_size=chunk_size)


def test_a_list_batch_with_accumulation_is_named():
    with pytest.raises(ValueError, match="'input_ids' is a list, not an array"):
        T.micro_batches({"input_ids": [[1, 2], [3, 4]]}, 2)


def test_cli_names_a_negative_seed(capsys):
    code = main(["check", "--base", "nowhere", "--adapter", "nowhere", "--seed", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "--seed" in err and "non-negative" in err
