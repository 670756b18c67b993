"""tunix's own loop on MiSS (issue 23): `PeftTrainer` trains exactly the MiSS variables (the active adapters' blocks
and `modules_to_save` copies are `nnx.LoRAParam`, everything else `nnx.Param`: `miss_jax.nnx_variables`),
accumulates gradients as one larger batch, resumes from its own checkpoints as if never stopped; `Sampler`
generates with the adapters unmerged, the greedy tokens of PyTorch PEFT's `PeftModel.generate` (tiny twin; the
real SmolLM2 checkpoint under the `real` marker); and `examples/tunix_train.py` runs. Modern environment only
(`make test-modern`); the PyTorch side runs in `MISS_JAX_TORCH_PYTHON`'s environment (tests/torch_twin.py)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

pytest.importorskip("tunix.sft.peft_trainer")
import orbax.checkpoint as ocp  # noqa: E402
from tunix.generate.sampler import CacheConfig, Sampler  # noqa: E402
from tunix.sft import peft_trainer  # noqa: E402
from tunix.sft import utils as sft_utils  # noqa: E402

from torch_process import TORCH_PYTHON, torch_side  # noqa: E402
from interop import nnx_io  # noqa: E402
from interop.tunix_models import from_transformers  # noqa: E402
from miss_jax import MissConfig, MissModel  # noqa: E402
from miss_jax.nnx import MissNnxModel, apply_miss, get_peft_model, miss_layers  # noqa: E402
from miss_jax.nnx_variables import MissParam, check_trainable, frozen_type, trainable_type  # noqa: E402
from real_checkpoint import smollm2_folder  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
import nnx_llm_tunix  # noqa: E402
import tunix_train  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = [1, 5, 9, 14, 3, 60, 22, 7]  # torch_twin.IDS[0]: no token is the pad id
NEW_TOKENS = 8
nnx_io.tunix_rules()  # tunix's Einsum layers: their kernels' in / out axes


class IdTokenizer(tunix_train.ByteTokenizer):
    """Token ids written as text ("1 5 9"): prompts given as ids; no BOS, EOS or pad id among them."""

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: Any) -> str:
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> str:
    """A tiny random Qwen 3 as a transformers folder (`examples/nnx_llm_tunix.py`'s, written with NumPy)."""
    folder = str(tmp_path_factory.mktemp("qwen3"))
    nnx_llm_tunix.write_qwen3_folder(folder)
    return folder


def tiny(folder: str) -> MissNnxModel:
    """tunix's Qwen 3 of `folder` with adapter 'default' (every projection + a copy of lm_head), active and
    trainable, and adapter 'other' (q_proj), inactive."""
    model = get_peft_model(from_transformers(folder), MissConfig(r=4, target_modules=TARGETS,
                                                                 modules_to_save=["lm_head"]))
    model.add_adapter("other", MissConfig(r=4, target_modules=["q_proj"]))
    return model


def batches(n: int, batch: int, seed: int = 0, length: int = 12) -> np.ndarray:
    """`(n, batch, length)` random token ids of the tiny Qwen 3."""
    vocab = nnx_llm_tunix.DIMS["vocab_size"]
    return np.random.default_rng(seed).integers(1, vocab, (n, batch, length)).astype(np.int32)


def trainer(model: nnx.Module, tx: optax.GradientTransformation, **config: Any) -> peft_trainer.PeftTrainer:
    """tunix's `PeftTrainer` with its default loss and `config`'s `TrainingConfig` fields."""
    training = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, **config)
    return peft_trainer.PeftTrainer(model, tx, training).with_gen_model_input_fn(tunix_train.model_inputs)


def keys(paths: set[tuple]) -> set[str]:
    return {".".join(map(str, p)) for p in paths}


def lora_paths(model: nnx.Module) -> set[tuple]:
    return {p for p, node in nnx.iter_graph(model) if isinstance(node, nnx.LoRAParam)}


def selected_paths(model: MissNnxModel) -> set[tuple]:
    """The graph paths `model.trainable` (the optimizer filter miss-jax documents) selects."""
    trainable = model.trainable
    return {p for p, node in nnx.iter_graph(model) if isinstance(node, nnx.Param) and trainable(p, node)}


def sampler(model: nnx.Module, cache_size: int = 32) -> Sampler:
    """tunix's `Sampler` on `model` (a tunix LLM, here adapted in place) with token ids as text."""
    config = model.config
    cache = CacheConfig(cache_size=cache_size, num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
                        head_dim=config.head_dim)
    return Sampler(model, IdTokenizer(), cache)


def sample(model: nnx.Module, prompt: list[int], new_tokens: int, **kwargs: Any) -> Any:
    """Greedy tokens of tunix's `Sampler` on `model` after `prompt` (unpadded)."""
    return sampler(model, 2 * (len(prompt) + new_tokens))(
        [" ".join(map(str, prompt))], max_generation_steps=new_tokens, max_prompt_length=len(prompt), **kwargs)


# --------------------------------------------------------------------------- which variables are LoRA params


def test_trainable_variables_are_exactly_the_lora_params_through_the_lifecycle(qwen3, tmp_path):
    model = tiny(qwen3)
    default = lora_paths(model)
    assert default == selected_paths(model) and sft_utils.is_lora_enabled(model)
    found = keys(default)
    assert "base_model.layers.1.mlp.down_proj.miss_block.default" in found
    assert "base_model.lm_head.modules_to_save.default.w" in found
    assert len(found) == 2 * len(TARGETS) + 1 and not any("other" in k for k in found)

    model.set_adapter("other")
    assert keys(lora_paths(model)) == {f"base_model.layers.{i}.attn.q_proj.miss_block.other" for i in range(2)}
    assert lora_paths(model) == selected_paths(model)
    assert all(type(layer.miss_block["default"]) is nnx.Param for layer in miss_layers(model.base_model).values())
    model.set_requires_grad("other", False)  # nothing trains: tunix would train every weight, so it is refused
    assert not sft_utils.is_lora_enabled(model)
    with pytest.raises(ValueError, match=r"Nothing in this model is trainable .* set_requires_grad"):
        check_trainable(model)
    model.set_adapter("default")
    assert lora_paths(model) == default
    with model.disable_adapter():
        assert not lora_paths(model)
    assert lora_paths(model) == default
    model.delete_adapter("other")
    assert lora_paths(model) == default

    folder = str(tmp_path / "adapter")
    model.save_pretrained(folder)
    frozen = MissModel.from_pretrained(from_transformers(qwen3), folder)  # PEFT: frozen by default
    assert frozen.frozen_adapters == ("default",) and not lora_paths(frozen)
    loaded = MissModel.from_pretrained(from_transformers(qwen3), folder, is_trainable=True)
    assert keys(lora_paths(loaded)) == keys(default)

    plain = model.merge_and_unload()
    assert not lora_paths(plain) and not miss_layers(plain)


def test_plain_apply_miss_blocks_are_lora_params_and_other_param_classes_keep_theirs():
    class Gain(nnx.Param):
        pass

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.proj = nnx.Linear(8, 8, rngs=rngs)
            self.head = nnx.Sequential(nnx.Linear(8, 8, rngs=rngs))
            self.head.gain = Gain(jnp.ones(8))

    assert MissParam is nnx.LoRAParam
    plain = apply_miss(Net(nnx.Rngs(0)), MissConfig(r=2, target_modules=["proj"]), nnx.Rngs(1))
    assert type(plain.proj.miss_block["default"]) is nnx.LoRAParam
    model = get_peft_model(Net(nnx.Rngs(0)), MissConfig(r=2, target_modules=["proj"], modules_to_save=["head"]))
    copy, original = model.base_model.head.modules_to_save["default"], model.base_model.head.original_module
    assert isinstance(copy.gain, Gain) and isinstance(copy.gain, nnx.LoRAParam)
    assert type(copy.gain) is trainable_type(Gain) and frozen_type(trainable_type(Gain)) is Gain
    assert type(original.gain) is Gain and type(copy.layers[0].kernel) is nnx.LoRAParam
    model.set_requires_grad("default", False)
    assert type(copy.gain) is Gain and type(copy.layers[0].kernel) is nnx.Param


# --------------------------------------------------------------------------- PeftTrainer


def test_peft_trainer_moves_only_the_miss_variables_and_the_sampler_takes_them(qwen3):
    """AdamW with weight decay moves every variable it is given: only the active adapter's blocks and its lm_head
    copy move; the base weights, the original lm_head and the inactive adapter's blocks stay bit-equal."""
    model = tiny(qwen3)
    sampler_before = sampler(model.base_model)
    before = tunix_train.params(model)
    trainer(model, optax.adamw(1e-2, weight_decay=0.1), max_steps=3).train(
        tunix_train.training_inputs(batches(3, 2)))
    after = tunix_train.params(model)
    moved = {p for p in before if not np.array_equal(before[p], after[p])}
    assert moved == lora_paths(model) == selected_paths(model)
    assert len(before) - len(moved) > 20  # base weights, the original lm_head, adapter 'other'

    # tunix's weight sync (RL): a sampler built before training takes the trained LoRA params, and only those
    sampler_before.transformer_state = nnx.state(model.base_model, nnx.LoRAParam)
    prompt = [" ".join(map(str, PROMPT))]
    got = sampler_before(prompt, max_generation_steps=NEW_TOKENS, return_logprobs=True)
    want = sampler(model.base_model)(prompt, max_generation_steps=NEW_TOKENS, return_logprobs=True)
    np.testing.assert_array_equal(got.tokens[0], want.tokens[0])
    np.testing.assert_allclose(got.logprobs[0], want.logprobs[0], atol=1e-6)


def test_gradient_accumulation_equals_the_larger_batch(qwen3):
    """SGD over 2 micro-batches of 2 accumulated = one step on the batch of 4 (tunix's loss is a per-token mean,
    and every micro-batch has as many tokens)."""
    micro = batches(2, 2)
    accumulated, large, half = tiny(qwen3), tiny(qwen3), tiny(qwen3)
    start = tunix_train.params(large)
    trainer(accumulated, optax.sgd(0.5), max_steps=1, gradient_accumulation_steps=2).train(
        tunix_train.training_inputs(micro))
    trainer(large, optax.sgd(0.5), max_steps=1).train(tunix_train.training_inputs(micro.reshape(1, 4, -1)))
    trainer(half, optax.sgd(0.5), max_steps=1).train(tunix_train.training_inputs(micro[:1]))
    a, b, c = (tunix_train.params(m) for m in (accumulated, large, half))
    assert max(np.abs(b[p] - start[p]).max() for p in start) > 1e-3  # the step moved the adapter
    for p in a:
        np.testing.assert_allclose(a[p], b[p], atol=1e-6, err_msg=".".join(map(str, p)))
    assert max(np.abs(c[p] - b[p]).max() for p in c) > 1e-4  # one micro-batch alone is another step


@pytest.mark.slow
def test_checkpoint_of_the_lora_params_resumes_as_if_uninterrupted(qwen3, tmp_path):
    data = tunix_train.training_inputs(batches(8, 2))
    options = dict(gradient_accumulation_steps=2, checkpoint_root_directory=str(tmp_path),
                   checkpointing_options=ocp.CheckpointManagerOptions(save_interval_steps=1, max_to_keep=10))
    uninterrupted = tiny(qwen3)
    trainer(uninterrupted, optax.adam(1e-2), max_steps=4, gradient_accumulation_steps=2).train(data)

    first = tiny(qwen3)
    trainer(first, optax.adam(1e-2), max_steps=2, **options).train(data)
    with open(tmp_path / "2" / "model_params" / "_METADATA", encoding="utf-8") as f:  # orbax's tree of the item
        saved = list(json.load(f)["tree_metadata"])
    assert len(saved) == len(lora_paths(first)) == 2 * len(TARGETS) + 1  # the LoRA params only, no base weight
    assert all("'default'" in k and ("miss_block" in k or "modules_to_save" in k) for k in saved), saved

    resumed = tiny(qwen3)
    resuming = trainer(resumed, optax.adam(1e-2), max_steps=4, **options)
    assert resuming.train_steps == 2
    for p, value in tunix_train.params(first).items():  # restored: the LoRA params; the base is resumed's own
        np.testing.assert_array_equal(tunix_train.params(resumed)[p], value)
    resuming.train(data)
    got, want = tunix_train.params(resumed), tunix_train.params(uninterrupted)
    assert max(np.abs(got[p] - tunix_train.params(first)[p]).max() for p in got) > 1e-4  # steps 3 and 4 ran
    for p in want:
        np.testing.assert_allclose(got[p], want[p], atol=1e-6, err_msg=".".join(map(str, p)))


# --------------------------------------------------------------------------- Sampler against PyTorch PEFT



@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> str:
    """The tiny Llama twin (OUT/base, PEFT adapters OUT/bat and OUT/saved) and PEFT's `generate` greedy tokens."""
    if not TORCH_PYTHON:
        pytest.fail("set MISS_JAX_TORCH_PYTHON to a Python with torch + transformers + peft (make test-modern does)")
    folder = str(tmp_path_factory.mktemp("llama"))
    torch_side("make", "llama", folder)
    np.save(f"{folder}/prompt.npy", np.array([PROMPT]))
    torch_side("generate", f"{folder}/base", f"{folder}/prompt.npy", str(NEW_TOKENS), f"{folder}/bat",
               f"{folder}/saved")
    return folder


@pytest.mark.parametrize("adapter", ["bat", "saved"])
def test_sampler_greedy_tokens_equal_pytorch_peft_generate(twin, adapter):
    """'bat': random blocks on every projection; 'saved': blocks on q/v plus copies of lm_head, the embedding and
    every norm."""
    model = MissModel.from_pretrained(from_transformers(f"{twin}/base"), f"{twin}/{adapter}")
    assert not model.merged_adapters
    got = sample(model.base_model, PROMPT, NEW_TOKENS, return_logprobs=True)
    np.testing.assert_array_equal(got.tokens[0], np.load(f"{twin}/{adapter}.generate.npy")[0])
    with model.disable_adapter():
        base = sample(model.base_model, PROMPT, NEW_TOKENS, return_logprobs=True)
    assert np.abs(np.subtract(got.logprobs[0], base.logprobs[0])).max() > 1e-3  # the adapter counts


@pytest.mark.real
@pytest.mark.slow
def test_real_checkpoint_sampler_greedy_tokens_equal_pytorch_peft_generate(tmp_path):
    """SmolLM2-135M-Instruct with a PEFT MiSS adapter born in PyTorch (bat, small random blocks on every
    projection): tunix's Sampler and `PeftModel.generate` pick the same greedy tokens."""
    if not TORCH_PYTHON:
        pytest.fail("set MISS_JAX_TORCH_PYTHON to a Python with torch + transformers + peft (make test-real does)")
    base, out = smollm2_folder(), str(tmp_path)
    torch_side("real", base, out)
    torch_side("generate", base, f"{out}/prompt.npy", str(NEW_TOKENS), f"{out}/peft")
    prompt = np.load(f"{out}/prompt.npy")[0].tolist()
    model = MissModel.from_pretrained(from_transformers(base), f"{out}/peft")
    config = json.load(open(f"{base}/config.json"))
    assert config["num_hidden_layers"] == model.base_model.config.num_layers == 30
    got = sample(model.base_model, prompt, NEW_TOKENS)
    np.testing.assert_array_equal(got.tokens[0], np.load(f"{out}/peft.generate.npy")[0])


# --------------------------------------------------------------------------- examples/tunix_train.py


@pytest.mark.slow
def test_the_example_trains_samples_saves_and_resumes(tmp_path, capsys):
    if not TORCH_PYTHON:
        pytest.fail("set MISS_JAX_TORCH_PYTHON to a Python with torch + transformers + peft (make test-modern does)")
    argv = ["--out", str(tmp_path), "--steps", "4", "--torch-python", TORCH_PYTHON]
    assert tunix_train.main(argv) == 0
    out = capsys.readouterr().out
    assert "over steps 0..4" in out and "outside the MiSS blocks and the lm_head copy: 0" in out
    assert "Sampler (greedy, adapters unmerged): 'The fox' -> '" in out and "OK: largest difference" in out
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    assert tunix_train.main(argv) == 0  # tunix restores its checkpoint at step 4: nothing left to train
    assert "resumed at step 4; nothing left to train" in capsys.readouterr().out
