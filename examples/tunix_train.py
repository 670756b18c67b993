"""MiSS with tunix's own loop: tunix's `PeftTrainer` trains the adapter, tunix's `Sampler` generates with it
(unmerged), and the adapter is saved as a PEFT folder PyTorch PEFT loads.

    python examples/tunix_train.py                       # needs google-tunix: pip install "miss-jax[tunix]"
    python examples/tunix_train.py --steps 40 --out runs/tunix_train --torch-python .venv/bin/python

1. Writes a tiny Qwen 3 as a transformers folder (`nnx_llm_tunix.write_qwen3_folder`: random weights, the 256
   bytes of UTF-8 as its vocabulary) and builds tunix's model from it (`interop.tunix_models.from_transformers`).
2. Adds a MiSS adapter on every projection plus a trained copy of `lm_head` (`modules_to_save`). Its trainable
   variables are `nnx.LoRAParam`s (`miss_jax.nnx_variables`), so tunix's `PeftTrainer` trains them and nothing
   else: no base weight moves, checked after training.
3. Trains with `PeftTrainer.train` (tunix's default next-token loss, gradient accumulation over 2 micro-batches,
   tunix's checkpoints of the LoRA params and optimizer state in OUT/checkpoints: a second run resumes there).
4. Samples greedily with tunix's `Sampler` on the adapted model (adapters unmerged).
5. Saves the PEFT folder OUT/adapter (`save_pretrained`: the name map comes from the model's class), and when PyTorch
   is reachable (`--torch-python`, else `$MISS_JAX_TORCH_PYTHON`) checks it there: `miss-jax check --nnx`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.generate.sampler import CacheConfig, Sampler  # noqa: E402
from tunix.sft import peft_trainer  # noqa: E402
from tunix.sft import utils as sft_utils  # noqa: E402

from interop.nnx_check import check_nnx  # noqa: E402
from interop.tunix_models import from_transformers  # noqa: E402
from miss_jax import MissConfig, get_peft_model  # noqa: E402
from miss_jax.nnx_variables import check_trainable  # noqa: E402
from nnx_llm_tunix import DIMS, TEXT, byte_windows, torch_python, write_qwen3_folder  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ByteTokenizer:
    """UTF-8 bytes as token ids: the methods tunix's `Sampler` asks of a tokenizer. No BOS (`bos_id` 0 is
    falsy to tunix), no EOS (-1: never generated), pad -1."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def bos_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return -1

    def pad_id(self) -> int:
        return -1


def model_inputs(batch: peft_trainer.TrainingInput) -> dict[str, Any]:
    """tunix's default loss inputs from a `TrainingInput` `(B, T)`: tokens, mask, positions, causal mask."""
    mask = batch.input_mask
    return {"input_tokens": batch.input_tokens, "input_mask": mask,
            "positions": sft_utils.build_positions_from_mask(mask),
            "attention_mask": sft_utils.make_causal_attn_mask(mask)}


def training_inputs(windows: np.ndarray) -> list[peft_trainer.TrainingInput]:
    """One `TrainingInput` per `(B, T)` batch of `windows` `(n, B, T)`, every token valid."""
    return [peft_trainer.TrainingInput(input_tokens=w, input_mask=np.ones_like(w, bool)) for w in windows]


def params(model: nnx.Module) -> dict[Any, np.ndarray]:
    """Every `nnx.Param` (LoRA params included) of `model` by graph path, as NumPy."""
    return {path: np.asarray(node.get_value()) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/tunix_train", help="where the base model, checkpoints and adapter go")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20), each of 2 micro-batches")
    parser.add_argument("--seq", type=int, default=32, help="bytes per training sequence (default 32)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--prompt", default="The fox", help="the prompt tunix's Sampler continues")
    parser.add_argument("--torch-python", default=None, help="Python with torch + transformers + peft for the check")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.seq < 2:
        parser.error("--steps and --seq must be at least 2")
    base, adapter = os.path.join(args.out, "qwen3-tiny"), os.path.join(args.out, "adapter")

    write_qwen3_folder(base)
    config = MissConfig(r=8, target_modules=TARGETS, modules_to_save=["lm_head"])
    model = get_peft_model(from_transformers(base), config)
    model.print_trainable_parameters()
    check_trainable(model)  # a model with no nnx.LoRAParam would be fully fine-tuned by tunix

    before = params(model)
    training = peft_trainer.TrainingConfig(
        eval_every_n_steps=10**9, max_steps=args.steps, gradient_accumulation_steps=2,
        checkpoint_root_directory=os.path.abspath(os.path.join(args.out, "checkpoints")),
        checkpointing_options=ocp.CheckpointManagerOptions(save_interval_steps=max(1, args.steps // 2), max_to_keep=2),
    )
    trainer = peft_trainer.PeftTrainer(model, optax.adamw(args.lr), training).with_gen_model_input_fn(model_inputs)
    start = trainer.train_steps  # > 0: resumed from tunix's checkpoint of an earlier run
    trainer.train(training_inputs(byte_windows(TEXT, args.seq, 4, 2 * args.steps)))
    logger = trainer.metrics_logger
    losses = logger.get_metric_history("", "loss", "train") if logger.metric_exists("", "loss", "train") else []
    if len(losses):
        print(f"PeftTrainer: loss {losses[0]:.3f} -> {losses[-1]:.3f} over steps {start}..{trainer.train_steps}")
    else:
        print(f"PeftTrainer: resumed at step {start}; nothing left to train")

    after = params(model)
    moved = {p for p in before if not np.array_equal(before[p], after[p])}
    lora = {p for p, node in nnx.iter_graph(model) if isinstance(node, nnx.LoRAParam)}
    print(f"moved: {len(moved)} of {len(before)} params; outside the MiSS blocks and the lm_head copy: "
          f"{len(moved - lora)}")

    cache = CacheConfig(cache_size=128, num_layers=DIMS["num_hidden_layers"],
                        num_kv_heads=DIMS["num_key_value_heads"], head_dim=DIMS["head_dim"])
    sampler = Sampler(model.base_model, ByteTokenizer(), cache)  # the adapted model itself, adapters unmerged
    sample = sampler([args.prompt], max_generation_steps=48, temperature=0.0)
    print(f"Sampler (greedy, adapters unmerged): {args.prompt!r} -> {sample.text[0]!r}")

    model.save_pretrained(adapter)
    print(f"saved the PEFT folder {adapter}")
    python = torch_python(args.torch_python)
    if python is None:
        print("PyTorch check skipped: no torch here; set MISS_JAX_TORCH_PYTHON (or --torch-python)")
        return 0 if not moved - lora else 1
    result = check_nnx("tunix-qwen3", base, adapter, torch_python=python)
    print("PyTorch PEFT (miss-jax check --nnx tunix-qwen3):")
    print("\n".join(result.lines()))
    return 0 if result.ok and not moved - lora else 1


if __name__ == "__main__":
    sys.exit(main())
