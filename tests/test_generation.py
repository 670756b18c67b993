"""`MissModel.generate` against PyTorch PEFT's `PeftModel.generate`, and generation's own behaviour.

Greedy tokens equal torch PEFT's on the twin model with the same (random) adapter, for balance, mini
and bat on five decoder families and two encoder-decoders; several active adapters, a disabled
adapter, merged adapters, sampling, beam search, the compiled-program cache, and bad input.
"""

from __future__ import annotations

import ast
import os
from typing import Optional

import jax
import numpy as np
import peft
import pytest
import torch
from flax import traverse_util
from transformers import FlaxLogitsProcessorList, GenerationConfig
from transformers.generation import FlaxSuppressTokensLogitsProcessor

import tiny_models as tm
from interop_helpers import torch_peft_model
from miss_jax import MissConfig, MissModel, generation, get_peft_model, linen

DECODERS = ("llama", "mistral", "gemma", "gpt_neo", "opt")
ENCODER_DECODERS = ("t5", "bart")
VARIANTS = {
    "balance": dict(r=4, init_weights=True),
    "mini": dict(r=4, init_weights="mini", mini_r=4),
    "bat": dict(r=4, init_weights="bat"),
}
# By default each variant runs on some of four decoder families and T5 (and all three, active at once, on
# the `llama` fixture below); the rest of the product is marked slow.
FAST = {("mistral", "mini"), ("gemma", "bat"), ("gpt_neo", "balance"), ("opt", "bat"), ("t5", "mini")}
CASES = [
    pytest.param(arch, variant, marks=() if (arch, variant) in FAST else pytest.mark.slow)
    for arch in DECODERS + ENCODER_DECODERS for variant in VARIANTS
]
# A tiny random BART repeats its last token whatever its attention does: adapt its MLPs too.
TARGETS = {"bart": ["q_proj", "v_proj", "out_proj", "fc1", "fc2"]}
NEW_TOKENS = 6
PAD = 0
# Disjoint layers: PEFT <= 0.21 runs every adapter of a layer in the mode of the layer's first adapter.
LLAMA_ADAPTERS = {
    "default": dict(r=4, init_weights=True),  # q_proj, v_proj (PEFT's default targets)
    "mini": dict(r=4, init_weights="mini", mini_r=4, target_modules=["k_proj", "up_proj"]),
    "bat": dict(r=4, init_weights="bat", target_modules=["o_proj", "down_proj"]),
}


def prompt(arch: str) -> tuple[np.ndarray, np.ndarray]:
    """`(input_ids, attention_mask)`, each `(2, 8)` int32."""
    x = tm.inputs(arch)
    return x["input_ids"], x["attention_mask"]


def decoder_prompt(arch: str) -> dict[str, np.ndarray]:
    """For an encoder-decoder, `decoder_input_ids` `(2, 3)`: the decoder start token and two prompt tokens
    (a tiny random BART only repeats its start token, which is also its end token)."""
    if not tm.config(arch).is_encoder_decoder:
        return {}
    start = np.full((2, 1), tm.config(arch).decoder_start_token_id, np.int32)
    return {"decoder_input_ids": np.concatenate([start, tm.inputs(arch)["decoder_input_ids"][:, :2]], axis=1)}


def jax_tokens(model: MissModel, arch: str, rows: Optional[tuple] = None, **kwargs) -> np.ndarray:
    """`model.generate(...)` tokens `(2, prompt + NEW_TOKENS)` (the decoder prompt, for an encoder-decoder)
    from `rows`, `(input_ids, attention_mask)` (default `prompt(arch)`)."""
    ids, mask = rows or prompt(arch)
    kwargs = {"max_new_tokens": NEW_TOKENS, "pad_token_id": PAD, **decoder_prompt(arch), **kwargs}
    return np.asarray(model.generate(ids, attention_mask=mask, **kwargs).sequences)


def torch_tokens(model: torch.nn.Module, arch: str, rows: Optional[tuple] = None, **kwargs) -> np.ndarray:
    """`PeftModel.generate(do_sample=False)` tokens from `rows` (as `jax_tokens`), right-padded with PAD to
    the width JAX returns (torch stops early once every row has met `eos_token_id`)."""
    ids, mask = rows or prompt(arch)
    arrays = {"input_ids": ids, "attention_mask": mask, **decoder_prompt(arch)}
    with torch.no_grad():
        out = model.generate(**{k: torch.from_numpy(v).long() for k, v in arrays.items()},
                             max_new_tokens=NEW_TOKENS, pad_token_id=PAD, do_sample=False, **kwargs).numpy()
    width = arrays.get("decoder_input_ids", ids).shape[1] + NEW_TOKENS
    return np.pad(out, ((0, 0), (0, width - out.shape[1])), constant_values=PAD)


def pair(arch: str, adapters: dict[str, dict], folder: str) -> tuple[peft.PeftModel, MissModel]:
    """Torch PEFT's twin with random `adapters` (first active), saved to `folder` and loaded in JAX."""
    torch_model = torch_peft_model(arch, {n: peft.MissConfig(**kw) for n, kw in adapters.items()})
    torch_model.save_pretrained(folder)
    model = MissModel.from_pretrained(tm.flax_model(arch), folder)
    for name in list(adapters)[1:]:
        model.load_adapter(os.path.join(folder, name), name)
    return torch_model, model


def snapshot(model: MissModel) -> tuple:
    """The state generate must leave alone (leaves by identity: arrays are immutable)."""
    return (
        model.plan,
        list(model.active_adapters),
        list(model.merged_adapters),
        {k: id(v) for k, v in traverse_util.flatten_dict(model.adapter_params, keep_empty_nodes=True).items()},
        {k: id(v) for k, v in traverse_util.flatten_dict(model.params).items()},
    )


# --------------------------------------------------------------------------- greedy tokens = torch PEFT


@pytest.mark.parametrize("arch,variant", CASES)
def test_greedy_tokens_match_torch_peft(arch: str, variant: str, tmp_path) -> None:
    config = dict(VARIANTS[variant], target_modules=TARGETS.get(arch))
    torch_model, model = pair(arch, {"default": config}, str(tmp_path))
    want = torch_tokens(torch_model, arch)
    with torch_model.disable_adapter():
        base = torch_tokens(torch_model, arch)
    assert (want != base).any(), "the adapter does not change the tokens: the comparison would prove nothing"
    np.testing.assert_array_equal(jax_tokens(model, arch), want)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[peft.PeftModel, MissModel]:
    """Torch PEFT's llama and the JAX one with the same three random adapters (balance, mini, bat)."""
    return pair("llama", LLAMA_ADAPTERS, str(tmp_path_factory.mktemp("llama")))


def test_several_active_adapters_match_torch_peft(llama) -> None:
    torch_model, model = llama
    names = list(LLAMA_ADAPTERS)
    torch_model.base_model.set_adapter(names)
    model.set_adapter(names)
    try:
        np.testing.assert_array_equal(jax_tokens(model, "llama"), torch_tokens(torch_model, "llama"))
    finally:
        torch_model.base_model.set_adapter("default")
        model.set_adapter("default")


def test_disabled_adapter_gives_the_base_tokens(llama) -> None:
    torch_model, model = llama
    with torch_model.disable_adapter():
        base = torch_tokens(torch_model, "llama")
    adapted = jax_tokens(model, "llama")
    assert (adapted != base).any()
    with model.disable_adapter():
        np.testing.assert_array_equal(jax_tokens(model, "llama"), base)
    np.testing.assert_array_equal(jax_tokens(model, "llama"), adapted)


def test_left_padded_prompts_match_torch_peft(llama) -> None:
    """Rows of different lengths, left-padded, with their attention mask (the same shapes as the other
    tests: the compiled program is reused)."""
    torch_model, model = llama
    ids, mask = prompt("llama")
    ids, mask = ids.copy(), mask.copy()
    ids[0, :3], mask[0, :3] = PAD, 0
    rows = (ids, mask)
    np.testing.assert_array_equal(jax_tokens(model, "llama", rows), torch_tokens(torch_model, "llama", rows))


def test_merged_adapters_give_the_unmerged_tokens(llama) -> None:
    _, model = llama
    model.set_adapter(list(LLAMA_ADAPTERS))
    unmerged = jax_tokens(model, "llama")
    model.merge_adapter()
    try:
        assert model.plan.active == ()  # the adapters now live in `params`
        np.testing.assert_array_equal(jax_tokens(model, "llama"), unmerged)
    finally:
        model.unmerge_adapter()
        model.set_adapter("default")


# --------------------------------------------------------------------------- sampling, beams, compiled programs


def test_sampling_is_deterministic_per_key_and_applies_the_adapter(llama) -> None:
    _, model = llama
    sample = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.95)
    key = lambda seed: dict(sample, prng_key=jax.random.PRNGKey(seed))  # noqa: E731
    first = jax_tokens(model, "llama", **key(1))
    np.testing.assert_array_equal(jax_tokens(model, "llama", **key(1)), first)
    assert (jax_tokens(model, "llama", **key(2)) != first).any()
    with model.disable_adapter():
        assert (jax_tokens(model, "llama", **key(1)) != first).any()
    model.merge_adapter()
    try:
        np.testing.assert_array_equal(jax_tokens(model, "llama", **key(1)), first)
    finally:
        model.unmerge_adapter()


def test_beam_search_matches_torch_peft(llama) -> None:
    torch_model, model = llama
    beams = dict(num_beams=3, length_penalty=1.0, early_stopping=True)
    want = torch_tokens(torch_model, "llama", **beams)
    with torch_model.disable_adapter():
        assert (torch_tokens(torch_model, "llama", **beams) != want).any()
    np.testing.assert_array_equal(jax_tokens(model, "llama", **beams), want)


def test_a_second_call_does_not_trace_again(llama, monkeypatch) -> None:
    _, model = llama
    traces = []
    apply = linen.apply
    monkeypatch.setattr(linen, "apply", lambda *a, **k: traces.append(1) or apply(*a, **k))
    ids, mask = prompt("llama")
    options = dict(max_new_tokens=3, pad_token_id=PAD)  # options no other test uses: a fresh program
    first = model.generate(ids, attention_mask=mask, **options).sequences
    model.generate((ids + 1) % tm.VOCAB, attention_mask=mask, **options)  # new values, same shapes
    np.testing.assert_array_equal(model.generate(ids, attention_mask=mask, **options).sequences, first)
    assert len(traces) == 1


def test_decoding_steps_run_one_token_through_the_kv_cache(llama, monkeypatch) -> None:
    """The prompt runs once, then each step feeds the model one token and the cache (flat per-token cost)."""
    _, model = llama
    calls = []
    cls = type(model.base_model)
    call = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, ids, **k: calls.append((ids.shape, "past_key_values" in k))
                        or call(self, ids, **k))
    ids, mask = prompt("llama")
    model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)  # a fresh program: it traces
    assert calls == [(ids.shape, True), ((2, 1), True)]  # the prompt, then the while loop's body


@pytest.mark.slow
def test_trace_false_decodes_eagerly_with_the_same_tokens(llama) -> None:
    _, model = llama
    np.testing.assert_array_equal(jax_tokens(model, "llama", max_new_tokens=2, trace=False),
                                  jax_tokens(model, "llama", max_new_tokens=2))


@pytest.mark.slow
def test_a_generation_config_and_logits_processors_pass_through(llama) -> None:
    _, model = llama
    options = GenerationConfig(max_new_tokens=NEW_TOKENS, pad_token_id=PAD, eos_token_id=2)
    ids, mask = prompt("llama")
    got = model.generate(ids, attention_mask=mask, generation_config=options).sequences
    np.testing.assert_array_equal(got, jax_tokens(model, "llama"))
    favourite = int(got[0, ids.shape[1]])  # the first generated token: suppress it
    never = FlaxLogitsProcessorList([FlaxSuppressTokensLogitsProcessor([favourite])])
    assert (jax_tokens(model, "llama", logits_processor=never)[:, ids.shape[1]:] != favourite).all()


# --------------------------------------------------------------------------- bad input


def bad_calls() -> dict[str, tuple[dict, str]]:
    """name -> (generate kwargs, the error they raise)."""
    return {
        "adapter_names": (dict(max_new_tokens=2, adapter_names=["default", "default"]), "set_adapter"),
        "prompt_longer_than_max_length": (dict(max_length=5), "max_new_tokens=N"),
        "prompt_as_long_as_max_length": (dict(max_length=8), "max_new_tokens=N"),
        "zero_new_tokens": (dict(max_new_tokens=0), "must be greater than 0"),
        "past_the_position_table": (dict(max_new_tokens=100), "needs 108 positions .* has 64.* input_ids has 8 "
                                                              r"tokens .*max_new_tokens=100"),
        "unhashable_option": (dict(max_new_tokens=2, suppress_tokens={3: 4}), "neither an array .* nor hashable"),
    }


@pytest.mark.parametrize("case", list(bad_calls()))
def test_bad_input_raises_and_leaves_the_model_unchanged(llama, case: str) -> None:
    _, model = llama
    kwargs, message = bad_calls()[case]
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        model.generate(prompt("llama")[0], **kwargs)
    assert snapshot(model) == before


def test_gpt2_past_its_positions_raises_and_leaves_the_model_unchanged() -> None:
    """GPT-2's limit is its `n_positions` (64 here): the forward's rule (`programs.max_positions`) refuses what
    its Flax model would decode from positions past its table, and the longest generation that fits runs."""
    model = get_peft_model(tm.flax_model("gpt2"), MissConfig(r=4, target_modules=["c_attn"]))
    ids = prompt("gpt2")[0]
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"needs 70 positions but this FlaxGPT2LMHeadModel has 64: input_ids has 8 "
                                         r"tokens and max_length is 70 \(max_new_tokens=62\).*Lower max_new_tokens"):
        model.generate(ids, max_new_tokens=62, pad_token_id=PAD)
    assert snapshot(model) == before
    assert model.generate(ids, max_new_tokens=56, pad_token_id=PAD).sequences.shape == (2, 64)  # the limit fits


def test_a_model_without_generation_support_raises() -> None:
    model = get_peft_model(tm.flax_model("bert"), MissConfig(r=4))
    before = snapshot(model)
    with pytest.raises(ValueError, match="FlaxBertForSequenceClassification cannot generate.*ForCausalLM"):
        model.generate(prompt("bert")[0], max_new_tokens=2)
    assert snapshot(model) == before


def test_an_adapter_without_weights_raises() -> None:
    model = get_peft_model(tm.flax_model("llama"), MissConfig(r=4), low_cpu_mem_usage=True)
    with pytest.raises(ValueError, match="load_adapter"):
        model.generate(prompt("llama")[0], max_new_tokens=2)


def test_generation_uses_no_private_names_of_other_modules() -> None:
    """generation.py reaches MissModel and miss_jax.linen through their public names only."""
    tree = ast.parse(open(generation.__file__, encoding="utf-8").read())
    private = [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
               and node.attr.startswith("_") and not node.attr.startswith("__")]
    imported = [a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names
                if a.name.startswith("_")]
    assert private == [] and imported == []
