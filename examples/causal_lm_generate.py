"""A causal LM adapted with MiSS in JAX, exported, and decoded greedily in both JAX and PyTorch PEFT.

    python examples/causal_lm_generate.py
    python examples/causal_lm_generate.py --seq 512 --batch-size 4 --accum-steps 2 --remat --blockwise --steps 20

A small Llama-architecture model (random weights from a `LlamaConfig`, written as a PyTorch
transformers folder that both frameworks load) gets a word-level vocabulary built from
`examples/data/fables.txt` (CC0-1.0, written for this project). MiSS blocks on `q_proj`/`v_proj` and
a trained copy of `lm_head` (`modules_to_save`) learn that text in a few steps, the adapter is saved
as a PEFT folder, and greedy decoding runs twice from the same prompt: in JAX (`peft_model.generate`:
transformers' Flax `generate` with its KV cache, the adapter applied unmerged at every step) and in
PyTorch (`transformers.LlamaForCausalLM` from the same base weights + `peft.PeftModel.from_pretrained`
+ `generate`). Both token lists are printed and compared.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Sequence
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from miss_jax import MissConfig, get_peft_model  # noqa: E402
from miss_jax import train as T  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TEXT = os.path.join(HERE, "data", "fables.txt")
SPECIALS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2
PAD, BOS, EOS = 0, 1, 2


class WordVocab:
    """A word-level vocabulary: lower-cased words and punctuation marks of a text, after `SPECIALS`."""

    pattern = re.compile(r"[a-z']+|[.,;:!?]")

    def __init__(self, text: str) -> None:
        self.words = list(SPECIALS) + sorted(set(self.split(text)))
        self.ids = {w: i for i, w in enumerate(self.words)}

    def split(self, text: str) -> list[str]:
        return self.pattern.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        unknown = sorted({w for w in self.split(text) if w not in self.ids})
        if unknown:
            raise ValueError(f"Words outside the vocabulary: {unknown}; the prompt must use words of the text.")
        return [self.ids[w] for w in self.split(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i] for i in ids)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--text-file", default=DEFAULT_TEXT, help="training text (paragraphs separated by blank lines)")
    p.add_argument("--prompt", default="The baker on the corner", help="decoding starts here (words of the text)")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--r", type=int, default=16, help="MiSS shard size r")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seq", type=int, default=32, help="training sequence length (tokens per example)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--accum-steps", type=int, default=1,
                   help="gradient accumulation: micro-batches per step (must divide --batch-size)")
    p.add_argument("--remat", action="store_true", help="per-layer gradient checkpointing (less memory, more time)")
    p.add_argument("--blockwise", action="store_true",
                   help="blockwise attention and the chunked loss: no (T, T) attention weights or (T, vocab) "
                        "logits kept for the backward pass (for long --seq)")
    p.add_argument("--output-dir", default=os.path.join("out", "causal_lm"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("new_tokens", "r", "steps", "seq", "batch_size", "accum_steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.batch_size % args.accum_steps:
        p.error(f"--accum-steps {args.accum_steps} must divide --batch-size {args.batch_size}")
    return args


def token_stream(vocab: WordVocab, text: str) -> np.ndarray:
    """Every paragraph as `<bos> words <eos>`, concatenated: `(N,)` int32."""
    ids: list[int] = []
    for para in re.split(r"\n\s*\n", text.strip()):
        ids += [BOS] + vocab.encode(para) + [EOS]
    return np.asarray(ids, np.int32)


def make_base_model(vocab_size: int, seed: int, folder: str, positions: int = 128) -> Any:
    """Writes a small random Llama (hidden 64, 2 layers, 4 heads, 2 key/value heads) to `folder` as a
    transformers PyTorch folder, and returns it loaded in Flax (`from_pt=True`): both frameworks then
    read the same weights, as with a real checkpoint."""
    import torch
    from transformers import FlaxLlamaForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=positions, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return FlaxLlamaForCausalLM.from_pretrained(folder, from_pt=True)


def train(peft_model: Any, stream: np.ndarray, args: argparse.Namespace) -> list[float]:
    """`args.steps` AdamW steps on random windows of the token stream; returns the losses. After each step
    the model holds the trained adapter (the step writes it back)."""
    from miss_jax import losses as L

    if args.remat:
        peft_model.gradient_checkpointing_enable()
    if args.blockwise:
        peft_model.set_attn_implementation("blockwise", block_size=min(256, args.seq))
    loss_fn = L.ChunkedCausalLMLoss() if args.blockwise else T.causal_lm_loss
    tx = optax.adamw(args.lr)
    state = T.create_train_state(peft_model, tx)  # copies the adapter leaves: the step donates the state
    step = T.make_train_step(peft_model, tx, loss_fn, accum_steps=args.accum_steps)
    rng = np.random.default_rng(args.seed)
    key = jax.random.PRNGKey(args.seed)
    losses = []
    for i in range(args.steps):
        starts = rng.integers(0, len(stream) - args.seq, args.batch_size)
        batch = {"input_ids": jnp.asarray(np.stack([stream[s : s + args.seq] for s in starts]))}
        state, loss = step(peft_model.params, state, batch, jax.random.fold_in(key, i))
        losses.append(float(loss))
    return losses


def jax_greedy(peft_model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """`peft_model.generate(...)`, greedy, with the adapter unmerged; the new tokens up to and including the
    first `<eos>` (after it, `generate` fills the row with `<pad>`; torch's stops there)."""
    out = peft_model.generate(
        np.asarray([prompt], np.int32), max_new_tokens=new_tokens, pad_token_id=PAD, eos_token_id=EOS
    ).sequences  # (1, len(prompt) + new_tokens)
    tokens = [int(t) for t in out[0, len(prompt):]]
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def torch_greedy(base_dir: str, adapter_dir: str, prompt: list[int], new_tokens: int) -> list[int]:
    """`PeftModel.from_pretrained(LlamaForCausalLM(base_dir), adapter_dir).generate(...)`, greedy; new tokens only."""
    import torch
    import transformers
    from peft import PeftModel

    transformers.logging.set_verbosity_error()
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )
    return out[0, len(prompt):].tolist()


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Runs the example; returns a summary (tokens from both frameworks, whether they match)."""
    args = parse_args(argv)
    t0 = time.time()
    with open(args.text_file, encoding="utf-8") as f:
        text = f.read()
    vocab = WordVocab(text)
    stream = token_stream(vocab, text)
    if len(stream) <= args.seq:
        raise ValueError(f"{args.text_file} has {len(stream)} tokens; --seq {args.seq} needs more.")
    prompt = [BOS] + vocab.encode(args.prompt)

    base_dir = os.path.join(args.output_dir, "base_model")
    model = make_base_model(len(vocab.words), args.seed, base_dir, positions=max(128, args.seq))
    peft_model = get_peft_model(model, MissConfig(
        r=args.r, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM"
    ))
    peft_model.print_trainable_parameters()
    losses = train(peft_model, stream, args)
    print(f"trained {args.steps} steps on {len(stream)} tokens: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    adapter_dir = os.path.join(args.output_dir, "adapter")
    peft_model.save_pretrained(adapter_dir)
    jax_tokens = jax_greedy(peft_model, prompt, args.new_tokens)
    torch_tokens = torch_greedy(base_dir, adapter_dir, prompt, args.new_tokens)
    match = jax_tokens == torch_tokens
    print(f"prompt      : {vocab.decode(prompt)}")
    print(f"JAX tokens  : {jax_tokens}")
    print(f"torch tokens: {torch_tokens}")
    print(f"JAX text    : {vocab.decode(jax_tokens)}")
    print(f"greedy tokens match: {match}")
    return {
        "prompt": prompt,
        "jax_tokens": jax_tokens,
        "torch_tokens": torch_tokens,
        "match": match,
        "losses": losses,
        "adapter_dir": adapter_dir,
        "runtime_s": round(time.time() - t0, 1),
    }


if __name__ == "__main__":
    main()
