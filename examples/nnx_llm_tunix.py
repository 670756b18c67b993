"""MiSS on tunix's Qwen 3 (Flax NNX): train an adapter in JAX, save it as a PEFT folder, check it in PyTorch.

    python examples/nnx_llm_tunix.py                     # needs google-tunix: pip install "miss-jax[tunix]"
    python examples/nnx_llm_tunix.py --steps 60 --out runs/nnx_llm_tunix --torch-python .venv/bin/python

1. Writes a tiny Qwen 3 as a transformers PyTorch folder (`config.json` + `model.safetensors` in torch's
   names and layout, random weights; written with NumPy, no torch needed) whose vocabulary is the 256
   bytes of UTF-8 text.
2. Builds tunix's Qwen 3 from that folder (`interop.tunix_models.from_transformers`: RoPE at the folder's
   `rope_theta`, float32, as transformers computes it).
3. Adds a MiSS adapter (`miss_jax.get_peft_model`) on every projection, plus a trained copy of
   `lm_head` (`modules_to_save`), and trains it a few steps on next-byte prediction over
   `examples/data/fables.txt` with `nnx.Optimizer(..., wrt=peft_model.trainable)`.
4. Saves the adapter as a PEFT folder (`peft_model.save_pretrained`, through the name map of tunix's Qwen 3,
   found from the model's class) and loads it (`MissModel.from_pretrained`)
   back into a fresh tunix model (same logits).
5. When PyTorch is reachable (`--torch-python`, else `$MISS_JAX_TORCH_PYTHON`, else this Python if it has
   torch + transformers + peft), runs `miss-jax check --nnx tunix-qwen3`: `peft.PeftModel.from_pretrained`
   on `transformers.Qwen3ForCausalLM` gives the same logits.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Optional

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from interop.nnx_check import TORCH_PYTHON_VARIABLE, causal_logits, check_nnx  # noqa: E402
from interop.tunix_models import from_transformers  # noqa: E402
from miss_jax import MissConfig, MissModel, get_peft_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "data", "fables.txt")
DIMS = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10_000)


def write_qwen3_folder(folder: str, seed: int = 0) -> None:
    """A tiny random Qwen 3 as a transformers PyTorch folder: `config.json` and `model.safetensors`
    (torch names, torch `(out, in)` layout, float32)."""
    d, h, kv, hd, f, v = (DIMS[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                            "intermediate_size", "vocab_size"))
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(DIMS["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h * hd, d), p + "self_attn.k_proj.weight": (kv * hd, d),
                       p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, h * hd),
                       p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    tensors = {k: (np.ones(s) if len(s) == 1 else rng.normal(0, s[-1] ** -0.5, s)).astype(np.float32)
               for k, s in shapes.items()}
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **DIMS, "hidden_act": "silu",
              "max_position_embeddings": 512, "tie_word_embeddings": False, "attention_bias": False,
              "torch_dtype": "float32"}
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)


def byte_windows(path: str, seq: int, batch: int, steps: int, seed: int = 0) -> np.ndarray:
    """`(steps, batch, seq + 1)` random windows of the file's UTF-8 bytes (the token ids)."""
    data = np.frombuffer(open(path, "rb").read(), np.uint8).astype(np.int32)
    starts = np.random.default_rng(seed).integers(0, len(data) - seq - 1, (steps, batch))
    return data[starts[..., None] + np.arange(seq + 1)]


def torch_python(given: Optional[str]) -> Optional[str]:
    """The Python that runs the PyTorch side, or None when none is reachable."""
    if given or os.environ.get(TORCH_PYTHON_VARIABLE):
        return given or os.environ[TORCH_PYTHON_VARIABLE]
    if all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft")):
        return sys.executable
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/nnx_llm_tunix", help="where the base model and the adapter go")
    parser.add_argument("--steps", type=int, default=40, help="train steps (default 40)")
    parser.add_argument("--seq", type=int, default=32, help="bytes per training sequence (default 32)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    parser.add_argument("--torch-python", default=None,
                        help=f"Python with torch + transformers + peft (default ${TORCH_PYTHON_VARIABLE}, else this one)")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.seq < 2:
        parser.error("--steps and --seq must be at least 2")
    base, adapter = os.path.join(args.out, "qwen3-tiny"), os.path.join(args.out, "adapter")

    write_qwen3_folder(base)
    config = MissConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"], modules_to_save=["lm_head"])
    peft_model = get_peft_model(from_transformers(base), config)
    peft_model.print_trainable_parameters()

    optimizer = nnx.Optimizer(peft_model, optax.adam(args.lr), wrt=peft_model.trainable)
    causal = jnp.tril(jnp.ones((args.seq, args.seq), bool))

    @nnx.jit
    def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: jax.Array) -> jax.Array:
        """One Adam step of next-byte cross-entropy on `batch` `(B, seq + 1)`."""
        ids, labels = batch[:, :-1], batch[:, 1:]
        positions = jnp.broadcast_to(jnp.arange(args.seq), ids.shape)
        mask = jnp.broadcast_to(causal, (ids.shape[0], args.seq, args.seq))

        def loss_fn(model: nnx.Module) -> jax.Array:
            logits, _ = model(ids, positions, None, mask)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, peft_model.trainable))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(peft_model, optimizer, jnp.asarray(b))) for b in byte_windows(TEXT, args.seq, 8, args.steps)]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps")

    peft_model.save_pretrained(adapter)
    print(f"saved the PEFT folder {adapter}")
    probe = byte_windows(TEXT, 16, 2, 1, seed=1)[0, :, :16]
    reloaded = MissModel.from_pretrained(from_transformers(base), adapter)
    diff = float(np.max(np.abs(causal_logits(reloaded, probe) - causal_logits(peft_model, probe))))
    print(f"reloaded into a fresh tunix model: max |logits diff| = {diff:.2e}")

    python = torch_python(args.torch_python)
    if python is None:
        print(f"PyTorch check skipped: no torch here; set {TORCH_PYTHON_VARIABLE} (or --torch-python) to a Python "
              "with torch, transformers and peft")
        return 0 if diff <= 1e-5 else 1
    result = check_nnx("tunix-qwen3", base, adapter, torch_python=python)
    print(f"PyTorch PEFT (miss-jax check --nnx tunix-qwen3 --base {base} --adapter {adapter}):")
    print("\n".join(result.lines()))
    return 0 if result.ok and diff <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
