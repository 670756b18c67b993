"""A PEFT user's habits on miss-jax (issue 13): the trained adapter is what gets saved, PEFT's names and
keywords work (or fail naming the miss-jax way), PEFT's semantics for bias / modules_to_save / LoRA ranks,
the model card, and multi-host saving through `save_pretrained` alone. Results that PEFT returns as data
are compared with PEFT's own on the torch twin."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

import tiny_models as tm
from helpers import logits
from interop_helpers import ATOL, load_in_torch, perturb_trainables, torch_inputs, torch_twin
from interop.names import BLOCK, torch_leaf
from miss_jax import MissConfig, MissModel, get_peft_model
from miss_jax import sharding as S
from miss_jax import train as T

QV = ["q_proj", "v_proj"]


def _batch(arch: str) -> dict:
    return {k: jnp.asarray(v) for k, v in tm.inputs(arch).items()}


def _np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


# --------------------------------------------------------------------------- 1. the trained adapter is saved


def test_the_step_writes_the_trained_adapter_into_the_model(tmp_path):
    pm = get_peft_model(tm.flax_model("llama"), MissConfig(r=4, target_modules=QV))
    tx = optax.adam(1e-2)
    state = T.create_train_state(pm, tx)
    step = T.make_train_step(pm, tx, T.causal_lm_loss)
    for i in range(3):
        state, _ = step(pm.params, state, _batch("llama"), jax.random.PRNGKey(i))
        # the model holds this step's trainables, by reference (the next step donates them, then replaces them)
        assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(pm.trainable_params()),
                                          jax.tree_util.tree_leaves(state.trainable)))
    trained = _np(state.trainable)
    assert np.abs(trained["miss"]["default"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["miss_block"]).max() > 0
    pm.save_pretrained(str(tmp_path))  # no update_params: PEFT users never call one
    loaded = MissModel.from_pretrained(tm.flax_model("llama"), str(tmp_path))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                           loaded.adapter_params["miss"], trained["miss"])
    np.testing.assert_allclose(logits(loaded(**tm.inputs("llama"))), logits(pm(**tm.inputs("llama"))), atol=1e-6)


def test_update_model_false_trains_beside_the_model():
    pm = get_peft_model(tm.flax_model("llama"), MissConfig(r=4, target_modules=QV))
    before = _np(pm.adapter_params)
    tx = optax.sgd(0.5)
    step = T.make_train_step(pm, tx, T.causal_lm_loss, update_model=False)
    state, _ = step(pm.params, T.create_train_state(pm, tx), _batch("llama"), jax.random.PRNGKey(0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, _np(pm.adapter_params), before)
    assert not np.array_equal(jax.tree_util.tree_leaves(_np(state.trainable))[0], jax.tree_util.tree_leaves(before)[0])


# --------------------------------------------------------------------------- 2. PEFT's names


@pytest.mark.parametrize("arch, labels", [
    ("llama", np.array([[5, 9, -100, 7, 3, 11, 4, 2], [8, 1, 6, -100, -100, 3, 3, 9]])),
    ("bert", np.array([2, 0])),
])
def test_labels_give_the_loss_transformers_torch_models_give(arch, labels, tmp_path):
    pm = get_peft_model(tm.flax_model(arch), MissConfig(r=4, init_weights=False, target_modules=tm.targets(arch)))
    perturb_trainables(pm, 0)
    pm.save_pretrained(str(tmp_path))
    with torch.no_grad():
        expected = load_in_torch(arch, str(tmp_path))(**torch_inputs(arch), labels=torch.from_numpy(labels).long())
    out = pm(**tm.inputs(arch), labels=labels)
    assert float(out.loss) == pytest.approx(expected.loss.item(), rel=1e-5, abs=1e-5)
    as_tuple = pm(**tm.inputs(arch), labels=labels, return_dict=False)
    assert float(as_tuple[0]) == pytest.approx(expected.loss.item(), rel=1e-5, abs=1e-5)  # loss first, as in torch


def test_labels_on_other_heads_name_the_call_to_use():
    pm = get_peft_model(tm.flax_model("t5"), MissConfig(r=4))
    with pytest.raises(ValueError, match=r"make_train_step\(peft_model, tx, my_loss\)"):
        pm(**tm.inputs("t5"), labels=tm.inputs("t5")["decoder_input_ids"])


def test_train_and_eval_toggle_dropout():
    pm = get_peft_model(tm.flax_model("bert"), MissConfig(r=4, init_weights=False, miss_dropout=0.5))
    x = tm.inputs("bert")
    assert pm.training is False
    quiet = logits(pm(**x))
    assert pm.train() is pm and pm.training
    a, b = logits(pm(**x)), logits(pm(**x))
    assert not np.allclose(a, b) and not np.allclose(a, quiet)  # fresh dropout keys from the model's stream
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(logits(pm(**x, dropout_rng=key)), logits(pm(**x, dropout_rng=key)))
    np.testing.assert_array_equal(logits(pm(**x, train=False)), quiet)  # an explicit flag wins
    assert pm.eval() is pm and not pm.training
    np.testing.assert_array_equal(logits(pm(**x)), quiet)


def test_base_model_config_parameters_and_repr():
    bert = tm.flax_model("bert")
    pm = get_peft_model(bert, MissConfig(r=4, modules_to_save=["classifier"], bias="MiSS_only"))
    assert pm.get_base_model() is bert and pm.config is bert.config
    named = dict(pm.named_parameters())
    query = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert {f"{query}.miss_block.default", f"{query}.base_layer.kernel", f"{query}.base_layer.bias"} <= set(named)
    assert {"base_model.model.classifier.modules_to_save.default.kernel",
            "base_model.model.classifier.original_module.kernel"} <= set(named)
    assert sum(x.size for x in pm.parameters()) == pm.get_nb_trainable_parameters()[1]  # each param once
    text = repr(pm)
    assert "FlaxBertForSequenceClassification" in text and "(model.bert.encoder.layer.1.attention.self.value)" in text
    assert "ModulesToSaveWrapper" in text and "miss_block={default: balance (4, 32)}" in text


def _torch_name(name: str) -> str:
    """A `MissModel.named_parameters()` name with torch's leaf name (`interop.names.torch_leaf`: `kernel`,
    `embedding`, `scale` -> `weight`); a block's name ends with its adapter's name and stays."""
    head, leaf = name.rsplit(".", 1)
    return name if head.endswith("." + BLOCK) else f"{head}.{torch_leaf(leaf)}"


# (arch, {adapter: MissConfig kwargs}): the first adapter active, the others not (PEFT's add_adapter)
NAMED_CASES = {
    "llama": ("llama", {"default": dict(r=4, modules_to_save=["lm_head"]),
                        "other": dict(r=2, init_weights="bat", target_modules=["o_proj", "q_proj"])}),
    "bert_bias_all": ("bert", {"default": dict(r=4, modules_to_save=["classifier"], bias="all"),
                               "other": dict(r=2, target_modules=["query", "key"])}),
}
# (PEFT 0.21 with bias="all" also marks an inactive adapter's modules_to_save copy of a bias trainable, which
# it never trains: the cases keep inactive adapters' copies off biases.)


@pytest.mark.parametrize("case", list(NAMED_CASES))
def test_named_parameters_are_peft_s_names(case):
    """Every name PEFT's `named_parameters()` gives on the torch twin, once each (after torch's leaf names),
    and the trainable ones (a trained bias: its trained value, under the base name) are PEFT's trainable ones."""
    arch, configs = NAMED_CASES[case]
    (first, config), *rest = configs.items()
    pm = get_peft_model(tm.flax_model(arch), MissConfig(**config), first)
    pt = peft.get_peft_model(torch_twin(arch), peft.MissConfig(**config), adapter_name=first)
    for name, kw in rest:
        pm.add_adapter(name, MissConfig(**kw))
        pt.add_adapter(name, peft.MissConfig(**kw))
    perturb_trainables(pm, seed=0)  # fresh arrays: the trainable ones are told apart by identity below
    named = list(pm.named_parameters())
    names = [_torch_name(n) for n, _ in named]
    assert len(set(names)) == len(names)
    assert set(names) == {n for n, _ in pt.named_parameters()}
    trainable = {id(x) for x in jax.tree_util.tree_leaves(pm.trainable_params())}
    ours = {_torch_name(n) for n, x in named if id(x) in trainable}
    assert ours == {n for n, p in pt.named_parameters() if p.requires_grad}
    assert len(ours) == len(trainable)  # every trainable array is listed
    shapes = {_torch_name(n): int(x.size) for n, x in named}
    assert shapes == {n: p.numel() for n, p in pt.named_parameters()}


def _two_adapter_bert() -> tuple[MissModel, peft.PeftModel]:
    """The same two-adapter BERT in miss-jax and PEFT: `default` on query/value, `other` on query, both
    saving the classifier."""
    configs = {"default": dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
               "other": dict(r=2, target_modules=["query"], modules_to_save=["classifier"])}
    pm = get_peft_model(tm.flax_model("bert"), MissConfig(**configs["default"]))
    pt = peft.get_peft_model(torch_twin("bert"), peft.MissConfig(**configs["default"]))
    pm.add_adapter("other", MissConfig(**configs["other"]))
    pt.add_adapter("other", peft.MissConfig(**configs["other"]))
    return pm, pt


def _same_status(ours, theirs) -> None:
    ours, theirs = dataclasses.asdict(ours), dataclasses.asdict(theirs)
    assert ours.pop("base_model_type", "Flax") == "Flax" + theirs.pop("base_model_type", "")
    assert ours == theirs


def test_model_and_layer_status_equal_peft():
    pm, pt = _two_adapter_bert()
    _same_status(pm.get_model_status(), pt.get_model_status())
    ours = {s.name: dataclasses.asdict(s) for s in pm.get_layer_status()}
    theirs = {s.name: dataclasses.asdict(s) for s in pt.get_layer_status()}
    assert ours == theirs
    for m in (pm, pt):
        m.set_requires_grad("default", False)
    _same_status(pm.get_model_status(), pt.get_model_status())
    for m in (pm, pt):
        m.set_requires_grad("default", True)
        m.disable_adapter_layers()
    _same_status(pm.get_model_status(), pt.get_model_status())
    for m in (pm, pt):
        m.enable_adapter_layers()
        m.base_model.set_adapter("other") if m is pt else m.set_adapter("other")
    _same_status(pm.get_model_status(), pt.get_model_status())


def test_set_requires_grad_on_an_inactive_adapter_names_set_adapter():
    pm, _ = _two_adapter_bert()
    with pytest.raises(ValueError, match=r"set_adapter\(\['default', 'other'\]\)"):
        pm.set_requires_grad("other")


def test_disabled_adapter_layers_compute_the_base_model():
    bert = tm.flax_model("bert")
    pm = get_peft_model(bert, MissConfig(r=4, init_weights=False))
    pm.merge_adapter()
    adapted = logits(pm(**tm.inputs("bert")))
    pm.disable_adapter_layers()  # unmerges first, as PEFT's layers do
    assert pm.merged_adapters == []
    np.testing.assert_allclose(logits(pm(**tm.inputs("bert"))), logits(bert(**tm.inputs("bert"))), atol=1e-5)
    pm.enable_adapter_layers()
    np.testing.assert_allclose(logits(pm(**tm.inputs("bert"))), adapted, atol=1e-5)


# --------------------------------------------------------------------------- 3. PEFT's keywords, the card


def test_peft_loading_keywords_are_accepted_or_name_the_jax_way(tmp_path):
    pm = get_peft_model(tm.flax_model("llama"), MissConfig(r=4, init_weights=False, target_modules=QV))
    pm.save_pretrained(str(tmp_path))
    cls = type(tm.flax_model("llama"))
    loaded = MissModel.from_pretrained(tm.flax_model("llama"), str(tmp_path), autocast_adapter_dtype=True,
                                       low_cpu_mem_usage=True, config=MissConfig(r=4, target_modules=QV))
    assert loaded.frozen_adapters == ("default",)  # config= is marked inference_mode as PEFT does
    loaded.load_adapter(str(tmp_path), "again", is_trainable=True, low_cpu_mem_usage=True, torch_device=None)
    refused = [
        (dict(autocast_adapter_dtype=False), "float32"), (dict(torch_device="cuda"), "jax.device_put"),
        (dict(ephemeral_gpu_offload=True), "shard_peft_model"), (dict(key_mapping={"a": "b"}), "Flax param path"),
        (dict(revision="main"), "snapshot_download"), (dict(config={"r": 4}), "MissConfig.from_dict"),
    ]
    for kwargs, hint in refused:
        with pytest.raises(ValueError, match=hint):
            MissModel.from_pretrained(cls(tm.config("llama")), str(tmp_path), **kwargs)
        with pytest.raises(ValueError, match=hint):
            loaded.load_adapter(str(tmp_path), "x", **kwargs)
    with pytest.raises(TypeError, match="nonsense"):
        loaded.load_adapter(str(tmp_path), "x", nonsense=1)


def test_peft_saving_keywords_are_accepted_or_name_the_jax_way(tmp_path):
    pm = get_peft_model(tm.flax_model("llama"), MissConfig(r=4, target_modules=QV))
    pm.save_pretrained(str(tmp_path / "a"), save_embedding_layers="auto")
    pm.save_pretrained(str(tmp_path / "b"), save_embedding_layers=False, path_initial_model_for_weight_conversion=None)
    for kwargs, hint in [(dict(save_embedding_layers=True), "modules_to_save"),
                         (dict(path_initial_model_for_weight_conversion="init"), "as_lora=True"),
                         (dict(state_dict={}), "update_params"), (dict(repo_id="me/x"), "upload_folder")]:
        with pytest.raises(ValueError, match=hint):
            pm.save_pretrained(str(tmp_path / "c"), **kwargs)
    assert not os.path.exists(tmp_path / "c")


@pytest.mark.parametrize("arch, task", [("llama", "CAUSAL_LM"), ("bert", None)])
def test_the_model_card_is_peft_s_and_never_replaces_one(arch, task, tmp_path):
    targets = QV if arch == "llama" else ["query"]
    pt = peft.get_peft_model(torch_twin(arch), peft.MissConfig(r=4, target_modules=targets, task_type=task))
    pt.save_pretrained(str(tmp_path / "torch"))
    pm = get_peft_model(tm.flax_model(arch), MissConfig(r=4, target_modules=targets, task_type=task))
    pm.save_pretrained(str(tmp_path / "jax"))
    card = (tmp_path / "jax" / "README.md").read_text()
    assert card == (tmp_path / "torch" / "README.md").read_text()
    (tmp_path / "jax" / "README.md").write_text("my notes")
    pm.save_pretrained(str(tmp_path / "jax"))
    assert (tmp_path / "jax" / "README.md").read_text() == "my notes"
    assert sorted(os.listdir(tmp_path / "jax")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


# --------------------------------------------------------------------------- 4. PEFT's semantics


def test_a_second_adapter_with_bias_is_refused_as_in_peft():
    pt = peft.get_peft_model(torch_twin("bert"), peft.MissConfig(r=4, target_modules=["query"], bias="all"))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias") as theirs:
        pt.add_adapter("b", peft.MissConfig(r=4, target_modules=["query"], bias="MiSS_only"))
    pm = get_peft_model(tm.flax_model("bert"), MissConfig(r=4, target_modules=["query"], bias="all"))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias") as ours:
        pm.add_adapter("b", MissConfig(r=4, target_modules=["query"], bias="MiSS_only"))
    assert str(theirs.value).split(".")[0] == str(ours.value).split(" (")[0]
    assert list(pm.peft_config) == ["default"]
    pm.add_adapter("c", MissConfig(r=4, target_modules=["query"]))  # bias="none" adapters may join


def test_active_adapters_with_disjoint_modules_to_save_combine_as_in_peft(tmp_path):
    pm = get_peft_model(tm.flax_model("bert"), MissConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    pm.add_adapter("pooled", MissConfig(r=4, target_modules=["value"], modules_to_save=["pooler"]))
    for name in ("default", "pooled"):
        pm.set_adapter(name)
        perturb_trainables(pm, {"default": 1, "pooled": 2}[name])
    pm.set_adapter(["default", "pooled"])
    assert pm.plan.saved == ("default", "pooled")
    assert set(pm.trainable_params()["modules_to_save"]) == {"default", "pooled"}
    pm.save_pretrained(str(tmp_path))
    torch_model = load_in_torch("bert", str(tmp_path), adapters=["pooled"])
    torch_model.base_model.set_adapter(["default", "pooled"])
    with torch.no_grad():
        expected = torch_model(**torch_inputs("bert")).logits.numpy()
    np.testing.assert_allclose(logits(pm(**tm.inputs("bert"))), expected, atol=ATOL)


# --------------------------------------------------------------------------- 5. multi-host save


def _sharded_llama():
    mesh, rules = S.make_mesh((4, 2)), S.llama_rules("tensor_parallel")
    base = tm.flax_model("llama")
    params = jax.device_put(base.params, S.param_shardings(base.params, mesh, rules))
    pm = get_peft_model(base, MissConfig(r=4, init_weights=False, target_modules=QV), params=params,
                        low_cpu_mem_usage=True)
    S.shard_peft_model(pm, mesh, rules)
    return pm


def test_save_pretrained_alone_saves_a_sharded_model(tmp_path):
    pm = _sharded_llama()
    block = pm.adapter_params["miss"]["default"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["miss_block"]
    assert len({str(s.index) for s in block.addressable_shards}) > 1  # split: no one device holds it whole
    pm.save_pretrained(str(tmp_path))
    loaded = MissModel.from_pretrained(tm.flax_model("llama"), str(tmp_path))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           loaded.adapter_params, pm.adapter_params)


def test_other_processes_build_no_host_copy_and_write_nothing(tmp_path, monkeypatch):
    pm = _sharded_llama()
    calls = []
    for module, name in [(np, "asarray"), (np, "array"), (jax, "device_get")]:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    assert pm.save_pretrained(str(tmp_path / "x"), is_main_process=False) is None
    assert pm.save_pretrained(str(tmp_path / "y"), is_main_process=False, as_lora=True) is None
    monkeypatch.undo()
    assert calls == [] and not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


# --------------------------------------------------------------------------- 6. the demo's options


def test_custom_demo_runs_never_write_into_the_demo_folder(capsys):
    from test_examples import load_example

    example = load_example("finetune_bert_classifier")
    assert example.parse_args([]).output_dir == example.parse_args(["--resume"]).output_dir == example.DEMO_DIR
    custom = example.parse_args(["--r", "16", "--variant", "bat"]).output_dir
    assert custom == example.parse_args(["--variant", "bat", "--r", "16", "--resume"]).output_dir  # --resume finds it
    assert custom.startswith(example.RUNS_DIR) and example.parse_args(["--output-dir", "x", "--r", "2"]).output_dir == "x"
    with pytest.raises(SystemExit):
        example.parse_args(["--help"])
    assert "MiSS shard size r (default: 32)" in " ".join(capsys.readouterr().out.split())
