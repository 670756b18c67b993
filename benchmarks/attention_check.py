"""cuDNN's flash attention in a MiSS model against the model's own attention, on the device at hand.

    python benchmarks/attention_check.py OUT_JSON

A bfloat16 Llama with grouped-query attention (hidden 512, 8 heads / 2 KV heads of 64, 2 layers) and a
MiSS adapter on every projection, at batch 4 x 512: logits and the adapter's gradients with
`set_attn_implementation("flash")` (cuDNN on a GPU, blockwise on CPU) and "sdpa", against "eager", on a
batch without padding and one with right and left padding (the masked `lax.cond` branch); padded
positions are left out (cuDNN's output at a query that sees no key is unspecified). Writes the largest
differences, relative to the logits' scale, and which attention ran. The equality of the XLA
implementation is a CPU test (`tests/test_long_sequences.py`); this is its GPU twin, run by `gpu.sh`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers

from miss_jax import MissConfig, get_peft_model, losses
from miss_jax import train as T


def model() -> Any:
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    base = transformers.FlaxLlamaForCausalLM(config, seed=0, dtype=jnp.bfloat16)
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), base.params)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(base, MissConfig(r=16, init_weights=False, target_modules=targets)), params


def batches() -> dict[str, dict[str, jax.Array]]:
    ids = jax.random.randint(jax.random.PRNGKey(1), (4, 512), 3, 1024)
    full = jnp.ones_like(ids)
    padded = full.at[0, -100:].set(0).at[1, :37].set(0)
    return {"no padding": {"input_ids": ids, "attention_mask": full},
            "right and left padding": {"input_ids": ids, "attention_mask": padded}}


def logits_and_grads(pm: Any, params: Any, batch: dict) -> tuple[np.ndarray, list[np.ndarray]]:
    mask = batch["attention_mask"]

    def loss(trainable: Any) -> Any:
        out = pm.apply_fn()(params, trainable, **batch).logits.astype(jnp.float32)
        return losses.cross_entropy(out[:, :-1], batch["input_ids"][:, 1:], mask[:, 1:] * mask[:, :-1]), out

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(pm.trainable_params())
    keep = np.asarray(mask, bool)
    return np.asarray(logits)[keep], [np.asarray(g, np.float32) for g in jax.tree_util.tree_leaves(grads)]


def main(out_path: str) -> None:
    pm, params = model()
    result: dict[str, Any] = {"device": str(jax.devices()[0]), "jax": jax.__version__, "cases": {}}
    for name, batch in batches().items():
        pm.set_attn_implementation("eager")
        want, want_grads = logits_and_grads(pm, params, batch)
        scale = float(np.abs(want).max())
        gscale = max(float(np.abs(g).max()) for g in want_grads)
        for impl in ("flash", "sdpa"):
            pm.set_attn_implementation(impl)
            got, grads = logits_and_grads(pm, params, batch)
            result["cases"][f"{impl} / {name}"] = {
                "cudnn": bool(jax.default_backend() == "gpu"),
                "logits_max_abs_diff": float(np.abs(got - want).max()), "logits_scale": scale,
                "grads_max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(grads, want_grads)),
                "grads_scale": gscale,
            }
    # one bf16 train step with flash attention runs and moves the adapter
    pm.set_attn_implementation("flash")
    tx = optax.adamw(1e-3)
    state = T.create_train_state(pm, tx)
    step = T.make_train_step(pm, tx, losses.ChunkedCausalLMLoss(chunk_size=256))
    state, loss = step(params, state, batches()["no padding"], jax.random.PRNGKey(0))
    result["train_step_loss"] = float(loss)
    print(json.dumps(result, indent=1))
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
