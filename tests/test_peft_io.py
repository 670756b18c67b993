"""PEFT adapter folders against real PyTorch PEFT 0.21: variants, bias modes, modules_to_save,
several adapters, Bone folders, bad input, atomic saves."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import tiny_models as tm
from interop import safetensors_io
from interop.peft_io import config_from_json
from interop_helpers import (
    ATOL,
    file_keys,
    jax_outputs,
    load_in_torch,
    perturb_trainables,
    torch_outputs,
    torch_peft_model,
    torch_twin,
)
from helpers import snapshot
from miss_jax import MissConfig, MissModel, get_peft_model, tree
from miss_jax.train import create_train_state, make_train_step

BONE_FOLDER = os.path.join(os.path.dirname(__file__), "data", "bone_bert")
# name -> PEFT config kwargs; "default" is saved at the root, the others in sub-folders. Disjoint layers:
# PEFT <= 0.21 runs every adapter of a layer in the mode of the layer's first adapter.
LLAMA_ADAPTERS = {
    "default": dict(r=4, init_weights=False),  # q_proj, v_proj (PEFT's default targets)
    "mini": dict(r=4, init_weights="mini", mini_r=4, target_modules=["k_proj", "up_proj"]),
    "bat": dict(r=4, init_weights="bat", target_modules=["o_proj", "down_proj"]),
}


# --------------------------------------------------------------------------- variants, several adapters


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Torch PEFT's llama with three random adapters saved; the same folder loaded in JAX."""
    root = tmp_path_factory.mktemp("llama")
    torch_model = torch_peft_model("llama", {n: peft.MissConfig(**kw) for n, kw in LLAMA_ADAPTERS.items()})
    torch_out = {}
    for name in LLAMA_ADAPTERS:
        torch_model.set_adapter(name)
        torch_out[name] = torch_outputs(torch_model, "llama")
    torch_model.save_pretrained(str(root / "torch"))
    model = MissModel.from_pretrained(tm.flax_model("llama"), str(root / "torch"))
    model.load_adapter(str(root / "torch" / "mini"), "mini")
    model.load_adapter(str(root / "torch"), "bat", subfolder="bat")
    jax_out = {}
    for name in LLAMA_ADAPTERS:
        model.set_adapter(name)
        jax_out[name] = jax_outputs(model, "llama")
    return root, model, torch_out, jax_out


@pytest.mark.parametrize("name", list(LLAMA_ADAPTERS))
def test_torch_folders_load_in_jax(llama, name):
    _, model, torch_out, jax_out = llama
    np.testing.assert_allclose(jax_out[name], torch_out[name], atol=ATOL)
    assert model.peft_config[name].variant == {"default": "balance"}.get(name, name)
    assert model.peft_config[name].inference_mode  # is_trainable=False


def test_jax_folders_load_in_torch(llama):
    root, model, _, jax_out = llama
    model.save_pretrained(str(root / "jax"))
    assert sorted(os.listdir(root / "jax")) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "bat",
                                                "mini"]  # README.md: PEFT's model card
    for sub in ("", "mini", "bat"):
        assert file_keys(str(root / "jax" / sub)) == file_keys(str(root / "torch" / sub))
    torch_model = load_in_torch("llama", str(root / "jax"), ["mini", "bat"])
    for name in LLAMA_ADAPTERS:
        torch_model.set_adapter(name)
        np.testing.assert_allclose(torch_outputs(torch_model, "llama"), jax_out[name], atol=ATOL)


def test_selected_adapters_and_dtype(llama):
    root, model, _, _ = llama
    model.save_pretrained(str(root / "only_mini"), selected_adapters=["mini"], dtype=jnp.bfloat16)
    assert sorted(os.listdir(root / "only_mini")) == ["README.md", "mini"]  # the card at the root, as PEFT
    with safe_open(str(root / "only_mini" / "mini" / "adapter_model.safetensors"), "flax") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match=r"adapter sub-folders \['mini'\]: pass subfolder="):
        MissModel.from_pretrained(tm.flax_model("llama"), str(root / "only_mini"))
    with pytest.raises(ValueError, match="selected_adapters"):
        model.save_pretrained(str(root / "bad"), selected_adapters=["nope"])
    assert not (root / "bad").exists()
    reloaded = MissModel.from_pretrained(tm.flax_model("llama"), str(root / "only_mini"), subfolder="mini",
                                         is_trainable=True)
    assert not reloaded.peft_config["default"].inference_mode
    ours = traverse_util.flatten_dict(model.adapter_params["miss"]["mini"])
    back = traverse_util.flatten_dict(reloaded.adapter_params["miss"]["default"])
    for path, value in ours.items():
        assert back[path].dtype == jnp.float32  # bf16 in the file, float32 in the adapter (PEFT's autocast)
        np.testing.assert_array_equal(back[path], value.astype(jnp.bfloat16).astype(jnp.float32))


def test_is_trainable_and_inference_mode_freeze_as_in_peft(llama):
    """Trainable counts against real PEFT through from_pretrained / load_adapter / set_adapter."""
    root = str(llama[0] / "torch")
    torch_counts, jax_counts = [], []

    def record(torch_model, jax_model):
        torch_counts.append(torch_model.get_nb_trainable_parameters()[0])
        jax_counts.append(jax_model.get_nb_trainable_parameters()[0])

    frozen_t = peft.PeftModel.from_pretrained(torch_twin("llama"), root)
    frozen_j = MissModel.from_pretrained(tm.flax_model("llama"), root)
    record(frozen_t, frozen_j)
    with pytest.raises(ValueError, match=r"\['default'\] are frozen.*is_trainable=True.*set_adapter\(\['default'\]\)"):
        frozen_j.trainable_params()
    trainable_t = peft.PeftModel.from_pretrained(torch_twin("llama"), root, is_trainable=True)
    trainable_j = MissModel.from_pretrained(tm.flax_model("llama"), root, is_trainable=True)
    record(trainable_t, trainable_j)
    for t, j in ((frozen_t, frozen_j), (trainable_t, trainable_j)):  # a second adapter, loaded frozen, set active
        t.load_adapter(os.path.join(root, "mini"), "mini")
        j.load_adapter(os.path.join(root, "mini"), "mini")
        t.set_adapter("mini", inference_mode=True)
        j.set_adapter("mini", inference_mode=True)
        record(t, j)
        t.set_adapter("mini")  # PEFT: set_adapter makes the adapter trainable
        j.set_adapter("mini")
        record(t, j)
    assert torch_counts[0] == 0 and torch_counts[1] > 0 and len(set(torch_counts)) > 2
    assert jax_counts == torch_counts
    assert frozen_j.trainable_params()["miss"].keys() == {"mini"}
    assert frozen_j.peft_config["mini"].inference_mode  # the config keeps how it was loaded, as in PEFT


FROZEN_BESIDE_TRAINABLE = {  # "default" (frozen) trains biases and saves the classifier; disjoint layers
    "default": dict(r=4, init_weights=False, bias="all", modules_to_save=["classifier"]),
    "second": dict(r=4, init_weights=False, target_modules=["key"]),
}


def test_a_frozen_adapter_beside_a_trainable_one_counts_and_trains_as_in_peft(tmp_path):
    """Both active, "default" frozen: the count leaves out its blocks, copy and biases, as PEFT 0.21 does
    for the blocks and copy (PEFT still counts a frozen adapter's biases, miss-jax freezes them: README's
    PEFT differences), and the train step changes "second" only."""
    torch_model = torch_peft_model("bert", {n: peft.MissConfig(**kw) for n, kw in FROZEN_BESIDE_TRAINABLE.items()})
    torch_model.save_pretrained(str(tmp_path))
    t = peft.PeftModel.from_pretrained(torch_twin("bert"), str(tmp_path))  # is_trainable=False
    j = MissModel.from_pretrained(tm.flax_model("bert"), str(tmp_path))
    frozen_biases = tree.count(j.adapter_params["bias"])
    assert frozen_biases > 0 and t.get_nb_trainable_parameters()[0] == frozen_biases  # PEFT: biases stay trainable
    assert j.get_nb_trainable_parameters()[0] == 0
    t.load_adapter(str(tmp_path / "second"), "second", is_trainable=True)
    j.load_adapter(str(tmp_path / "second"), "second", is_trainable=True)
    t.base_model.set_adapter(["default", "second"])  # both active and trainable
    j.set_adapter(["default", "second"])
    both = j.get_nb_trainable_parameters()
    assert both == t.get_nb_trainable_parameters()
    t.set_requires_grad("default", False)
    j.set_requires_grad("default", False)
    assert j.frozen_adapters == ("default",) and j.active_adapters == ["default", "second"]
    assert t.get_nb_trainable_parameters()[0] - frozen_biases == j.get_nb_trainable_parameters()[0]
    assert j.get_nb_trainable_parameters()[0] == tree.count(j.adapter_params["miss"]["second"]) < both[0]

    before = tree.flatten(j.adapter_params)
    out = jax_outputs(j, "bert")
    step = make_train_step(j, optax.adamw(1e-2, weight_decay=0.1), lambda o, b: jnp.mean(o.logits ** 2))
    state = create_train_state(j, optax.adamw(1e-2, weight_decay=0.1))
    for seed in range(2):
        state, loss = step(j.params, state, tm.inputs("bert"), jax.random.PRNGKey(seed))
        assert np.isfinite(float(loss))
    after = tree.flatten(j.adapter_params)
    for path, value in before.items():
        moved = not np.array_equal(after[path], value)
        assert moved == (path[:2] == ("miss", "second")), path  # default's blocks, copy and biases unchanged
    assert np.abs(jax_outputs(j, "bert") - out).max() > 0
    j.set_requires_grad("second", False)  # a step built before a freeze refuses to run
    with pytest.raises(ValueError, match=r"built with adapters \['default'\] frozen.*build a new step"):
        step(j.params, state, tm.inputs("bert"), jax.random.PRNGKey(2))
    assert all(np.array_equal(v, after[p]) for p, v in tree.flatten(j.adapter_params).items())


# --------------------------------------------------------------------------- bias modes, modules_to_save

BIAS_CASES = {  # id -> (arch, config kwargs)
    "bias_all+classifier": ("bert", dict(bias="all", modules_to_save=["classifier"])),
    "MiSS_only": ("bert", dict(bias="MiSS_only")),
    "nested_classifier": ("roberta", dict(modules_to_save=["classifier"])),  # classifier.dense / .out_proj
}


@pytest.mark.parametrize("case", list(BIAS_CASES))
def test_bias_modes_and_modules_to_save(case, tmp_path):
    arch, kwargs = BIAS_CASES[case]
    # JAX-made (trained-like: blocks, module copies and biases all moved) -> torch
    model = get_peft_model(tm.flax_model(arch), MissConfig(r=4, init_weights=False, **kwargs))
    perturb_trainables(model, seed=1)
    jax_out = jax_outputs(model, arch)
    model.save_pretrained(str(tmp_path / "jax"))
    np.testing.assert_allclose(torch_outputs(load_in_torch(arch, str(tmp_path / "jax")), arch), jax_out, atol=ATOL)

    # torch-made -> JAX; and both files hold the same keys, configs the same fields
    torch_model = torch_peft_model(arch, {"default": peft.MissConfig(r=4, init_weights=False, **kwargs)}, seed=2)
    torch_model.save_pretrained(str(tmp_path / "torch"))
    loaded = MissModel.from_pretrained(tm.flax_model(arch), str(tmp_path / "torch"))
    np.testing.assert_allclose(jax_outputs(loaded, arch), torch_outputs(torch_model, arch), atol=ATOL)

    ours, theirs = file_keys(str(tmp_path / "jax")), file_keys(str(tmp_path / "torch"))
    # PEFT's bias="all" also writes <module>.modules_to_save.bias / .original_module.bias (see interop.state_dict)
    extras = {k for k in theirs if ".modules_to_save." in k or ".original_module." in k}
    assert extras == ({"base_model.model.classifier.modules_to_save.bias",
                       "base_model.model.classifier.original_module.bias"} if kwargs.get("bias") == "all" else set())
    assert ours == {k: v for k, v in theirs.items() if k not in extras}
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("jax", "torch")]
    for c in configs:
        c["target_modules"] = sorted(c["target_modules"])
    assert configs[0] == configs[1]


# --------------------------------------------------------------------------- Bone (PEFT < 0.19)


def _convert_bone_to_miss(src: str, dst: str) -> None:
    """PEFT's scripts/convert-bone-to-miss.py: peft_type BONE -> MISS, keys `.bone_` -> `.miss_`."""
    os.makedirs(dst)
    with open(os.path.join(src, "adapter_config.json")) as f:
        config = {**json.load(f), "peft_type": "MISS"}
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    renamed = {k.replace(".bone_", ".miss_"): v for k, v in tensors.items()}
    save_file(renamed, os.path.join(dst, "adapter_model.safetensors"))


def test_bone_folders_load_as_peft_converts_them(tmp_path):
    """`tests/data/bone_bert` was written by PEFT 0.17.1 (BoneConfig, random blocks; see its README)."""
    model = MissModel.from_pretrained(tm.flax_model("bert"), BONE_FOLDER)
    model.load_adapter(BONE_FOLDER, "bat", subfolder="bat")
    assert (model.peft_config["default"].variant, model.peft_config["bat"].variant) == ("balance", "bat")
    _convert_bone_to_miss(BONE_FOLDER, str(tmp_path / "default"))
    _convert_bone_to_miss(os.path.join(BONE_FOLDER, "bat"), str(tmp_path / "default" / "bat"))
    torch_model = load_in_torch("bert", str(tmp_path / "default"), ["bat"])
    for name in ("default", "bat"):
        model.set_adapter(name)
        torch_model.set_adapter(name)
        np.testing.assert_allclose(jax_outputs(model, "bert"), torch_outputs(torch_model, "bert"), atol=ATOL)


def test_bone_config_fields_convert():
    bone = {"peft_type": "BONE", "r": 4, "init_weights": "bat", "bias": "bone_only", "target_modules": ["query"]}
    config, legacy = config_from_json(bone)
    assert legacy and (config.r, config.variant, config.bias) == (4, "bat", "MiSS_only")


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    """A llama MissModel with one adapter, and a good folder saved from it."""
    model = get_peft_model(tm.flax_model("llama"), MissConfig(r=4, init_weights=False))
    good = str(tmp_path_factory.mktemp("good") / "adapter")
    model.save_pretrained(good)
    return model, good


def _edit_config(folder: str, **changes: object) -> None:
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **changes}, f)


def _edit_tensors(folder: str, edit) -> None:
    path = os.path.join(folder, WEIGHTS)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


WEIGHTS = safetensors_io.WEIGHTS_NAME
Q0 = "base_model.model.model.layers.0.self_attn.q_proj.miss_block"
BAD_FOLDERS = {  # id -> (edit of a copy of the good folder, error pattern)
    "not_an_adapter": (lambda f: os.rename(os.path.join(f, "adapter_config.json"), os.path.join(f, "config.json")),
                       "not a PEFT adapter folder"),
    "other_peft_type": (lambda f: _edit_config(f, peft_type="LORA"), "'LORA' adapter"),
    "target_the_model_lacks": (lambda f: _edit_config(f, target_modules=["query_key_value"]),
                               r"Target modules \['query_key_value'\] not found"),
    "wrong_shape": (lambda f: _edit_tensors(f, lambda t: t.update({Q0: np.zeros((3, 32), np.float32)})),
                    rf"{Q0}: \(3, 32\) in .*, \(4, 32\) expected"),
    "missing_key": (lambda f: _edit_tensors(f, lambda t: t.pop(Q0)), rf"Missing keys: {Q0}\."),
    "unexpected_key": (lambda f: _edit_tensors(f, lambda t: t.update({Q0.replace(".0.", ".7."): t[Q0]})),
                       r"Unexpected keys: base_model\.model\.model\.layers\.7\.self_attn\.q_proj\.miss_block"),
    "truncated": (lambda f: os.truncate(os.path.join(f, WEIGHTS), 100), "truncated or corrupt"),
    "pickle_only": (lambda f: os.rename(os.path.join(f, WEIGHTS), os.path.join(f, "adapter_model.bin")),
                    "a pickle, which miss-jax never loads"),
    "bad_value": (lambda f: _edit_config(f, init_weights="lora"), "Unknown `init_weights`"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folders_raise_and_leave_the_model_unchanged(victim, tmp_path, case):
    model, good = victim
    edit, pattern = BAD_FOLDERS[case]
    folder = str(tmp_path / "bad")
    shutil.copytree(good, folder)
    edit(folder)
    before = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        model.load_adapter(folder, "new")
    assert snapshot(model) == before
    with pytest.raises(ValueError, match=pattern):
        MissModel.from_pretrained(tm.flax_model("llama"), folder)


def test_unknown_config_fields_warn(victim, tmp_path):
    model, good = victim
    folder = str(tmp_path / "newer")
    shutil.copytree(good, folder)
    _edit_config(folder, use_fancy_thing=True)
    with pytest.warns(UserWarning, match="use_fancy_thing"):
        model.load_adapter(folder, "newer")
    assert "newer" in model.peft_config
    model.delete_adapter("newer")


def test_saving_refuses_abstract_adapters_and_pickles(victim, tmp_path):
    model, _ = victim
    with pytest.raises(ValueError, match="never writes pickles"):
        model.save_pretrained(str(tmp_path / "a"), safe_serialization=False)
    empty = MissModel(tm.flax_model("llama"), MissConfig(r=4), low_cpu_mem_usage=True)
    with pytest.raises(ValueError, match="no weights yet"):
        empty.save_pretrained(str(tmp_path / "b"))
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- atomic saves


def _tree(folder: str) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(folder) for f in fs}


def test_interrupted_save_leaves_no_half_written_folder(victim, tmp_path, monkeypatch):
    model, _ = victim
    model.add_adapter("second", MissConfig(r=4, init_weights=False, target_modules=["v_proj"]))
    try:
        target = str(tmp_path / "adapter")
        real_write = safetensors_io.write_tensors
        calls = []

        def failing_write(folder, tensors):
            calls.append(folder)
            if len(calls) == 2:
                raise KeyboardInterrupt("killed mid-save")
            real_write(folder, tensors)

        monkeypatch.setattr(safetensors_io, "write_tensors", failing_write)
        with pytest.raises(KeyboardInterrupt):
            model.save_pretrained(target)
        assert os.listdir(tmp_path) == []  # no target, no temporary folder

        monkeypatch.setattr(safetensors_io, "write_tensors", real_write)
        model.save_pretrained(target, selected_adapters=["default"])
        with open(os.path.join(target, "README.md"), "w") as f:
            f.write("user notes")
        before = _tree(target)
        calls.clear()
        monkeypatch.setattr(safetensors_io, "write_tensors", failing_write)
        with pytest.raises(KeyboardInterrupt):
            model.save_pretrained(target)
        assert os.listdir(tmp_path) == ["adapter"] and _tree(target) == before

        monkeypatch.setattr(safetensors_io, "write_tensors", real_write)
        model.save_pretrained(target, selected_adapters=["second"])  # replaces the folder, keeps the rest
        assert sorted(os.listdir(target)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "second"]
        assert os.listdir(tmp_path) == ["adapter"]
    finally:
        model.delete_adapter("second")


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Readable by others as any file `open()` makes (safetensors alone would create it 0600)."""
    model = get_peft_model(tm.flax_model("llama"), MissConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path / "a"))
    umask = os.umask(0)
    os.umask(umask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert os.stat(tmp_path / "a" / name).st_mode & 0o777 == 0o666 & ~umask, name
