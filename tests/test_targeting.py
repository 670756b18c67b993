"""Layer discovery and PEFT's matching rules, checked against PEFT itself on the same torch architectures.

The oracle is `peft.get_peft_model` on the torch twin of each tiny Flax model (the modules it turns
into MissLinear). GPT-2's `Conv1D` cannot be adapted by PEFT's MiSS, so for GPT-2 the oracle is PEFT's
LoRA with the same matching fields: every PEFT tuner selects modules through the same code
(`BaseTuner.inject_adapter`), and LoRA accepts Conv1D.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import peft
import pytest
import torch
from peft.tuners.miss.layer import MissLayer
from peft.tuners.lora.layer import LoraLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_MISS_TARGET_MODULES_MAPPING as PEFT_TARGETS
from transformers.pytorch_utils import Conv1D

import tiny_models as tm
from miss_jax import MissConfig, get_peft_model
from miss_jax.targeting import Layer, discover, resolve_targets, select

LINEAR = (torch.nn.Linear, Conv1D)


@functools.cache
def flax_layers(arch: str) -> dict[str, Layer]:
    """Every module of the tiny Flax model of `arch`, by key."""
    model = tm.flax_model(arch)
    return discover(lambda: model.init_weights(jax.random.PRNGKey(0), model.input_shape))


def torch_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return tm.torch_class(arch)(tm.config(arch))


def ours(arch: str, **kwargs: Any) -> set[str]:
    """Keys miss-jax adapts for `MissConfig(**kwargs)` on `arch`."""
    config = resolve_targets(MissConfig(r=4, **kwargs), flax_layers(arch), tm.config(arch).model_type)
    return {layer.key for layer in select(config, flax_layers(arch))}


def peft_matches(arch: str, **kwargs: Any) -> set[str]:
    """Module paths PEFT adapts for `peft.MissConfig(**kwargs)` on the torch model of `arch`."""
    model = torch_model(arch)
    config = peft.MissConfig(r=4, **kwargs)
    if not any(isinstance(m, Conv1D) for m in model.modules()):
        adapted = peft.get_peft_model(model, config).base_model.model
        return {key for key, m in adapted.named_modules() if isinstance(m, MissLayer)}
    fields = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")
    lora = peft.LoraConfig(r=4, **{f: getattr(config, f) for f in fields})
    if lora.target_modules is None:
        lora.target_modules = set(PEFT_TARGETS[model.config.model_type])
    adapted = peft.get_peft_model(model, lora).base_model.model
    return {key for key, m in adapted.named_modules() if isinstance(m, LoraLayer)}


CASES: list[tuple[str, dict[str, Any]]] = [
    *[(arch, {}) for arch in tm.ARCHS if arch != "vit"],  # PEFT's default table
    ("llama", dict(target_modules=["self_attn.q_proj", "down_proj"])),  # suffix at a '.' boundary
    ("llama", dict(target_modules=r"model\.layers\.1\.(self_attn\.k_proj|mlp\.(up|down)_proj)")),  # full-match regex
    ("t5", dict(target_modules=r".*decoder.*(SelfAttention|EncDecAttention)\.(q|v)")),
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")),
    ("bart", dict(target_modules=["q_proj", "fc1"], layers_to_transform=0)),  # first numbered segment
    ("t5", dict(target_modules=["q", "wi"], layers_to_transform=1, layers_pattern="block")),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[1], layers_pattern="h")),
    ("llama", dict(target_modules=["q_proj", "k_proj"], exclude_modules=["layers.0.self_attn.k_proj"])),
    ("llama", dict(target_modules="all-linear", exclude_modules=r".*\.1\..*")),
    ("vit", dict(target_modules=["query", "value", "dense"], exclude_modules=["output.dense"])),
    ("bert", dict(target_modules=["query", "classifier"], modules_to_save=["classifier"])),
    ("llama", dict(target_modules="all-linear")),  # lm_head left out
    ("t5", dict(target_modules="all-linear")),
    ("bart", dict(target_modules="all-linear")),
    ("gpt2", dict(target_modules="all-linear")),
    ("bert", dict(target_modules="all-linear", task_type="SEQ_CLS")),  # classifier left out
    ("bert", dict(target_modules="all-linear")),  # ... but only for SEQ_CLS
    ("roberta", dict(target_modules="all-linear", task_type="SEQ_CLS")),  # PEFT keeps classifier.dense/out_proj
    ("vit", dict(target_modules="all-linear", task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("arch,kwargs", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_selection_equals_peft(arch: str, kwargs: dict[str, Any]) -> None:
    chosen = ours(arch, **kwargs)
    assert chosen, "every case adapts something"
    assert chosen == peft_matches(arch, **kwargs)


def test_modules_to_save_and_excluded_are_never_adapted() -> None:
    chosen = ours("bert", target_modules=["query", "classifier"], modules_to_save=["classifier"])
    assert "classifier" not in chosen and len(chosen) == 2
    assert not ours("llama", target_modules=["q_proj"], exclude_modules=r".*\.0\..*") & {
        "model.layers.0.self_attn.q_proj"}


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_flax_keys_are_torch_module_paths(arch: str) -> None:
    flax_linear = {k for k, layer in flax_layers(arch).items() if layer.is_linear}
    torch_linear = {k for k, m in torch_model(arch).named_modules() if isinstance(m, LINEAR)}
    assert flax_linear <= torch_linear
    # The only torch-only linear layer is an output head tied to the embedding in Flax.
    missing = torch_linear - flax_linear
    assert missing <= {"lm_head"}
    assert not missing or tm.config(arch).tie_word_embeddings


def test_discover_records_layout_and_features() -> None:
    gpt2 = flax_layers("gpt2")["transformer.h.0.attn.c_attn"]
    assert (gpt2.layout, gpt2.in_features, gpt2.out_features, gpt2.has_bias) == ("torch", 32, 96, True)
    assert gpt2.type_name == "FlaxConv1D" and gpt2.path == ("transformer", "h", "0", "attn", "c_attn")
    v = flax_layers("llama")["model.layers.1.self_attn.v_proj"]
    assert (v.layout, v.in_features, v.out_features, v.has_bias) == ("flax", 32, 16, False)
    norm = flax_layers("llama")["model.layers.0.input_layernorm"]
    assert not norm.is_linear and norm.type_name == "FlaxLlamaRMSNorm"


@pytest.mark.parametrize("targets", [["q_prj"], ["_proj"]])
def test_unmatched_targets_raise_listing_candidates(targets: list[str]) -> None:
    with pytest.raises(ValueError):
        peft_matches("llama", target_modules=targets)
    with pytest.raises(ValueError, match=r"not found in the base model.*q_proj.*v_proj") as info:
        ours("llama", target_modules=targets)
    assert repr(targets[0]) in str(info.value)


def test_layers_to_transform_selecting_nothing_says_so() -> None:
    with pytest.raises(ValueError, match=r"layers_to_transform=\(7,\).*q_proj"):
        ours("llama", target_modules=["q_proj"], layers_to_transform=[7])


@pytest.mark.parametrize(
    "target,type_name", [("self_attn", "FlaxLlamaAttention"), ("embed_tokens", "Embed"), ("norm", "FlaxLlamaRMSNorm")]
)
def test_matched_non_linear_layer_raises_naming_its_type(target: str, type_name: str) -> None:
    with pytest.raises(ValueError, match=rf"linear layers.*\({type_name}\)"):
        ours("llama", target_modules=[target])


def test_model_rejects_non_linear_target_end_to_end() -> None:
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn \(FlaxLlamaAttention\)"):
        get_peft_model(tm.flax_model("llama"), MissConfig(r=4, target_modules=["self_attn"]))
