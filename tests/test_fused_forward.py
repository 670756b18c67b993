"""The fused balance forward (`ops.adapted_matmul`: one matmul with the adapted kernel) on whole models:
taken wherever `ops.fuses` says so (at least `ops.FUSED_MIN_ROWS` rows, one dtype), equal to real PEFT's
outputs, and equal to the two-matmul form in outputs and adapter gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import tiny_models as tm
from interop_helpers import ATOL, torch_peft_model
from miss_jax import MissModel, ops

# batch x seq = 256 rows: the fused form (`ops.FUSED_MIN_ROWS`) in every adapted layer of the encoder/decoder.
BATCH, SEQ = 4, 64
CASES = {
    "llama": dict(r=4, init_weights=False, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    "bert": dict(r=8, init_weights=False, target_modules=["query", "value", "dense"]),
    "t5": dict(r=4, init_weights="mini", mini_r=4, target_modules=["q", "v", "wi", "wo"]),
}


def count_fused(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the traced calls of `ops.adapted_matmul` (at trace time, so cached programs count once)."""
    calls = [0]
    real = ops.adapted_matmul

    def spy(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "adapted_matmul", spy)
    return calls


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    arch = request.param
    torch_model = torch_peft_model(arch, {"default": peft.MissConfig(**CASES[arch])})
    folder = str(tmp_path_factory.mktemp(arch))
    torch_model.save_pretrained(folder)
    inputs = tm.inputs(arch, batch=BATCH, seq=SEQ)
    with torch.no_grad():
        want = torch_model(**{k: torch.from_numpy(v).long() for k, v in inputs.items()}).logits.numpy()
    return arch, MissModel.from_pretrained(tm.flax_model(arch), folder, is_trainable=True), inputs, want


def loss_and_grads(model: MissModel, inputs: dict) -> tuple[np.ndarray, dict]:
    f = model.apply_fn()
    g = jax.random.normal(jax.random.PRNGKey(0), f(model.params, model.adapter_params, **inputs).logits.shape)

    def loss(trainable):
        return jnp.vdot(f(model.params, trainable, **inputs).logits, g)

    logits = f(model.params, model.trainable_params(), **inputs).logits
    return np.asarray(logits), jax.tree_util.tree_map(np.asarray, jax.jit(jax.grad(loss))(model.trainable_params()))


def test_fused_forward_equals_peft_and_the_two_matmul_form(pair, monkeypatch):
    arch, model, inputs, want = pair
    calls = count_fused(monkeypatch)
    fused_logits, fused_grads = loss_and_grads(model, inputs)
    assert calls[0] > 0, "the fused form was not taken"
    np.testing.assert_allclose(fused_logits, want, atol=ATOL)

    monkeypatch.setattr(ops, "FUSED_MIN_ROWS", 10**9)
    calls[0] = 0
    plain_logits, plain_grads = loss_and_grads(model, inputs)
    assert calls[0] == 0
    np.testing.assert_allclose(fused_logits, plain_logits, atol=1e-5)
    leaves = jax.tree_util.tree_leaves(plain_grads)
    assert leaves and all(np.abs(leaf).max() > 0 for leaf in leaves)
    for a, b in zip(jax.tree_util.tree_leaves(fused_grads), leaves):  # float32 rounding, relative to the scale
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max() + 1e-6, (np.abs(a - b).max(), np.abs(b).max())


def test_few_rows_and_bf16_keep_the_two_matmul_form(pair, monkeypatch):
    """Decoding-sized inputs, and a bf16 base with float32 blocks (PEFT's autocast keeps the adapter's term
    in float32), never build the adapted kernel."""
    arch, model, inputs, _ = pair
    calls = count_fused(monkeypatch)
    small = {k: v[:1, :8] for k, v in inputs.items()}
    model(**small)
    assert calls[0] == 0


def test_fused_forward_builds_each_adapted_kernel_when_its_layer_runs(monkeypatch):
    """The compiled forward holds no more temporary memory than the two-matmul form's (XLA's memory analysis):
    the adapted kernels are built layer by layer, not all at the program's start (`ops` keeps XLA:CPU's
    scheduler from hoisting them; without that, this model's temporaries grow by ~10 MiB, every adapted kernel)."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    from miss_jax import MissConfig, get_peft_model

    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    model = get_peft_model(FlaxLlamaForCausalLM(config, seed=0),
                           MissConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    ids = jnp.ones((2, 128), jnp.int32)
    forward = model.apply_fn()

    def temp_bytes() -> int:
        program = jax.jit(lambda p, a, i: forward(p, a, input_ids=i).logits)
        return program.lower(model.params, model.adapter_params, ids).compile().memory_analysis().temp_size_in_bytes

    calls = count_fused(monkeypatch)
    fused = temp_bytes()
    assert calls[0] == 4 * 7
    monkeypatch.setattr(ops, "FUSED_MIN_ROWS", 10**9)
    assert fused <= 1.05 * temp_bytes()
