"""The PyTorch side of tests/test_tunix.py, run as a script in the environment with torch, transformers 4.x
and PEFT (`MISS_JAX_TORCH_PYTHON`; `make test-modern` passes the project's main venv).

  torch_twin.py make ARCH OUT          tiny ARCH model (seeded) saved in OUT/base, its logits OUT/base.npy, and a
                                       PEFT MiSS adapter per variant with random blocks: OUT/<variant>/ + .npy,
                                       and one with modules_to_save (lm_head, embedding, norms): OUT/saved/
  torch_twin.py logits ARCH BASE DIR.. logits of BASE with each PEFT folder DIR, written as DIR.npy

ARCH is "qwen3" or "llama"; the token ids are `IDS` below, the same on both sides.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import peft
import torch
import transformers

IDS = [[1, 5, 9, 14, 3, 60, 22, 7], [2, 33, 4, 4, 18, 51, 0, 12]]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {"balance": True, "mini": "mini", "bat": "bat"}
SAVED = ["lm_head", "embed_tokens", "norm"]
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1_000_000,
              tie_word_embeddings=False, max_position_embeddings=64)


def model_class(arch: str) -> type:
    return {"qwen3": transformers.Qwen3ForCausalLM, "llama": transformers.LlamaForCausalLM}[arch]


def config(arch: str) -> transformers.PretrainedConfig:
    if arch == "qwen3":
        return transformers.Qwen3Config(**COMMON)
    return transformers.LlamaConfig(**COMMON, attention_bias=False, mlp_bias=False)


def logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def make(arch: str, out: str) -> None:
    torch.manual_seed(0)
    base = model_class(arch)(config(arch)).eval()
    base.save_pretrained(os.path.join(out, "base"), safe_serialization=True)
    np.save(os.path.join(out, "base.npy"), logits(base))
    for i, (variant, init) in enumerate(VARIANTS.items()):
        model = model_class(arch).from_pretrained(os.path.join(out, "base")).eval()
        cfg = peft.MissConfig(r=4, mini_r=8, init_weights=init, target_modules=TARGETS)
        pm = peft.get_peft_model(model, cfg).eval()
        gen = torch.Generator().manual_seed(10 + i)
        for name, p in pm.named_parameters():
            if "miss_block" in name:
                p.data = 0.05 * torch.randn(p.shape, generator=gen)
        pm.save_pretrained(os.path.join(out, variant))
        np.save(os.path.join(out, f"{variant}.npy"), logits(pm))
    # modules_to_save: lm_head, the embedding and every norm ("norm" ends q_norm, input_layernorm, ...)
    model = model_class(arch).from_pretrained(os.path.join(out, "base")).eval()
    cfg = peft.MissConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=SAVED)
    pm = peft.get_peft_model(model, cfg).eval()
    gen = torch.Generator().manual_seed(20)
    for _, p in pm.named_parameters():
        if p.requires_grad:
            p.data += 0.05 * torch.randn(p.shape, generator=gen)
    pm.save_pretrained(os.path.join(out, "saved"))
    np.save(os.path.join(out, "saved.npy"), logits(pm))


def adapter_logits(arch: str, base_dir: str, folders: list[str]) -> None:
    for folder in folders:
        model = model_class(arch).from_pretrained(base_dir).eval()
        pm = peft.PeftModel.from_pretrained(model, folder).eval()
        np.save(folder.rstrip("/") + ".npy", logits(pm))


if __name__ == "__main__":
    command, arch, *rest = sys.argv[1:]
    make(arch, rest[0]) if command == "make" else adapter_logits(arch, rest[0], rest[1:])
