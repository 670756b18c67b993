"""The PyTorch side of tests/test_tunix.py, run as a script in the environment with torch, transformers 4.x
and PEFT (`MISS_JAX_TORCH_PYTHON`; `make test-modern` passes the project's main venv).

  torch_twin.py make ARCH OUT          tiny ARCH model (seeded) saved in OUT/base, its logits OUT/base.npy, and a
                                       PEFT MiSS adapter per variant with random blocks: OUT/<variant>/ + .npy,
                                       and one with modules_to_save (lm_head, embedding, norms): OUT/saved/
  torch_twin.py logits ARCH BASE DIR.. logits of BASE with each PEFT folder DIR, written as DIR.npy
  torch_twin.py base ARCH OUT JSON     tiny ARCH model with the config fields JSON (rope_theta, rope_scaling,
                                       tie_word_embeddings, ...) in OUT/base, its logits OUT/base.npy, and a
                                       PEFT adapter with random blocks: OUT/adapter/ + .npy
  torch_twin.py real BASE OUT          on the real checkpoint BASE: a prompt OUT/prompt.npy (1, t), a PEFT
                                       adapter with small random blocks OUT/peft/, a zero one OUT/zero/, and
                                       for each its logits on the prompt (DIR.npy) and greedy tokens (DIR.greedy.npy)
  torch_twin.py greedy BASE PROMPT DIR.. logits on PROMPT.npy and GREEDY new greedy tokens of BASE + each DIR
  torch_twin.py generate BASE PROMPT N DIR..  `PeftModel.generate`'s N greedy tokens of BASE + each DIR on
                                       PROMPT.npy (no stop at EOS), written as DIR.generate.npy

ARCH is "qwen3" or "llama"; the token ids are `IDS` below, the same on both sides.
"""

from __future__ import annotations

import json
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


GREEDY = 6  # new tokens of the greedy decodes on the real checkpoint
PROMPT = [[1, 504, 3575, 282, 4649, 314]]  # SmolLM2's tokens of "<|im_start|>The capital of France is"


def config(arch: str, **fields: object) -> transformers.PretrainedConfig:
    if arch == "qwen3":
        return transformers.Qwen3Config(**{**COMMON, **fields})
    return transformers.LlamaConfig(**{**COMMON, "attention_bias": False, "mlp_bias": False, **fields})


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


def random_adapter(model: torch.nn.Module, out: str, seed: int, scale: float) -> peft.PeftModel:
    """A PEFT MiSS adapter (bat, every projection) with random blocks of std `scale`, saved in `out`."""
    pm = peft.get_peft_model(model, peft.MissConfig(r=4, mini_r=8, init_weights="bat", target_modules=TARGETS)).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, p in pm.named_parameters():
        if "miss_block" in name:
            p.data = scale * torch.randn(p.shape, generator=gen)
    pm.save_pretrained(out)
    return pm


def base(arch: str, out: str, fields: str) -> None:
    torch.manual_seed(0)
    model = model_class(arch)(config(arch, **json.loads(fields))).eval()
    model.save_pretrained(os.path.join(out, "base"), safe_serialization=True)
    np.save(os.path.join(out, "base.npy"), logits(model))
    np.save(os.path.join(out, "adapter.npy"), logits(random_adapter(model, os.path.join(out, "adapter"), 1, 0.05)))


def greedy(model: torch.nn.Module, prompt: np.ndarray, out: str) -> None:
    """Writes the logits on `prompt` (1, t) to `out.npy` and GREEDY greedy tokens (full forward each step) to
    `out.greedy.npy`."""
    ids = torch.tensor(prompt)
    with torch.no_grad():
        np.save(out + ".npy", model(ids).logits.float().numpy())
        for _ in range(GREEDY):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    np.save(out + ".greedy.npy", ids[:, prompt.shape[1]:].numpy())


def load(base_dir: str) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def real(base_dir: str, out: str) -> None:
    prompt = np.array(PROMPT, np.int64)
    np.save(os.path.join(out, "prompt.npy"), prompt)
    greedy(random_adapter(load(base_dir), os.path.join(out, "peft"), 7, 0.01), prompt, os.path.join(out, "peft"))
    zero = peft.get_peft_model(load(base_dir), peft.MissConfig(r=4, target_modules=TARGETS)).eval()
    zero.save_pretrained(os.path.join(out, "zero"))
    greedy(zero, prompt, os.path.join(out, "zero"))


def adapter_greedy(base_dir: str, prompt: str, folders: list[str]) -> None:
    for folder in folders:
        greedy(peft.PeftModel.from_pretrained(load(base_dir), folder).eval(), np.load(prompt), folder.rstrip("/"))


def adapter_generate(base_dir: str, prompt: str, new_tokens: str, folders: list[str]) -> None:
    ids = torch.tensor(np.load(prompt))
    for folder in folders:
        model = peft.PeftModel.from_pretrained(load(base_dir), folder).eval()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(new_tokens),
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        np.save(folder.rstrip("/") + ".generate.npy", out[:, ids.shape[1]:].numpy())


def adapter_logits(arch: str, base_dir: str, folders: list[str]) -> None:
    for folder in folders:
        model = model_class(arch).from_pretrained(base_dir).eval()
        pm = peft.PeftModel.from_pretrained(model, folder).eval()
        np.save(folder.rstrip("/") + ".npy", logits(pm))


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    command, *args = sys.argv[1:]
    commands = {"make": make, "base": base, "real": real, "logits": lambda arch, base_dir, *folders:
                adapter_logits(arch, base_dir, list(folders)),
                "greedy": lambda base_dir, prompt, *folders: adapter_greedy(base_dir, prompt, list(folders)),
                "generate": lambda base_dir, prompt, n, *folders: adapter_generate(base_dir, prompt, n, list(folders))}
    commands[command](*args)
