"""Tiny random transformers models (Flax, and the same architecture in torch) for the tests.

`ARCHS` names every architecture the suite covers; `flax_model(arch)` builds a seeded tiny model,
`inputs(arch)` a small batch as numpy arrays (the same arrays feed the torch model). `targets(arch)`
gives explicit target modules where PEFT has no default for the architecture.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import transformers

# arch -> (config class, config kwargs, model class name without the "Flax" prefix)
_SPECS: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64), "LlamaForCausalLM"),
    # sliding_window=None would make Flax Mistral attend to the diagonal only (transformers 4.57 masks with
    # triu(causal, -(sliding_window or 0))); a window as long as the positions is plain causal attention in both.
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, sliding_window=64, max_position_embeddings=64), "MistralForCausalLM"),
    "gemma": ("GemmaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64), "GemmaForCausalLM"),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64), "GPT2LMHeadModel"),
    "gpt_neo": ("GPTNeoConfig", dict(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                     max_position_embeddings=64, window_size=8), "GPTNeoForCausalLM"),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=32, max_position_embeddings=64), "OPTForCausalLM"),
    "bert": ("BertConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=64, num_labels=3), "BertForSequenceClassification"),
    "roberta": ("RobertaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=64, num_labels=3), "RobertaForSequenceClassification"),
    "t5": ("T5Config", dict(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8,
                            decoder_start_token_id=0), "T5ForConditionalGeneration"),
    "bart": ("BartConfig", dict(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
                                encoder_attention_heads=4, decoder_attention_heads=4, max_position_embeddings=64),
             "BartForConditionalGeneration"),
    "vit": ("ViTConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=16, patch_size=8, num_labels=3), "ViTForImageClassification"),
}
ARCHS = tuple(_SPECS)
VOCAB = 96
# PEFT has no default targets for ViT; these match its attention projections.
_EXPLICIT_TARGETS = {"vit": ["query", "value"]}


def config(arch: str) -> transformers.PretrainedConfig:
    cls_name, kwargs, _ = _SPECS[arch]
    extra = {} if arch == "vit" else {"vocab_size": VOCAB}
    return getattr(transformers, cls_name)(**kwargs, **extra)


@functools.lru_cache(maxsize=None)
def flax_model(arch: str, seed: int = 0) -> Any:
    """A tiny Flax model of `arch` with seeded random weights (cached: treat it as read-only)."""
    return getattr(transformers, "Flax" + _SPECS[arch][2])(config(arch), seed=seed)


def torch_class(arch: str) -> type:
    return getattr(transformers, _SPECS[arch][2])


def targets(arch: str) -> list[str] | None:
    """Explicit target modules, or None where PEFT's default table covers the architecture."""
    return _EXPLICIT_TARGETS.get(arch)


def inputs(arch: str, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of model inputs as numpy arrays (int32 ids / float32 pixels), same for torch and Flax."""
    rng = np.random.default_rng(seed)
    if arch == "vit":
        return {"pixel_values": rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)}
    ids = rng.integers(3, VOCAB, (batch, seq)).astype(np.int32)
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if arch in ("t5", "bart"):
        out["decoder_input_ids"] = rng.integers(3, VOCAB, (batch, seq // 2)).astype(np.int32)
    return out
