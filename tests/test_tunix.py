"""tunix's Qwen 3 and Llama 3 (NNX) against their transformers PyTorch twins with the same weights, through
PEFT folders both ways (`interop.nnx_io` with the ready name maps). Runs in the modern environment
(`make test-modern`); the PyTorch side runs in `MISS_JAX_TORCH_PYTHON`'s environment (tests/torch_twin.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from torch_process import TORCH_PYTHON, torch_side  # noqa: E402
from interop import nnx_io
from interop import safetensors_io as files
from interop.cli import main
from miss_jax import MissConfig, MissModel
from miss_jax.nnx import get_peft_model, miss_layers

tunix_qwen3 = pytest.importorskip("tunix.models.qwen3.model")
from tunix.models.llama3 import model as tunix_llama3  # noqa: E402
from tunix.models.llama3 import params as llama3_params  # noqa: E402
from tunix.models.qwen3 import params as qwen3_params  # noqa: E402

IDS = np.array([[1, 5, 9, 14, 3, 60, 22, 7], [2, 33, 4, 4, 18, 51, 0, 12]])  # torch_twin.IDS
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INIT = {"balance": True, "mini": "mini", "bat": "bat"}
DIMS = dict(num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8, num_kv_heads=2,
            rope_theta=1_000_000, norm_eps=1e-6)
ARCHS = {
    "qwen3": (lambda: tunix_qwen3.ModelConfig(**DIMS, use_tied_embedding=False), qwen3_params, nnx_io.TUNIX_QWEN3),
    "llama": (lambda: tunix_llama3.ModelConfig(**DIMS, weight_tying=False), llama3_params, nnx_io.TUNIX_LLAMA3),
}

pytestmark = pytest.mark.skipif(not TORCH_PYTHON, reason="set MISS_JAX_TORCH_PYTHON (make test-modern does)")
nnx_io.tunix_rules()



@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict[str, str]:
    """Each arch's folder made by the torch side: base weights, PEFT adapters and their logits."""
    out = {}
    for arch in ARCHS:
        folder = str(tmp_path_factory.mktemp(arch))
        torch_side("make", arch, folder)
        out[arch] = folder
    return out


def tunix_model(arch: str, folder: str) -> nnx.Module:
    make_config, params, _ = ARCHS[arch]
    return params.create_model_from_safe_tensors(os.path.join(folder, "base"), make_config())


def logits(model: nnx.Module) -> np.ndarray:
    ids = jnp.asarray(IDS)
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    out, _ = model(ids, positions, None, mask)
    return np.asarray(out)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_twins_agree_without_adapters(arch, twins):
    np.testing.assert_allclose(logits(tunix_model(arch, twins[arch])), np.load(f"{twins[arch]}/base.npy"), atol=1e-4)


@pytest.mark.parametrize("variant", sorted(INIT))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_pytorch_peft_adapter_loads_into_tunix(arch, variant, twins):
    folder = twins[arch]
    model = MissModel.from_pretrained(tunix_model(arch, folder), f"{folder}/{variant}", name_map=ARCHS[arch][2])
    assert len(miss_layers(model.base_model)) == 2 * len(TARGETS)
    want = np.load(f"{folder}/{variant}.npy")
    assert np.abs(want - np.load(f"{folder}/base.npy")).max() > 1e-3  # the adapter changes the logits
    np.testing.assert_allclose(logits(model), want, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_adapter_trained_in_jax_loads_in_pytorch_peft(arch, twins, tmp_path):
    folder = twins[arch]
    folders, expected = [], {}
    for variant, init in INIT.items():
        model = get_peft_model(tunix_model(arch, folder), MissConfig(r=4, mini_r=8, init_weights=init,
                                                                     target_modules=TARGETS))
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=model.trainable)
        target = jax.random.normal(jax.random.key(0), (*IDS.shape, 64))

        @nnx.jit
        def step(m, opt):
            loss_fn = lambda m: jnp.mean((m(jnp.asarray(IDS), jnp.broadcast_to(jnp.arange(8), IDS.shape), None,
                                            jnp.broadcast_to(jnp.tril(jnp.ones((8, 8), bool)), (2, 8, 8)))[0]
                                          - target) ** 2)
            loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable))(m)
            opt.update(m, grads)
            return loss

        losses = [float(step(model, optimizer)) for _ in range(3)]
        assert losses[-1] < losses[0]
        out = str(tmp_path / variant)
        nnx_io.save_pretrained(model, out, ARCHS[arch][2])
        folders.append(out)
        expected[out] = logits(model)
    torch_side("logits", arch, f"{folder}/base", *folders)
    for out, want in expected.items():
        assert np.abs(want - np.load(f"{folder}/base.npy")).max() > 1e-4
        np.testing.assert_allclose(np.load(out + ".npy"), want, atol=1e-4, err_msg=out)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_pytorch_peft_modules_to_save_load_into_tunix(arch, twins):
    """PEFT's copies of lm_head, embed_tokens and every norm become the tunix model's `ModulesToSave` copies."""
    folder = twins[arch]
    model = MissModel.from_pretrained(tunix_model(arch, folder), f"{folder}/saved", name_map=ARCHS[arch][2])
    saved = model.adapters["default"].saved
    assert {"lm_head", "embedder", "final_norm", "layers.1.post_attention_layernorm"} <= set(saved)
    assert ("layers.0.attn.q_norm" in saved) == (arch == "qwen3")
    want = np.load(f"{folder}/saved.npy")
    assert np.abs(want - np.load(f"{folder}/base.npy")).max() > 1e-3
    np.testing.assert_allclose(logits(model), want, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tunix_modules_to_save_load_in_pytorch_peft(arch, twins, tmp_path):
    """Trained copies of lm_head (an Einsum: stored as torch's (vocab, d) weight), the embedder and the final
    norm, saved under their torch names, give PyTorch PEFT the tunix model's logits."""
    folder = twins[arch]
    model = get_peft_model(tunix_model(arch, folder), MissConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                 modules_to_save=["lm_head", "embedder", "final_norm"]))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=model.trainable)
    ids = jnp.asarray(IDS)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((8, 8), bool)), (2, 8, 8))

    @nnx.jit
    def step(m, opt):
        def loss_fn(m):
            out = m(ids[:, :-1], jnp.broadcast_to(jnp.arange(7), (2, 7)), None, mask[:, :-1, :-1])[0]
            return optax.softmax_cross_entropy_with_integer_labels(out, ids[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable))(m)
        opt.update(m, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(3)]
    assert losses[-1] < losses[0]
    out = str(tmp_path / "saved")
    nnx_io.save_pretrained(model, out, ARCHS[arch][2])
    assert files.read_config(out)["modules_to_save"] == ["lm_head", "model.embed_tokens", "model.norm"]
    torch_side("logits", arch, f"{folder}/base", out)
    want = logits(model)
    assert np.abs(want - np.load(f"{folder}/base.npy")).max() > 1e-3
    np.testing.assert_allclose(np.load(out + ".npy"), want, atol=1e-4)
    again = MissModel.from_pretrained(tunix_model(arch, folder), out, name_map=ARCHS[arch][2])
    np.testing.assert_allclose(logits(again), want, atol=1e-5)


# --------------------------------------------------------------------------- miss-jax check --nnx


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("arch, adapter", [("qwen3", "bat"), ("qwen3", "saved"), ("llama", "saved")])
def test_check_nnx_passes_on_pytorch_peft_folders(capsys, twins, arch, adapter):
    folder = twins[arch]
    family = {"qwen3": "tunix-qwen3", "llama": "tunix-llama3"}[arch]
    code, out, err = run_cli(capsys, "check", "--nnx", family, "--base", f"{folder}/base", "--adapter",
                             f"{folder}/{adapter}", "--torch-python", TORCH_PYTHON, "--seq-len", "5", "--batch", "3")
    assert code == 0, out + err
    assert "NNX: " + family in out and "OK" in out and err == ""
    assert float(re.search(r"max \|jax - torch\| = (\S+)", out).group(1)) <= 1e-4


def test_check_nnx_exit_codes_and_one_line_errors(capsys, twins, tmp_path, monkeypatch):
    folder = twins["qwen3"]
    base, adapter = f"{folder}/base", f"{folder}/balance"
    code, out, _ = run_cli(capsys, "check", "--nnx", "tunix-qwen3", "--base", base, "--adapter", adapter,
                           "--atol", "1e-12")  # MISS_JAX_TORCH_PYTHON is the default --torch-python
    assert code == 1 and "MISMATCH" in out
    cases = [
        (["--nnx", "tunix-llama3"], r"model_type is 'qwen3', but this --nnx family builds 'llama'"),
        (["--nnx", "tunix-qwen3", "--torch-python", str(tmp_path / "nope")], r"cannot run --torch-python"),
        (["--nnx", "tunix-qwen3", "--torch-python", sys.executable], r"the PyTorch side .* failed: .*needs torch"),
        (["--torch-python", TORCH_PYTHON], r"--torch-python is for --nnx checks"),
        (["--nnx", "tunix-qwen3", "--adapter", str(tmp_path)], r"adapter_config\.json"),
    ]
    for extra, message in cases:
        argv = ["check", "--base", base] + (["--adapter", adapter] if "--adapter" not in extra else []) + extra
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert re.search(message, err), err
    monkeypatch.setenv("MISS_JAX_TORCH_PYTHON", "")
    bad = tmp_path / "scaled"
    shutil.copytree(base, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}))
    code, _, err = run_cli(capsys, "check", "--nnx", "tunix-qwen3", "--base", bad, "--adapter", adapter)
    assert code == 2 and "rope_scaling type 'yarn' is not supported" in err


# --------------------------------------------------------------------------- examples/nnx_llm_tunix.py


@pytest.mark.slow
def test_the_tunix_example_trains_saves_and_matches_pytorch(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "nnx_llm_tunix.py")
    done = subprocess.run([sys.executable, script, "--out", str(tmp_path), "--steps", "8"], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "MISS_JAX_TORCH_PYTHON": TORCH_PYTHON})
    assert done.returncode == 0, done.stdout + done.stderr
    first, last = map(float, re.search(r"loss (\S+) -> (\S+) over 8 steps", done.stdout).groups())
    assert last < first
    assert "reloaded into a fresh tunix model: max |logits diff| = 0.00e+00" in done.stdout
    assert "OK: largest difference" in done.stdout and "peft-miss" in done.stdout
    assert files.read_config(str(tmp_path / "adapter"))["modules_to_save"] == ["lm_head"]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_one_entry_point_on_tunix_finds_the_map_saves_loads_and_generates(arch, twins, tmp_path):
    """`miss_jax.get_peft_model` on a tunix model finds its name map from its class; the model's own
    `save_pretrained` / `MissModel.from_pretrained` round-trip it, and greedy `generate` follows the argmax of
    the adapted logits."""
    import miss_jax

    folder = twins[arch]
    pm = miss_jax.get_peft_model(tunix_model(arch, folder), MissConfig(r=4, init_weights="bat", target_modules=TARGETS))
    assert pm.name_map is ARCHS[arch][2]
    blocks = nnx.state(pm, pm.trainable)
    nnx.update(pm, jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(4), a.shape), blocks))
    want = logits(pm)
    assert np.abs(want - np.load(f"{folder}/base.npy")).max() > 1e-3
    pm.save_pretrained(str(tmp_path))
    again = MissModel.from_pretrained(tunix_model(arch, folder), str(tmp_path))
    np.testing.assert_allclose(logits(again), want, atol=1e-5)
    ids = IDS[:, :4]
    for _ in range(3):
        b, t = ids.shape
        out, _ = again(jnp.asarray(ids), jnp.broadcast_to(jnp.arange(t), (b, t)), None,
                       jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t)))
        ids = np.concatenate([ids, np.argmax(np.asarray(out)[:, -1], -1)[:, None]], 1)
    np.testing.assert_array_equal(again.generate(IDS[:, :4], max_new_tokens=3).sequences, ids)
