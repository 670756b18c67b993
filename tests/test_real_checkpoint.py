"""Fidelity on a real checkpoint: SmolLM2-135M-Instruct (30 layers, GQA, rope_theta 1e5, tied embeddings), the
Flax model loaded on the user's path (`from_pretrained(folder, from_pt=True)`) and wrapped, against PyTorch
(transformers + PEFT) in the same run: logits, one train step's adapter gradients, greedy tokens of adapters
born on either side, the merged plain model, `miss-jax check`. The conversion is cached (`real_checkpoint`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from helpers import fill_blocks
from interop import get_peft_model_state_dict
from interop.cli import main as cli_main
from miss_jax import MissConfig, MissModel, get_peft_model, losses
from real_checkpoint import flax_smollm2, smollm2_folder, torch_smollm2

pytestmark = pytest.mark.real  # minutes of CPU: `make test-real`, which CI runs

ATOL = 2e-3  # logits are ~30 in scale; float32 through 30 layers in two frameworks
TARGETS = ["q_proj", "v_proj", "down_proj"]
PROMPTS = ["What is the capital of France?", "Name a primary colour of the rainbow, please."]  # padded: lengths differ
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(smollm2_folder())


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> np.ndarray:
    """Two chat-template prompts, left-padded to one length `(2, T)` int32, and their mask."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="np", padding=True)
    assert batch["attention_mask"].min() == 0  # the batch has left padding
    return batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)


@pytest.fixture(scope="module")
def torch_base() -> torch.nn.Module:
    return torch_smollm2()


@pytest.fixture(scope="module")
def jax_model() -> MissModel:
    """The wrapped Flax model: adapter "jax" (random blocks) active."""
    model = get_peft_model(flax_smollm2(), MissConfig(r=16, target_modules=TARGETS), adapter_name="jax")
    fill_blocks(model, "jax", 0.02, seed=0)
    return model


def torch_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    return out.logits.numpy()


def torch_greedy(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
    return out[:, ids.shape[1]:].numpy()


def jax_greedy(model: MissModel, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
    return np.asarray(out.sequences)[:, ids.shape[1]:]


def test_base_logits_equal_pytorch_and_the_plain_flax_model_does_not(jax_model, torch_base, prompt_ids) -> None:
    ids, mask = prompt_ids
    expected = torch_logits(torch_base, ids, mask)
    with jax_model.disable_adapter():
        got = np.asarray(jax_model(input_ids=ids, attention_mask=mask).logits)
    real = mask.astype(bool)  # padded positions are not compared (each framework fills them its own way)
    assert np.abs(got - expected)[real].max() < ATOL
    assert np.abs(expected).max() > 10
    plain = flax_smollm2()  # the same checkpoint, not wrapped: theta 10000 and a random lm_head
    assert np.abs(np.asarray(plain(ids, attention_mask=mask).logits) - expected)[real].max() > 1.0


def test_jax_born_adapter_gives_pytorch_peft_the_same_logits_gradients_and_tokens(jax_model, torch_base, prompt_ids,
                                                                                   tmp_path) -> None:
    ids, mask = prompt_ids
    jax_model.set_adapter("jax")
    jax_model.save_pretrained(str(tmp_path), selected_adapters=["jax"])
    twin = peft.PeftModel.from_pretrained(torch_smollm2(), str(tmp_path / "jax"), is_trainable=True)
    twin.eval()
    real = mask.astype(bool)
    got = np.asarray(jax_model(input_ids=ids, attention_mask=mask).logits)
    assert np.abs(got - torch_logits(twin, ids, mask))[real].max() < ATOL
    assert np.abs(got - torch_logits(torch_base, ids, mask))[real].max() > 10 * ATOL  # the adapter matters

    # one train step's gradients w.r.t. every miss_block: next-token loss on the tokens that follow a real token
    # (a left pad's logits predicting the first real token are each framework's own)
    follows_real = real & np.pad(real, ((0, 0), (1, 0)))[:, :-1]
    labels = np.where(follows_real, ids, -100)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    forward = jax_model.apply_fn()
    grads = jax.jit(jax.grad(lambda t: losses.causal_lm_loss(forward(jax_model.params, t, **batch),
                                                            {**batch, "labels": jnp.asarray(labels)})))(
        jax_model.trainable_params())
    as_blocks = {**jax_model.adapter_params, "miss": grads["miss"]}
    jax_grads = get_peft_model_state_dict(jax_model, "jax", adapter_params=as_blocks)
    twin(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
         labels=torch.from_numpy(labels).long()).loss.backward()
    torch_grads = {n.removesuffix(".default"): p.grad.numpy() for n, p in twin.named_parameters() if p.requires_grad}
    assert set(jax_grads) == set(torch_grads) and len(jax_grads) == 3 * 30
    scale = max(np.abs(g).max() for g in torch_grads.values())
    worst = max(np.abs(np.asarray(jax_grads[k]) - torch_grads[k]).max() for k in torch_grads)
    assert scale > 0 and worst < 1e-3 * scale, (worst, scale)

    np.testing.assert_array_equal(jax_greedy(jax_model, ids, mask), torch_greedy(twin, ids, mask))


def test_pytorch_born_adapter_gives_jax_the_same_greedy_tokens(jax_model, prompt_ids, tmp_path) -> None:
    ids, mask = prompt_ids
    born = peft.get_peft_model(torch_smollm2(), peft.MissConfig(r=16, target_modules=TARGETS, init_weights="bat"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in born.named_parameters():
            if "miss_block" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    born.eval().save_pretrained(str(tmp_path))
    jax_model.load_adapter(str(tmp_path), "torch")
    jax_model.set_adapter("torch")
    try:
        real = mask.astype(bool)
        got = np.asarray(jax_model(input_ids=ids, attention_mask=mask).logits)
        assert np.abs(got - torch_logits(born, ids, mask))[real].max() < ATOL
        np.testing.assert_array_equal(jax_greedy(jax_model, ids, mask), torch_greedy(born, ids, mask))
    finally:
        jax_model.set_adapter("jax")
        jax_model.delete_adapter("torch")


def test_merged_plain_model_computes_what_the_wrapped_model_did(jax_model, prompt_ids) -> None:
    """`merge_and_unload()` returns the transformers Flax model; it keeps PyTorch's RoPE and tied lm_head (so equals
    PyTorch PEFT, which the wrapped model was checked against above).
    (The last test of the module fixture: merging consumes it.)"""
    ids, mask = prompt_ids
    jax_model.set_adapter("jax")
    expected = np.asarray(jax_model(input_ids=ids, attention_mask=mask).logits)
    merged = jax_model.merge_and_unload()
    assert isinstance(merged, transformers.FlaxLlamaForCausalLM)
    got = np.asarray(merged(ids, attention_mask=mask).logits)
    assert np.abs(got - expected)[mask.astype(bool)].max() < ATOL


@pytest.mark.slow
def test_miss_jax_check_passes_on_the_real_checkpoint(tmp_path, capsys) -> None:
    born = peft.get_peft_model(torch_smollm2(), peft.MissConfig(r=16, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in born.named_parameters():
            if "miss_block" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(5))
    born.save_pretrained(str(tmp_path))
    code = cli_main(["check", "--base", smollm2_folder(), "--adapter", str(tmp_path), "--atol", str(ATOL),
                     "--seq-len", "6", "--batch", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert os.path.isfile(os.path.join(smollm2_folder(), "config.json"))
