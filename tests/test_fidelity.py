"""The fidelity audit: for each family and config field, a tiny random PyTorch model with a non-default value
of the field and the Flax model loaded from it on the user's path (`from_pretrained(folder, from_pt=True)`),
compared in the same run. Each case is one row of docs/DESIGN.md §6's table:

  * "honoured": transformers' Flax code computes PyTorch's model; wrapped, so does miss-jax;
  * "fixed": the plain Flax model differs from PyTorch, the wrapped one (`get_peft_model`) equals it;
  * "refused": wrapping raises `UnfaithfulConfig` naming the field (or transformers' loader refuses).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import transformers

import tiny_models as tm
from miss_jax import MissConfig, fidelity, get_peft_model

ATOL = 2e-4
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
LONGROPE = {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
            "original_max_position_embeddings": 16}

# (family, config overrides, outcome): the audit table, row by row
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("llama", {"rope_theta": 500000.0}, "fixed"),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "fixed"),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "honoured"),
    ("llama", {"rope_scaling": YARN}, "fixed"),
    ("llama", {"rope_theta": 500000.0, "rope_scaling": LLAMA3}, "fixed"),
    ("llama", {"rope_scaling": LONGROPE}, "refused"),
    ("llama", {"tie_word_embeddings": True}, "fixed"),
    ("llama", {"attention_bias": True}, "honoured"),
    ("llama", {"mlp_bias": True}, "refused"),
    ("llama", {"head_dim": 16}, "refused"),
    ("llama", {"hidden_act": "gelu"}, "honoured"),
    ("llama", {"rms_norm_eps": 0.1}, "honoured"),
    ("mistral", {"rope_theta": 1000000.0}, "fixed"),
    ("mistral", {"sliding_window": None}, "fixed"),
    ("mistral", {"sliding_window": 4}, "fixed"),
    ("mistral", {"tie_word_embeddings": True}, "fixed"),
    ("mistral", {"head_dim": 16}, "refused"),
    ("gemma", {"rope_theta": 1000000.0}, "fixed"),
    ("gemma", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "fixed"),
    ("gemma", {"head_dim": 16}, "honoured"),
    ("gemma", {"tie_word_embeddings": False}, "honoured"),
    ("gemma", {"attention_bias": True}, "honoured"),
    ("gpt2", {"tie_word_embeddings": False}, "honoured"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "honoured"),
    ("gpt2", {"reorder_and_upcast_attn": True}, "honoured"),
    ("gpt2", {"activation_function": "relu"}, "honoured"),
    ("gpt_neo", {"tie_word_embeddings": False}, "honoured"),
    ("opt", {"do_layer_norm_before": False}, "honoured"),
    ("opt", {"word_embed_proj_dim": 16}, "honoured"),
    ("opt", {"enable_bias": False}, "honoured"),
    ("opt", {"tie_word_embeddings": False}, "honoured"),
    ("bert", {"position_embedding_type": "relative_key"}, "refused"),
    ("bert", {"hidden_act": "relu"}, "honoured"),
    ("roberta", {"position_embedding_type": "relative_key_query"}, "refused"),
    ("t5", {"tie_word_embeddings": False}, "honoured"),
    ("t5", {"feed_forward_proj": "gated-gelu"}, "honoured"),
    ("bart", {"scale_embedding": True}, "honoured"),
    ("bart", {"tie_word_embeddings": False}, "honoured"),
    ("vit", {"qkv_bias": False}, "honoured"),
]


def case_id(case: tuple[str, dict[str, Any], str]) -> str:
    family, fields, outcome = case
    return f"{family}-{'-'.join(fields)}-{outcome}"


def torch_model(family: str, fields: dict[str, Any]) -> torch.nn.Module:
    """A tiny seeded torch model of `family` with `fields` set, every weight perturbed (so zero-initialised
    biases and equal norms matter too), in eval mode."""
    config = tm.config(family)
    for name, value in fields.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = tm.torch_class(family)(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def torch_logits(model: torch.nn.Module, family: str) -> np.ndarray:
    x = {k: torch.from_numpy(v).long() if v.dtype.kind == "i" else torch.from_numpy(v)
         for k, v in tm.inputs(family, seq=12).items()}
    with torch.no_grad():
        return model(**x).logits.float().numpy()


def flax_from_pt(model: torch.nn.Module, family: str, folder: str) -> Any:
    """The user's path: the torch model's `save_pretrained` folder, loaded by the Flax class with `from_pt`."""
    model.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, "Flax" + tm.torch_class(family).__name__).from_pretrained(folder, from_pt=True)


def targets(family: str) -> list[str] | None:
    return tm.targets(family)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_field_is_honoured_fixed_or_refused(case, tmp_path) -> None:
    family, fields, outcome = case
    pt = torch_model(family, fields)
    expected = torch_logits(pt, family)
    inputs = tm.inputs(family, seq=12)
    if outcome == "refused":
        field = next(iter(fields))
        with pytest.raises(fidelity.UnfaithfulConfig, match=field):
            fidelity.audit(pt.config)
        with pytest.raises(ValueError) as error:  # transformers' loader refuses the shapes, or miss-jax the field
            get_peft_model(flax_from_pt(pt, family, str(tmp_path)), MissConfig(r=2, target_modules=targets(family)))
        assert isinstance(error.value, fidelity.UnfaithfulConfig) or "shape" in str(error.value), error.value
        return
    flax = flax_from_pt(pt, family, str(tmp_path))
    plain = np.asarray(flax(**inputs).logits)
    wrapped = get_peft_model(flax, MissConfig(r=2, target_modules=targets(family)))
    got = np.asarray(wrapped(**inputs).logits)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    plain_error = float(np.abs(plain - expected).max())
    if outcome == "honoured":
        assert plain_error < ATOL
    else:
        assert plain_error > 100 * ATOL, "the plain Flax model already computes this: the row should say honoured"


def test_every_case_is_in_the_documented_table() -> None:
    """docs/DESIGN.md §6 lists each case of the audit (family, field, outcome)."""
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "DESIGN.md"), encoding="utf-8") as f:
        text = f.read()
    missing = [case_id(c) for c in CASES if not any(
        f"| {c[0]} |" in line and f"`{next(iter(c[1]))}`" in line and c[2] in line for line in text.splitlines())]
    assert missing == []


def test_fixed_fields_hold_in_generate_and_after_merging(tmp_path) -> None:
    """Mistral with RoPE theta 1e6, a 4-token sliding window and tied embeddings (three fixes at once): greedy
    tokens with the KV cache equal PyTorch's past the window, and the merged plain model keeps the fixes."""
    fields = {"rope_theta": 1000000.0, "sliding_window": 4, "tie_word_embeddings": True}
    pt = torch_model("mistral", fields)
    flax = flax_from_pt(pt, "mistral", str(tmp_path))
    wrapped = get_peft_model(flax, MissConfig(r=2, target_modules=targets("mistral")))
    prompt = tm.inputs("mistral", batch=2, seq=5)["input_ids"]
    with torch.no_grad():
        expected = pt.generate(torch.from_numpy(prompt).long(), max_new_tokens=10, do_sample=False,
                               pad_token_id=0, eos_token_id=None).numpy()
    got = np.asarray(wrapped.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0,
                                      eos_token_id=None).sequences)
    np.testing.assert_array_equal(got, expected)
    inputs = tm.inputs("mistral", seq=12)
    merged = wrapped.merge_and_unload()
    np.testing.assert_allclose(np.asarray(merged(**inputs).logits), torch_logits(pt, "mistral"), atol=ATOL, rtol=0)


def test_a_pytorch_adapter_loaded_with_from_pretrained_gets_the_fixes(tmp_path) -> None:
    """The other path in: `MissModel.from_pretrained(flax_model, peft_folder)` on Llama 3-style RoPE and tied
    embeddings gives PEFT's logits."""
    import peft

    from miss_jax import MissModel

    fields = {"rope_theta": 500000.0, "rope_scaling": LLAMA3, "tie_word_embeddings": True}
    pt = torch_model("llama", fields)
    flax = flax_from_pt(pt, "llama", str(tmp_path / "base"))
    born = peft.get_peft_model(pt, peft.MissConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights="bat"))
    with torch.no_grad():
        for name, p in born.named_parameters():
            if "miss_block" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(7))
    born.save_pretrained(str(tmp_path / "adapter"))
    loaded = MissModel.from_pretrained(flax, str(tmp_path / "adapter"))
    got = np.asarray(loaded(**tm.inputs("llama", seq=12)).logits)
    np.testing.assert_allclose(got, torch_logits(born.eval(), "llama"), atol=ATOL, rtol=0)
