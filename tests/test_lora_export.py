"""LoRA export (`interop.lora`): real PEFT loads the folder and matches the JAX MiSS model, and the
factors agree with PEFT 0.21's own MiSS -> LoRA conversion (`peft.convert_to_lora`)."""

from __future__ import annotations

import json
import os

import numpy as np
import peft
import pytest

import tiny_models as tm
from interop.lora import lora_state_dict, save_lora
from interop_helpers import ATOL, file_keys, jax_outputs, perturb_trainables, torch_outputs, torch_twin
from miss_jax import MissConfig, get_peft_model

LLAMA_ADAPTERS = {
    "balance": MissConfig(r=4, init_weights=False, miss_dropout=0.1, target_modules=["q_proj", "v_proj"]),
    "mini": MissConfig(r=4, init_weights="mini", mini_r=8, target_modules=["q_proj", "v_proj"]),
    "bat": MissConfig(r=4, init_weights="bat", target_modules=["q_proj", "o_proj"]),
}


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama MissModel holding a trained-looking (perturbed) balance, mini and bat adapter."""
    (first, config), *rest = LLAMA_ADAPTERS.items()
    model = get_peft_model(tm.flax_model("llama"), config, first)
    for name, cfg in rest:
        model.add_adapter(name, cfg)
    for seed, name in enumerate(LLAMA_ADAPTERS):
        model.set_adapter(name)
        perturb_trainables(model, seed)
    return model


def peft_lora(arch: str, folder: str) -> peft.PeftModel:
    return peft.PeftModel.from_pretrained(torch_twin(arch), folder).eval()


def config_of(folder: str) -> dict:
    with open(os.path.join(folder, "adapter_config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", list(LLAMA_ADAPTERS))
def test_exact_export_matches_jax_in_peft(llama, name, tmp_path):
    """balance/mini at rank r and bat at full rank: PEFT's LoRA reproduces the JAX MiSS logits."""
    llama.set_adapter(name)
    report = save_lora(llama, str(tmp_path), name)
    diff = np.abs(torch_outputs(peft_lora("llama", str(tmp_path)), "llama") - jax_outputs(llama, "llama")).max()
    assert diff < ATOL, diff
    config = config_of(str(tmp_path))
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
    assert config["lora_dropout"] == (0.0 if name == "bat" else LLAMA_ADAPTERS[name].miss_dropout)
    if name == "bat":  # full rank min(in, out) per layer: exact up to float rounding
        assert report.max_rel_error < 1e-5
        assert {rep.rank for rep in report.layers} == {32}
    else:
        assert report.max_rel_error == 0.0
        assert config["r"] == 4 and config["rank_pattern"] == {}
        shapes = file_keys(str(tmp_path))
        assert shapes["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"] == (4, 32)
        assert shapes["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] == (16, 4)
        assert not any(k.endswith("miss_block") for k in shapes)


@pytest.mark.parametrize("name, rank", [("balance", None), ("mini", None), ("bat", 8), ("bat", 0.9)])
def test_factors_agree_with_peft_convert_to_lora(llama, name, rank, tmp_path):
    """Our lora_B @ lora_A equals PEFT's `convert_to_lora` of the same adapter loaded in torch, and the
    reported relative error equals the one of PEFT's factors against PEFT's own delta weight."""
    llama.save_pretrained(str(tmp_path), selected_adapters=[name])
    torch_miss = peft.PeftModel.from_pretrained(torch_twin("llama"), str(tmp_path / name))
    _, peft_sd = peft.convert_to_lora(torch_miss, rank=rank or LLAMA_ADAPTERS[name].r)
    merged, base = torch_miss.merge_and_unload(), torch_twin("llama")
    ours, _, report = lora_state_dict(llama, name, rank)
    reported = {rep.key: rep for rep in report.layers}
    for layer in llama.plan.spec(name).layers:
        key = f"base_model.model.{layer.key}"
        a, b = ours[f"{key}.lora_A.weight"], ours[f"{key}.lora_B.weight"]
        pa, pb = (peft_sd[f"{key}.lora_{x}.weight"].numpy() for x in "AB")
        assert a.shape == pa.shape and b.shape == pb.shape
        np.testing.assert_allclose(b @ a, pb @ pa, atol=1e-5)
        delta = (merged.get_submodule(layer.key).weight - base.get_submodule(layer.key).weight).detach().numpy()
        peft_error = np.linalg.norm(delta - pb @ pa) / np.linalg.norm(delta)
        assert reported[layer.key].rel_error == pytest.approx(peft_error, rel=1e-3, abs=1e-5)
        assert reported[layer.key].delta_norm == pytest.approx(np.linalg.norm(delta), rel=1e-4)
    if name == "bat":
        assert report.rel_error > 1e-3  # rank 8 of a rank-32 update is an approximation, and says so


def test_low_rank_bat_reports_error_and_loads(llama, tmp_path):
    """A bat export below full rank loads in PEFT; its output error grows as its reported error does."""
    llama.set_adapter("bat")
    reference = jax_outputs(llama, "llama")
    diffs, errors = [], []
    for rank in (4, 16):
        report = save_lora(llama, str(tmp_path / str(rank)), "bat", rank=rank)
        assert {rep.rank for rep in report.layers} == {rank}
        assert "relative Frobenius error" in report.summary()
        errors.append(report.rel_error)
        diffs.append(np.abs(torch_outputs(peft_lora("llama", str(tmp_path / str(rank))), "llama") - reference).max())
    assert errors[0] > errors[1] > 0 and diffs[0] > diffs[1]


def test_balance_stays_exact_at_r_whatever_the_rank(llama):
    """As PEFT's convert_to_lora: balance/mini factors are exact at r, for an int rank below r or a float threshold."""
    for rank in (2, 0.5):
        _, config, report = lora_state_dict(llama, "balance", rank=rank)
        assert config["r"] == 4 and {rep.rank for rep in report.layers} == {4} and report.max_rel_error == 0.0


def test_gpt2_conv1d_export_loads_in_peft(tmp_path):
    """GPT-2's Conv1D: the LoRA folder sets fan_in_fan_out and PEFT's LoRA reproduces the JAX logits."""
    model = get_peft_model(tm.flax_model("gpt2"), MissConfig(r=4, init_weights=False))
    perturb_trainables(model, 3)
    save_lora(model, str(tmp_path))
    assert config_of(str(tmp_path))["fan_in_fan_out"] is True
    diff = np.abs(torch_outputs(peft_lora("gpt2", str(tmp_path)), "gpt2") - jax_outputs(model, "gpt2")).max()
    assert diff < ATOL, diff


def test_modules_to_save_and_bias_go_into_the_lora_folder(tmp_path):
    """bert: the classifier copy and the adapted layers' biases travel with the LoRA export."""
    config = MissConfig(r=4, init_weights="mini", mini_r=8, modules_to_save=["classifier"], bias="MiSS_only")
    model = get_peft_model(tm.flax_model("bert"), config)
    perturb_trainables(model, 4)
    save_lora(model, str(tmp_path))
    saved = config_of(str(tmp_path))
    assert saved["modules_to_save"] == ["classifier"] and saved["bias"] == "lora_only"
    keys = file_keys(str(tmp_path))
    assert keys["base_model.model.classifier.weight"] == (3, 32)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    diff = np.abs(torch_outputs(peft_lora("bert", str(tmp_path)), "bert") - jax_outputs(model, "bert")).max()
    assert diff < ATOL, diff


def test_bad_exports_raise(llama, tmp_path):
    with pytest.raises(ValueError, match="rank of 0"):
        lora_state_dict(llama, "balance", rank=0)
    with pytest.raises(ValueError, match="Unknown adapter"):
        lora_state_dict(llama, "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="should be a directory"):
        save_lora(llama, str(tmp_path / "file"), "balance")
    active = list(llama.active_adapters)
    llama.set_adapter("balance")  # merging it under the active, unmerged bat adapter would be refused
    llama.merge_adapter(["balance"])
    try:
        with pytest.raises(ValueError, match="unmerge_adapter"):
            lora_state_dict(llama, "balance")
    finally:
        llama.unmerge_adapter()
        llama.set_adapter(active)


def test_save_pretrained_as_lora_writes_every_adapter_in_peft_layout(llama, tmp_path):
    """`save_pretrained(as_lora=True)`: `default`-style layout (non-default adapters in sub-folders),
    one report per adapter, and PEFT's LoRA loads each folder with the JAX logits."""
    reports = llama.save_pretrained(str(tmp_path), selected_adapters=["mini", "bat"], as_lora=True, lora_rank=8)
    assert set(reports) == {"mini", "bat"}
    assert reports["mini"].max_rel_error == 0.0 and reports["bat"].max_rel_error > 0.0  # rank 8 < 32: an SVD
    assert config_of(str(tmp_path / "bat"))["peft_type"] == "LORA"
    llama.set_adapter("mini")
    diff = np.abs(torch_outputs(peft_lora("llama", str(tmp_path / "mini")), "llama") - jax_outputs(llama, "llama"))
    assert diff.max() < ATOL, diff.max()
