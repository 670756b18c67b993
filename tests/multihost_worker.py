"""One process of the multi-host tests (tests/test_multihost.py): trains a tiny Llama's MiSS adapter with
FSDP on a (4, 2) mesh over every device of every process, through examples/train_sharded.py's own
pieces, and writes what it saw under `--out` for the test to compare.

    python tests/multihost_worker.py --out DIR [--mode train|die] [--distributed]

`--distributed` joins the run from the JAX_* environment variables (`initialize_distributed`). Without it,
one process with 8 devices runs the same global batches: the reference.

mode "train" (files `result_<process>.json`, `trained_<process>.npz`, `adapter_<process>/` from process 0 only):
  steps 1-2, an orbax checkpoint at step 2 (written by every process), step 3 (uninterrupted); then the
  checkpoint is restored, its state compared to step 2's, and step 3 rerun from it (resume); the adapter
  is saved with `save_pretrained(is_main_process=process 0)`; merge and unmerge (shardings kept?).
mode "die": prints "step 1 done" after step 1, then runs steps forever (the test kills one process).
`--crash-before checkpoint|adapter`: in mode "train", process 1 kills itself (SIGKILL) just before that
save, so that process 0 is inside the save when its peer dies.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time

import jax
import numpy as np
import optax
from flax import traverse_util
from jax.experimental import multihost_utils

from miss_jax import sharding as S
from miss_jax import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_ARGS = ["--strategy", "fsdp", "--mesh", "4,2", "--hidden", "32", "--layers", "1", "--heads", "4",
                "--seq", "16", "--batch", "8", "--r", "4", "--lr", "2e-2", "--text", os.path.join(ROOT, "README.md")]


def load_example():
    spec = importlib.util.spec_from_file_location("train_sharded", os.path.join(ROOT, "examples", "train_sharded.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def gathered(tree):
    """Every leaf of `tree` as a whole numpy array on this process (a collective)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def leaves(tree) -> list:
    return jax.tree_util.tree_leaves(tree)


def max_diff(a, b) -> float:
    """The largest |a - b| over two trees of arrays of the same structure."""
    return max(float(np.abs(x - y).max()) for x, y in zip(leaves(a), leaves(b)))


def flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("train", "die"), default="train")
    p.add_argument("--distributed", action="store_true")
    p.add_argument("--crash-before", choices=("checkpoint", "adapter"))
    cli = p.parse_args()
    if cli.distributed:
        S.initialize_distributed(timeout=60, heartbeat_timeout=10)
    example = load_example()
    args = example.parse_args(EXAMPLE_ARGS)
    mesh, rules, spec = S.make_mesh(args.mesh), S.llama_rules(args.strategy), S.llama_batch_spec(args.strategy)
    peft_model = example.build(args, mesh, rules)
    tokens = example.read_bytes(args.text)
    tx = optax.adamw(args.lr)
    step = S.make_sharded_train_step(peft_model, tx, T.causal_lm_loss, mesh, rules, spec)
    batch = lambda i: S.shard_batch(example.local_batch(tokens, i, args), mesh, spec)  # noqa: E731
    me = jax.process_index()

    def crash_point(name: str) -> None:
        if cli.crash_before == name and me == 1:
            print(f"crashing before the {name} save", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    if cli.mode == "die":
        state = S.create_sharded_train_state(peft_model, tx, mesh, rules)
        i = 0
        while True:
            state, loss = step(peft_model.params, state, batch(i), jax.random.PRNGKey(i))
            float(loss)
            if i == 0:
                print("step 1 done", flush=True)
            i += 1

    state = S.create_sharded_train_state(peft_model, tx, mesh, rules)
    losses = []
    for i in range(2):
        state, loss = step(peft_model.params, state, batch(i), jax.random.PRNGKey(i))
        losses.append(float(loss))
    at_two = gathered(state.trainable)
    crash_point("checkpoint")
    T.save_checkpoint(os.path.join(cli.out, "checkpoint"), state, peft_model)
    state, loss = step(peft_model.params, state, batch(2), jax.random.PRNGKey(2))
    losses.append(float(loss))
    uninterrupted = gathered(state.trainable)

    template = S.abstract_train_state(peft_model, tx, mesh, rules)
    restored = T.restore_checkpoint(os.path.join(cli.out, "checkpoint"), template)
    restored_step = int(restored.step)
    restore_diff = max_diff(gathered(restored.trainable), at_two)
    restored_sharded_ok = all(
        a.sharding.is_equivalent_to(b.sharding, a.ndim)
        for a, b in zip(leaves(restored), leaves(state)))
    resumed, resumed_loss = step(peft_model.params, restored, batch(2), jax.random.PRNGKey(2))
    resume_diff = max_diff(gathered(resumed.trainable), uninterrupted)

    crash_point("adapter")
    peft_model.save_pretrained(os.path.join(cli.out, f"adapter_{me}"), is_main_process=me == 0)

    before = {k: v.sharding for k, v in traverse_util.flatten_dict(peft_model.params).items()}
    unmerged = peft_model(**batch(3)).logits
    peft_model.merge_adapter()
    merged = peft_model(**batch(3)).logits
    after = traverse_util.flatten_dict(peft_model.params)
    kept = all(v.sharding.is_equivalent_to(before[k], v.ndim) for k, v in after.items())
    merge_diff = float(np.abs(gathered(merged) - gathered(unmerged)).max())
    peft_model.unmerge_adapter()

    np.savez(os.path.join(cli.out, f"trained_{me}.npz"), **flat(uninterrupted))
    result = {
        "process_index": me, "process_count": jax.process_count(), "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(), "losses": losses, "resumed_loss": float(resumed_loss),
        "restored_step": restored_step, "restore_diff": restore_diff, "restored_sharded_ok": restored_sharded_ok,
        "resume_diff": resume_diff, "shardings_kept": kept, "merge_diff": merge_diff,
        "adapter_sharded_over_hosts": not all(x.is_fully_addressable for x in leaves(state.trainable)),
    }
    with open(os.path.join(cli.out, f"result_{me}.json"), "w") as f:
        json.dump(result, f)
    print("done", json.dumps(result), flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"worker time {time.perf_counter() - t0:.1f}s", file=sys.stderr)
