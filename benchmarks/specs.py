"""What the benchmark runs: model shapes, adapter settings, inputs. Shared by both sides (numpy only).

Two models, the same architecture and weights in both frameworks:
  * ``bert``: all-MiniLM-L6-shaped BERT (6 layers, hidden 384, intermediate 1536, 12 heads) with a
    2-way sequence-classification head; MiSS on ``query``/``value``/``dense`` (PEFT's suffix match, so
    every ``*.dense``: attention.output, intermediate, output and the pooler).
  * ``llama``: a Llama-shaped causal LM of ~106M parameters (8 layers, hidden 768, intermediate 2048,
    12 heads, vocab 32000); MiSS on all seven projections.
    Its ``generate`` cases decode greedily (batch 8, prompt 64, 128 new tokens, end-of-text masked so
    both frameworks produce every token) with the merged model and with the adapter unmerged.
  * ``llama-long``: a Llama of 8 layers, hidden 512, intermediate 1376, 8 heads, vocab 32000 at batch
    2 x 2048 tokens (``--long-batch``, ``--long-seq``), MiSS balance on all seven projections: the train
    step of ``LONG_CASES`` only (peak memory and time at real sequence lengths).
  * ``smollm2`` / ``smollm2-long`` (``--models``; not in the default run): the SmolLM2-135M shape (below) at 4 x 512
    (forward, train step, unmerged greedy generate) and at the long-sequence batch (2 x 2048 by default).
``--quick`` swaps them for tiny shapes (hidden 32, 1 layer) for smoke runs and tests.

The GPU suite (``--device gpu``, `gpu_specs`) runs real LLM shapes, a chosen subset of cases each
(``ModelSpec.cases``), in float32 (TF32 matmuls on both sides) and in bfloat16 (cases named ``.../bf16``):
  * ``llama-1b-long``: a ~1B Llama (16 layers, hidden 2048, 32 heads / 8 KV heads, intermediate 8192, vocab
    32000) at 4 x 8192: a bf16 train step with flash attention (cuDNN; PyTorch's sdpa) and the chunked
    loss, without and with per-layer gradient checkpointing;
  * ``smollm2``: SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads, intermediate 1536,
    vocab 49152) at batch 8 x 2048: train step (bf16 and float32), greedy generate (batch 8, prompt 64,
    128 new tokens, adapter unmerged);
  * ``llama-1b`` at 8 x 2048: bf16 train step, merge.
``run.py --cases`` picks others of `ModelSpec.runs`' names (forward/base, forward/balance, generate/merged, ...).
Their heads are untied and RoPE's theta the default: the same compute as the real checkpoints, and the
same weights in both frameworks (transformers' Flax Llama ignores both fields; miss-jax's wrapping
honours them).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

VARIANTS = ("balance", "mini", "bat")
FORWARD_CASES = ("base",) + VARIANTS + ("merged",)
TRAIN_CASES = VARIANTS + ("full",)
GENERATE_CASES = ("merged", "balance")  # greedy generate: the merged model's, and with the balance adapter unmerged
# long sequences (suite "long"): a balance train step as a user runs it at length, without and with per-layer
# gradient checkpointing; JAX also runs "balance/plain" (transformers' attention, the plain loss: no long-context
# features), which has no PyTorch twin
LONG_CASES = ("balance/plain", "balance", "balance+remat")
# XLA flags a long case's JAX process starts with (on CPU). XLA:CPU's default scheduler orders a program for
# concurrency and starts each checkpointed layer's recomputation early, which keeps the memory checkpointing
# frees; the sequential scheduler keeps the saving (README "Long sequences"). XLA reads it at start-up only.
LONG_XLA_FLAGS = {"balance+remat": "--xla_cpu_enable_concurrency_optimized_scheduler=false"}
# what a model without its own `cases` runs, by group (the CPU suite)
STANDARD_CASES = {"forward": FORWARD_CASES, "train": TRAIN_CASES, "generate": GENERATE_CASES, "create": VARIANTS,
                  "merge_and_unload": VARIANTS, "long": LONG_CASES}
BF16 = "/bf16"  # case-name suffix: base weights and activations bfloat16, adapter and optimizer state float32
GPU_LONG_CASES = ("balance" + BF16, "balance+remat" + BF16)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: transformers class names (torch name; Flax adds the prefix), config, targets."""

    name: str
    config_class: str
    model_class: str
    config: dict[str, Any]
    targets: tuple[str, ...]
    task: str  # "classification" (labels (B,)) or "causal_lm" (next-token on input_ids)
    batch: int
    seq: int
    generate: tuple[int, int, int] = (0, 0, 0)  # causal LMs: (batch, prompt tokens, new tokens); 0: no generate
    suite: str = "standard"  # "standard": forward, train, generate, create, merge; "long": LONG_CASES only
    cases: tuple[str, ...] = ()  # "group/case" names this model runs (empty: every case of its suite)

    def runs(self, group: str, case: str) -> bool:
        """Whether case `group/case` is part of this model's run (`cases`, else `STANDARD_CASES`)."""
        return f"{group}/{case}" in self.cases if self.cases else case in STANDARD_CASES.get(group, ())

    def long_cases(self) -> tuple[str, ...]:
        """The long-sequence cases this model runs (`LONG_CASES` unless `cases` names others)."""
        named = tuple(c.split("/", 1)[1] for c in self.cases if c.startswith("long/"))
        return named if self.cases else LONG_CASES

    @property
    def vocab(self) -> int:
        return int(self.config["vocab_size"])


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a side needs to run the same suite (serialised to JSON for the side processes)."""

    models: tuple[ModelSpec, ...]
    r: int
    mini_r: int
    threads: int
    warmup: int
    repeats: int
    device: str  # "cpu" or "gpu"
    workdir: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        d = json.loads(text)
        models = tuple(ModelSpec(**{**m, "targets": tuple(m["targets"]), "generate": tuple(m["generate"]),
                                    "cases": tuple(m["cases"])}) for m in d.pop("models"))
        return cls(models=models, **d)


def model_specs(batch: int, seq: int, llama_batch: int, llama_seq: int, quick: bool,
                long_batch: int = 2, long_seq: int = 2048) -> dict[str, ModelSpec]:
    """The benchmark's models; ``quick`` gives tiny shapes with the same structure."""
    if quick:
        bert = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
        llama = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=4)
    else:
        bert = dict(vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                    num_attention_heads=12)
        llama = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                     num_attention_heads=12, num_key_value_heads=12)
    long = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8)
    if quick:
        long, long_batch, long_seq = dict(llama), 2, 64
    bert.update(num_labels=2, max_position_embeddings=max(512, seq))
    llama.update(max_position_embeddings=max(512, llama_seq), tie_word_embeddings=False)
    long.update(max_position_embeddings=max(2048, long_seq), tie_word_embeddings=False)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    smollm2 = dict(SMOLLM2 if not quick else llama, max_position_embeddings=2048, tie_word_embeddings=False)
    return {
        "smollm2": ModelSpec("smollm2", "LlamaConfig", "LlamaForCausalLM", smollm2, projections, "causal_lm",
                             *((2, 24) if quick else (4, 512)), (2, 8, 8) if quick else (8, 64, 128),
                             cases=("forward/base", "forward/balance", "train/balance", "generate/balance")),
        "smollm2-long": ModelSpec("smollm2-long", "LlamaConfig", "LlamaForCausalLM", smollm2, projections,
                                  "causal_lm", long_batch, long_seq, suite="long",
                                  cases=("long/balance", "long/balance+remat")),
        "bert": ModelSpec("bert", "BertConfig", "BertForSequenceClassification", bert,
                          ("query", "value", "dense"), "classification", batch, seq),
        "llama": ModelSpec("llama", "LlamaConfig", "LlamaForCausalLM", llama, projections,
                           "causal_lm", llama_batch, llama_seq, (2, 8, 8) if quick else (8, 64, 128)),
        "llama-long": ModelSpec("llama-long", "LlamaConfig", "LlamaForCausalLM", long, projections, "causal_lm",
                                long_batch, long_seq, suite="long"),
    }


# SmolLM2-135M's shape (its head is tied and its RoPE theta 1e5 in the checkpoint: the same compute untied at the
# default theta, which keeps both frameworks' weights equal on transformers' Flax Llama)
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, rms_norm_eps=1e-5)


def gpu_specs(batch: int, seq: int, long_batch: int, long_seq: int, quick: bool) -> dict[str, ModelSpec]:
    """The GPU suite's models (see the module docstring); ``quick`` gives tiny shapes with the same cases."""
    if quick:
        small = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
        smollm2, llama1b = dict(small), dict(small)
        batch, seq, long_batch, long_seq = 2, 32, 2, 64
    else:
        smollm2 = dict(SMOLLM2)
        llama1b = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8)
    smollm2.update(max_position_embeddings=max(2048, seq), tie_word_embeddings=False)
    llama1b.update(max_position_embeddings=max(8192, long_seq), tie_word_embeddings=False)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lm = ("LlamaConfig", "LlamaForCausalLM")
    # Ordered and trimmed to fit 8 minutes on one H200: each compiled step of these models takes 30-40 s (XLA:GPU),
    # loading and the same-weights forward 20-60 s per model (measured: README "On a GPU").
    return {
        "llama-1b-long": ModelSpec("llama-1b-long", *lm, llama1b, projections, "causal_lm", long_batch, long_seq,
                                   suite="long", cases=tuple(f"long/{c}" for c in GPU_LONG_CASES)),
        "smollm2": ModelSpec("smollm2", *lm, smollm2, projections, "causal_lm", batch, seq,
                             (2, 8, 8) if quick else (8, 64, 128),
                             cases=("train/balance" + BF16, "train/balance", "generate/balance")),
        "llama-1b": ModelSpec("llama-1b", *lm, llama1b, projections, "causal_lm", batch, seq,
                              cases=("train/balance" + BF16, "merge_and_unload/balance")),
    }


def inputs(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """The batch both sides feed: int32 ``input_ids``/``attention_mask`` ``(B, T)``; ``labels`` ``(B,)`` for
    classification (causal LM losses take their labels from ``input_ids``)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, spec.vocab, (spec.batch, spec.seq)).astype(np.int32)
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if spec.task == "classification":
        out["labels"] = rng.integers(0, spec.config["num_labels"], (spec.batch,)).astype(np.int32)
    return out


def long_repeats(settings: Settings) -> int:
    """Timed runs of a long-sequence case: at most 3 (each is seconds long and varies little)."""
    return min(settings.repeats, 3)


def logits_inputs(spec: ModelSpec, batch: dict[str, Any]) -> dict[str, Any]:
    """The part of `batch` (arrays of either framework) both sides' base logits are compared on: the first
    64 tokens of a long-sequence model (its full logits would be gigabytes), else all of it."""
    return {k: v[:, :64] for k, v in batch.items()} if spec.suite == "long" else dict(batch)


def generate_inputs(spec: ModelSpec, seed: int = 1) -> dict[str, np.ndarray]:
    """The prompts of the generate cases: int32 ``input_ids`` / ``attention_mask`` ``(batch, prompt)``."""
    batch, prompt, _ = spec.generate
    ids = np.random.default_rng(seed).integers(3, spec.vocab, (batch, prompt)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def miss_kwargs(variant: str, settings: Settings, spec: ModelSpec) -> dict[str, Any]:
    """MissConfig keyword arguments for a variant, identical for miss_jax and PEFT.

    balance starts random (``init_weights=False``) so that merges move the weights; mini and bat start
    at PEFT's zeros (their cost does not depend on the values).
    """
    init = {"balance": False, "mini": "mini", "bat": "bat"}[variant]
    return dict(r=settings.r, mini_r=settings.mini_r, init_weights=init, target_modules=list(spec.targets))
