"""QMiSS: MiSS on tunix's Llama 3 / Qwen 3 whose frozen base is quantized by qwix (`miss_jax.quantized`), on tiny
models built from transformers folders that the PyTorch side writes (tests/torch_twin.py). Runs in the modern
environment (`make test-modern`); the PyTorch side runs in `MISS_JAX_TORCH_PYTHON`'s environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

qwix = pytest.importorskip("qwix")
pytest.importorskip("tunix.models.llama3.model")

from torch_process import TORCH_PYTHON, torch_side  # noqa: E402
from interop import nnx_io  # noqa: E402
from interop import safetensors_io as files  # noqa: E402
from interop.nnx_check import causal_logits  # noqa: E402
from interop.tunix_models import from_transformers  # noqa: E402
from miss_jax import MissConfig, MissModel  # noqa: E402
from miss_jax import quantized as qm  # noqa: E402
from miss_jax.nnx import MissLinear, MissParam, get_peft_model, merge_and_unload, miss_layers  # noqa: E402

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "qmiss.py")
IDS = np.array([[1, 5, 9, 14, 3, 60, 22, 7], [2, 33, 4, 4, 18, 51, 0, 12]])  # torch_twin.IDS
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWIX_PATHS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"  # the same layers, as qwix names them
NAME_MAP = nnx_io.TUNIX_LLAMA3  # the same map as TUNIX_QWEN3
# int8 per output channel; the 4-bit types in blocks of 8 along the last input axis (every tiny layer's divides)
QUANT = {"int8": qm.Quantization("int8"), "int4": qm.Quantization("int4", 8), "nf4": qm.Quantization("nf4", 8),
         "float8_e4m3fn": qm.Quantization("float8_e4m3fn")}
STORED = {"int8": jnp.int8, "int4": jnp.int4, "nf4": jnp.uint4, "float8_e4m3fn": jnp.float8_e4m3fn}

pytestmark = pytest.mark.skipif(not TORCH_PYTHON, reason="set MISS_JAX_TORCH_PYTHON (make test-modern does)")



@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict[str, str]:
    """Each arch's tiny transformers folder made by the torch side: OUT/base (+ its logits OUT/base.npy)."""
    out = {}
    for arch in ("llama", "qwen3"):
        folder = str(tmp_path_factory.mktemp(arch))
        torch_side("base", arch, folder, "{}")
        out[arch] = folder
    return out


def float_model(twins, arch: str) -> nnx.Module:
    return from_transformers(f"{twins[arch]}/base")


def train(peft_model, steps: int = 4) -> list[float]:
    """`steps` adam steps of next-token loss on IDS with `peft_model.trainable`; the losses."""
    optimizer = nnx.Optimizer(peft_model, optax.adam(3e-2), wrt=peft_model.trainable)
    ids = jnp.asarray(IDS)
    t = ids.shape[1] - 1
    positions = jnp.broadcast_to(jnp.arange(t), (2, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (2, t, t))

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            logits = model(ids[:, :-1], positions, None, mask)[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, peft_model.trainable))(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(peft_model, optimizer)) for _ in range(steps)]


def frozen_state(model: nnx.Module) -> dict[tuple, np.ndarray]:
    """Every variable but the MiSS blocks (and the rng state), by path, as float64 NumPy (exact for the 4-bit and
    int8 storage types too)."""
    return {tuple(p): np.asarray(v.get_value()).astype(np.float64) for p, v in nnx.to_flat_state(nnx.state(model))
            if not isinstance(v, (MissParam, nnx.RngState))}


def error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --------------------------------------------------------------------------- quantizing


@pytest.mark.parametrize("qtype", sorted(QUANT))
def test_the_quantized_base_computes_what_qwix_ptq_computes(twins, qtype):
    """`quantize` stores qwix's quantized values (1 byte or 4 bits a weight) and its forward equals qwix's own PTQ
    model (`qwix.quantize_model` with a `PtqProvider` rule on the same layers, same type and tiles). On Llama 3:
    qwix 0.1.8's PTQ cannot run tunix's Qwen 3, whose Einsum casts its kernel (`jnp.astype(self.w.value, ...)`
    raises on qwix's quantized weight); `quantize` runs both (the tests below)."""
    arch = "llama"
    quant = QUANT[qtype]
    reference = causal_logits(float_model(twins, arch), IDS)
    np.testing.assert_allclose(reference, np.load(f"{twins[arch]}/base.npy"), atol=1e-4)  # the float twin
    b, t = IDS.shape
    rule = qwix.QuantizationRule(module_path=QWIX_PATHS, weight_qtype=qm.QTYPES[qtype], tile_size=quant.tile_size)
    ptq = qwix.quantize_model(float_model(twins, arch), qwix.PtqProvider([rule]), jnp.asarray(IDS),
                              jnp.broadcast_to(jnp.arange(t), (b, t)), None,
                              jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t)))
    model = qm.quantize(float_model(twins, arch), quant)
    layers = qm.quantized_layers(model)
    assert len(layers) == 2 * len(TARGETS) and "lm_head" not in layers  # all-linear leaves the head alone
    for layer in layers.values():
        kernel = getattr(layer, layer.kernel_rule().kernel)
        assert isinstance(kernel, qm.QuantizedKernel) and not isinstance(kernel, nnx.Param)
        assert kernel.get_value().dtype == STORED[qtype]
    got = causal_logits(model, IDS)
    assert error(got, causal_logits(ptq, IDS)) < 1e-5
    assert error(got, reference) > 1e-5  # quantization changes the logits


def test_a_type_qwix_lacks_or_a_tile_that_does_not_fit_is_refused_and_nothing_changes(twins):
    model = float_model(twins, "llama")
    before = causal_logits(model, IDS)
    with pytest.raises(ValueError, match=r"no weight quantization type 'int3x'.*'int8', 'int4', 'nf4'"):
        qm.quantize(model, "int3x")
    with pytest.raises(ValueError, match=r"tile_size 5 does not divide its last input axis"):
        qm.quantize(model, "nf4", tile_size=5)
    with pytest.raises(ValueError, match=r"tile_size must be a positive int"):
        qm.Quantization("int4", 0)
    with pytest.raises(ValueError, match=r"Pass tile_size inside the Quantization"):
        qm.quantize(model, qm.Quantization("int4"), tile_size=8)
    with pytest.raises(ValueError, match=r"Target modules \['nope_proj'\] not found"):
        qm.quantize(model, "int8", target_modules=["nope_proj"])
    assert qm.quantized_layers(model) == {}
    assert all(isinstance(layer.w, nnx.Param) for layer in [model.layers[0].attn.q_proj, model.lm_head])
    np.testing.assert_array_equal(causal_logits(model, IDS), before)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("qtype, variant", [("int8", True), ("nf4", True), ("nf4", "mini")])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_training_moves_only_the_float32_miss_blocks(twins, arch, qtype, variant):
    model = qm.quantize(float_model(twins, arch), QUANT[qtype])
    base = causal_logits(model, IDS)
    peft_model = get_peft_model(model, MissConfig(r=4, mini_r=8, init_weights=variant, target_modules=TARGETS))
    np.testing.assert_array_equal(causal_logits(peft_model, IDS), base)  # zero blocks: the quantized base
    layers = miss_layers(peft_model.base_model)
    assert len(layers) == 2 * len(TARGETS)
    assert all(isinstance(layer.base_layer, qm.QuantizedLayer) for layer in layers.values())
    frozen = frozen_state(peft_model)
    losses = train(peft_model)
    assert losses[-1] < losses[0]
    after = frozen_state(peft_model)
    assert after.keys() == frozen.keys()
    for path, value in frozen.items():  # the quantized kernels, their scales, norms, embeddings, the head
        np.testing.assert_array_equal(after[path], value, err_msg=str(path))
    for layer in layers.values():
        block = layer.miss_block["default"].get_value()
        assert block.dtype == jnp.float32 and np.abs(np.asarray(block)).max() > 0
        assert layer.base_layer.kernel_scale.get_value().dtype == jnp.float32
    assert error(causal_logits(peft_model, IDS), base) > 1e-3


def kernel_sized_float_residuals(peft_model, capsys) -> list[str]:
    """The float32 arrays shaped like an adapted layer's kernel that a train step keeps from its forward pass for
    its backward pass (`jax.ad_checkpoint.print_saved_residuals`)."""
    graphdef, blocks, rest = nnx.split(peft_model, peft_model.trainable, ...)
    ids = jnp.asarray(IDS)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((8, 8), bool)), (2, 8, 8))

    def loss(blocks):  # a train step's: the gradient of the blocks only
        out = nnx.merge(graphdef, blocks, rest)(ids, jnp.broadcast_to(jnp.arange(8), (2, 8)), None, mask)[0]
        return jnp.mean(out ** 2)

    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(loss, blocks)
    shapes = {",".join(map(str, getattr(layer.base_layer, layer.rule.kernel).shape))
              for layer in miss_layers(peft_model.base_model).values()}
    return [line for line in capsys.readouterr().out.splitlines()
            if any(line.startswith(f"f32[{shape}]") for shape in shapes)]


def test_the_backward_pass_keeps_no_dequantized_kernel(twins, capsys):
    """Under `jax.checkpoint` with nothing saved, the train step keeps the quantized kernels only: no float32
    array of a kernel's shape crosses from the forward to the backward pass (a float base keeps its kernels)."""
    config = MissConfig(r=4, target_modules=TARGETS)
    float_saved = kernel_sized_float_residuals(get_peft_model(float_model(twins, "llama"), config), capsys)
    assert len(float_saved) >= 6  # at least the MLP kernels (nnx.Linear) of both layers
    quantized = get_peft_model(qm.quantize(float_model(twins, "llama"), "int8"), config)
    assert kernel_sized_float_residuals(quantized, capsys) == []


# --------------------------------------------------------------------------- PEFT folder, merge, generate


@pytest.fixture(scope="module")
def trained(twins, tmp_path_factory) -> dict[str, tuple]:
    """Per arch: (QMiSS model on an nf4 base, trained; its PEFT folder; its logits)."""
    out = {}
    for arch in ("llama", "qwen3"):
        peft_model = get_peft_model(qm.quantize(float_model(twins, arch), QUANT["nf4"]),
                                    MissConfig(r=4, target_modules=TARGETS))
        losses = train(peft_model, 6)
        assert losses[-1] < losses[0]
        folder = str(tmp_path_factory.mktemp(arch) / "adapter")
        nnx_io.save_pretrained(peft_model, folder, NAME_MAP)
        out[arch] = (peft_model, folder, causal_logits(peft_model, IDS))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_adapter_folder_loads_in_pytorch_peft_on_the_float_twin(twins, trained, arch):
    peft_model, folder, qmiss = trained[arch]
    config, tensors = files.read_config(folder), files.read_tensors(folder)
    assert config["peft_type"] == "MISS" and config["r"] == 4
    assert len(tensors) == 2 * len(TARGETS) and all(k.endswith(".miss_block") for k in tensors)  # the adapter only
    assert all(np.asarray(v).dtype == np.float32 for v in tensors.values())
    torch_side("logits", arch, f"{twins[arch]}/base", folder)
    pytorch = np.load(folder + ".npy")
    float_base = np.load(f"{twins[arch]}/base.npy")
    on_float = causal_logits(MissModel.from_pretrained(float_model(twins, arch), folder, name_map=NAME_MAP), IDS)
    assert error(pytorch, float_base) > 1e-3  # the adapter changes the float twin's logits
    assert error(on_float, pytorch) < 1e-4  # the same adapter on the float tunix model: PEFT's logits
    with peft_model.disable_adapter():
        quantization = error(causal_logits(peft_model, IDS), float_base)
    assert error(qmiss, pytorch) < 2 * quantization + 1e-4  # QMiSS differs from PEFT by the quantization only


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_merge_for_export_dequantizes_merges_in_float_and_reports(twins, trained, arch):
    peft_model, _, qmiss = trained[arch]
    with peft_model.disable_adapter():
        quantized_base = causal_logits(peft_model, IDS)
    float_base = float_model(twins, arch)
    merged, report = qm.merge_for_export(peft_model, lambda m: causal_logits(m, IDS), float_model=float_base)
    assert report.layers == 2 * len(TARGETS)
    assert report.merge_error < 1e-4
    assert report.quantization_error == pytest.approx(error(quantized_base, causal_logits(float_base, IDS)))
    assert report.quantization_error > 1e-4
    assert miss_layers(merged) == {} and qm.quantized_layers(merged) == {}
    kernels = [v for p, v in nnx.to_flat_state(nnx.state(merged)) if p[-1] in ("w", "kernel")]
    assert kernels and all(isinstance(v, nnx.Param) and v.get_value().dtype == jnp.float32 for v in kernels)
    np.testing.assert_allclose(causal_logits(merged, IDS), qmiss, atol=1e-4)


def test_merging_into_quantized_kernels_and_bat_are_refused_leaving_the_model_as_it_was(twins):
    peft_model = get_peft_model(qm.quantize(float_model(twins, "llama"), "int8"),
                                MissConfig(r=4, init_weights=False, target_modules=TARGETS))
    before = causal_logits(peft_model, IDS)
    for merge in (peft_model.merge_adapter, peft_model.merge_and_unload,
                  lambda: merge_and_unload(peft_model.base_model)):
        with pytest.raises(ValueError, match=r"quantized \(int8, miss_jax.quantized\).*merge_for_export"):
            merge()
        assert peft_model.merged_adapters == [] and len(miss_layers(peft_model.base_model)) == 2 * len(TARGETS)
    with pytest.raises(ValueError, match=r"bat adapter.*quantized.*balance or mini"):
        peft_model.add_adapter("b", MissConfig(r=4, init_weights="bat", target_modules=TARGETS))
    assert list(peft_model.adapters) == ["default"]
    assert all(list(layer.variants) == ["default"] for layer in miss_layers(peft_model.base_model).values())
    np.testing.assert_array_equal(causal_logits(peft_model, IDS), before)
    model = qm.quantize(float_model(twins, "qwen3"), "int8")
    with pytest.raises(ValueError, match=r"bat adapter"):
        get_peft_model(model, MissConfig(r=4, init_weights="bat", target_modules=TARGETS))
    assert miss_layers(model) == {}


def test_quantizing_after_adapting_equals_adapting_after_quantizing(twins):
    blocks = {}
    first = get_peft_model(float_model(twins, "llama"), MissConfig(r=4, init_weights=False, target_modules=TARGETS))
    for key, layer in miss_layers(first.base_model).items():
        blocks[key] = layer.miss_block["default"].get_value()
    qm.quantize(first, "int8")
    second = get_peft_model(qm.quantize(float_model(twins, "llama"), "int8"), MissConfig(r=4, target_modules=TARGETS))
    for key, layer in miss_layers(second.base_model).items():
        layer.miss_block["default"].set_value(blocks[key])
    assert len(qm.quantized_layers(first)) == 2 * len(TARGETS)
    np.testing.assert_allclose(causal_logits(first, IDS), causal_logits(second, IDS), atol=1e-6)


class Ids:
    """A tokenizer for tunix's sampler over token ids written as text ("1 5 9")."""

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(map(str, ids))

    def bos_id(self) -> int:
        return 1

    def eos_id(self) -> int:
        return 64  # no token of the vocabulary (0..63): every step makes a token

    def pad_id(self) -> int:
        return 0


def greedy(model, prompt: np.ndarray, n: int) -> list[int]:
    """`n` greedy tokens after `prompt` `(t,)`, a full forward per token (no cache)."""
    ids = prompt[None]
    for _ in range(n):
        ids = np.concatenate([ids, causal_logits(model, ids)[:, -1].argmax(-1)[:, None]], axis=1)
    return ids[0, len(prompt):].tolist()


def test_generation_with_tunix_sampler_on_the_quantized_base_and_after_export(twins):
    """tunix's sampler (KV cache) on the QMiSS model gives the tokens of a full forward per token, and the model
    exported by `merge_for_export` generates the same tokens."""
    from tunix.generate import sampler as tunix_sampler

    peft_model = get_peft_model(qm.quantize(float_model(twins, "llama"), QUANT["nf4"]),
                                MissConfig(r=4, init_weights=False, target_modules=TARGETS))
    prompt = np.array([1, 5, 9, 14, 3, 60])  # the sampler puts the tokenizer's bos (1) first
    cache = tunix_sampler.CacheConfig(cache_size=32, num_layers=2, num_kv_heads=2, head_dim=8)
    sampled = tunix_sampler.Sampler(peft_model.base_model, Ids(), cache)(["5 9 14 3 60"], max_generation_steps=6)
    want = greedy(peft_model, prompt, 6)
    assert [int(t) for t in sampled.tokens[0]] == want
    assert sampled.text[0] == " ".join(map(str, want))
    merged, _ = qm.merge_for_export(peft_model, lambda m: causal_logits(m, prompt[None]))
    assert greedy(merged, prompt, 6) == want


# --------------------------------------------------------------------------- the benchmark


@pytest.mark.slow
def test_the_benchmark_runs_every_case_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, BENCH, "--preset", "tiny", "--steps", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "qmiss.json").read_text())
    cases = {c["case"]: c for c in results["cases"]}
    assert set(cases) == {"float + MiSS", "int8 + MiSS", "nf4 + MiSS", "int8 + qwix QLoRA", "nf4 + qwix QLoRA"}
    for case in cases.values():
        assert len(case["losses"]) == 2 and all(np.isfinite(case["losses"]))
        assert case["trainable"] > 0 and case["peak_rss_bytes"] > 0 and case["step_peak_bytes"] > 0
    assert cases["int8 + MiSS"]["weight_bytes"] < cases["float + MiSS"]["weight_bytes"]
    assert cases["float + MiSS"]["base_logit_error"] == 0.0 < cases["int8 + MiSS"]["base_logit_error"]
    table = (tmp_path / "qmiss.md").read_text()
    assert all(name in table for name in cases)
