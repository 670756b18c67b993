"""tunix models built from transformers folders (`interop.tunix_models.from_transformers`) compute the folder's
PyTorch model: per config field (rope_theta, rope_scaling, tied embeddings) on tiny random twins, and on a real
checkpoint (SmolLM2-135M-Instruct, de-quantized from its GGUF file): logits, and greedy tokens of MiSS adapters
born in PyTorch PEFT and in JAX. Runs in the modern environment (`make test-modern`); the PyTorch side runs in
`MISS_JAX_TORCH_PYTHON`'s environment (tests/torch_twin.py)."""

from __future__ import annotations

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from torch_process import TORCH_PYTHON, torch_side  # noqa: E402
from interop import nnx_io
from interop.cli import main
from interop.nnx_check import causal_logits
from interop.tunix_models import from_transformers
from miss_jax import MissConfig, MissModel
from miss_jax.nnx import get_peft_model, miss_layers
from real_checkpoint import smollm2_folder

pytest.importorskip("tunix.models.qwen3.model")

IDS = np.array([[1, 5, 9, 14, 3, 60, 22, 7], [2, 33, 4, 4, 18, 51, 0, 12]])  # torch_twin.IDS
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY = 6  # torch_twin.GREEDY
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}  # head_dim 8: one blended, two divided frequencies
FIELDS = {
    "llama-theta-tied": ("llama", {"rope_theta": 10_000.0, "tie_word_embeddings": True}),
    "llama-llama3-scaling": ("llama", {"rope_theta": 500_000.0, "rope_scaling": LLAMA3_SCALING}),
    "qwen3-linear-tied": ("qwen3", {"rope_theta": 10_000.0, "tie_word_embeddings": True,
                                    "rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
}
NAME_MAPS = {"llama": nnx_io.TUNIX_LLAMA3, "qwen3": nnx_io.TUNIX_QWEN3}

pytestmark = pytest.mark.skipif(not TORCH_PYTHON, reason="set MISS_JAX_TORCH_PYTHON (make test-modern does)")



@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict[str, str]:
    """Each case's folder made by the torch side: OUT/base (+ .npy logits) and a PEFT adapter OUT/adapter."""
    out = {}
    for case, (arch, fields) in FIELDS.items():
        folder = str(tmp_path_factory.mktemp(case))
        torch_side("base", arch, folder, json.dumps(fields))
        out[case] = folder
    return out


@pytest.mark.parametrize("case", sorted(FIELDS))
def test_config_fields_are_honoured(case, twins):
    arch, fields = FIELDS[case]
    folder = twins[case]
    config = json.load(open(f"{folder}/base/config.json"))
    assert {k: config[k] for k in fields} == fields  # the torch side saved what the case asks for
    model = from_transformers(f"{folder}/base")
    assert hasattr(model, "lm_head") != bool(fields.get("tie_word_embeddings"))
    np.testing.assert_allclose(causal_logits(model, IDS), np.load(f"{folder}/base.npy"), atol=1e-4)
    peft_model = MissModel.from_pretrained(model, f"{folder}/adapter", name_map=NAME_MAPS[arch])
    assert len(miss_layers(peft_model.base_model)) == 2 * len(TARGETS)
    np.testing.assert_allclose(causal_logits(peft_model, IDS), np.load(f"{folder}/adapter.npy"), atol=1e-4)


def edited(twins, tmp_path, case: str, **fields) -> str:
    """A copy of a case's base folder with `fields` set in its config.json (None deletes a field)."""
    folder = tmp_path / case
    shutil.copytree(f"{twins[case]}/base", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return str(folder)


@pytest.mark.parametrize("case, fields, message", [
    ("llama-llama3-scaling", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     r"rope_scaling type 'yarn' is not supported .* one of default, linear, llama3"),
    ("llama-llama3-scaling", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     r"rope_scaling of type 'llama3' lacks \['low_freq_factor'"),
    ("llama-theta-tied", {"attention_bias": True}, r"has no \{'attention_bias': True\}"),
    ("qwen3-linear-tied", {"hidden_act": "gelu"}, r"has no \{'hidden_act': 'gelu'\}"),
    ("qwen3-linear-tied", {"use_sliding_window": True}, r"has no \{'use_sliding_window': True\}"),
    ("llama-theta-tied", {"rope_theta": None}, r"lacks \['rope_theta'\]"),
    ("llama-theta-tied", {"tie_word_embeddings": False}, r"no lm_head\.weight.*tie_word_embeddings: true"),
    ("qwen3-linear-tied", {"model_type": "mistral"}, r"model_type 'mistral' has no tunix model"),
])
def test_what_tunix_cannot_follow_is_refused_by_field(twins, tmp_path, case, fields, message):
    with pytest.raises(ValueError, match=message):
        from_transformers(edited(twins, tmp_path, case, **fields))


def test_the_check_refuses_an_unsupported_field_in_one_line(twins, tmp_path, capsys):
    folder = edited(twins, tmp_path, "qwen3-linear-tied", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    adapter = f"{twins['qwen3-linear-tied']}/adapter"
    code = main(["check", "--nnx", "tunix-qwen3", "--base", folder, "--adapter", adapter,
                 "--torch-python", TORCH_PYTHON])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "rope_scaling type 'dynamic'" in err, err


# --------------------------------------------------------------------------- the real checkpoint


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> tuple[str, str]:
    """(SmolLM2 folder, the torch side's output: prompt, PEFT adapters `peft` (random) and `zero`, their logits and
    greedy tokens)."""
    base, out = smollm2_folder(), str(tmp_path_factory.mktemp("smollm2"))
    torch_side("real", base, out)
    return base, out


def greedy(model, prompt: np.ndarray) -> np.ndarray:
    """`GREEDY` new tokens `(1, GREEDY)` of greedy decoding, a full forward per token (as torch_twin.greedy)."""
    ids = prompt
    for _ in range(GREEDY):
        ids = np.concatenate([ids, causal_logits(model, ids)[:, -1].argmax(-1)[:, None]], axis=1)
    return ids[:, prompt.shape[1]:]


def test_real_checkpoint_config_is_what_the_issue_describes(real):
    config = json.load(open(f"{real[0]}/config.json"))
    assert config["model_type"] == "llama" and config["rope_theta"] == 100_000.0 and config["tie_word_embeddings"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"]) == (30, 576, 64)


@pytest.mark.parametrize("adapter", ["zero", "peft"])
def test_real_checkpoint_pytorch_adapter_gives_pytorch_logits_and_tokens(real, adapter):
    base, out = real
    prompt = np.load(f"{out}/prompt.npy")
    model = MissModel.from_pretrained(from_transformers(base), f"{out}/{adapter}", name_map=nnx_io.TUNIX_LLAMA3)
    want = np.load(f"{out}/{adapter}.npy")
    assert np.abs(want).max() > 20  # logits at the scale of a real model
    np.testing.assert_allclose(causal_logits(model, prompt), want, atol=2e-3)
    np.testing.assert_array_equal(greedy(model, prompt), np.load(f"{out}/{adapter}.greedy.npy"))


def test_real_checkpoint_jax_adapter_gives_the_same_tokens_in_pytorch_peft(real, tmp_path):
    base, out = real
    prompt = np.load(f"{out}/prompt.npy")
    model = get_peft_model(from_transformers(base), MissConfig(r=4, target_modules=TARGETS))
    keys = jax.random.split(jax.random.key(3), len(miss_layers(model.base_model)))
    for key, layer in zip(keys, miss_layers(model.base_model).values()):
        block = layer.miss_block["default"]
        block.set_value(0.01 * jax.random.normal(key, block.shape, jnp.float32))
    folder = str(tmp_path / "jax")
    nnx_io.save_pretrained(model, folder, nnx_io.TUNIX_LLAMA3)
    got = causal_logits(model, prompt)
    assert np.abs(got - np.load(f"{out}/zero.npy")).max() > 1.0  # the adapter changes the model
    torch_side("greedy", base, f"{out}/prompt.npy", folder)
    np.testing.assert_allclose(got, np.load(folder + ".npy"), atol=2e-3)
    np.testing.assert_array_equal(greedy(model, prompt), np.load(folder + ".greedy.npy"))


def test_real_checkpoint_check_nnx_passes_at_the_default_tolerance(real, capsys):
    """The default tolerance grows with the logits' scale (float32 rounding over 30 layers: ~1.3e-4 here)."""
    base, out = real
    code = main(["check", "--nnx", "tunix-llama3", "--base", base, "--adapter", f"{out}/peft", "--torch-python",
                 TORCH_PYTHON])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    diff, atol = map(float, re.search(r"OK: largest difference (\S+) \(atol (\S+)\)", stdout).groups())
    assert diff <= 2e-3 and 1e-3 < atol <= 2.5e-3  # 5e-5 x the largest |logit| (~30-40)
