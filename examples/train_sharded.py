"""Train MiSS adapters on a Llama-architecture model sharded over a (data, model) device mesh.

    # 8 simulated CPU devices, 4-way data x 2-way tensor parallel:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/train_sharded.py --mesh 4,2
    python examples/train_sharded.py --mesh 8,1 --strategy fsdp --variant bat     # on an 8-chip host
    python examples/train_sharded.py --distributed ...                            # each host of a pod
    # 2 processes x 4 CPU devices on one machine (run both; --process-id 1 in the second):
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/train_sharded.py --strategy fsdp \
        --distributed --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0 --out runs/sharded

Steps: build a small random-init Llama (`LlamaConfig`, bytes as tokens: vocab 256) with its params
created directly sharded (`init_sharded_params`: no kernel ever sits whole on one device); add a MiSS
adapter created sharded like its kernels (`shard_peft_model`); train it with the sharded step
(`make_sharded_train_step`: params by the strategy's rules, optimizer state like its params, batch split
over the data axis) on byte windows of a text (default: this repository's README and this file); save an
orbax checkpoint of the sharded state; merge the adapter in place (kernels keep their shardings) and check
the merged model gives the unmerged logits; optionally write the PEFT folder.

Multi-host: start the same command on every host with `--distributed` (`miss_jax.sharding.initialize_distributed`:
the coordinator, process count and id from --coordinator/--num-processes/--process-id or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID, or found by JAX itself on TPU pod slices and SLURM); each host feeds its
share of every batch, `--out` must be a folder every host can reach.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import traverse_util  # noqa: E402

from miss_jax import MissConfig, get_peft_model  # noqa: E402
from miss_jax import sharding as S  # noqa: E402
from miss_jax import train as T  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_TEXTS = [os.path.join(ROOT, "README.md"), os.path.abspath(__file__)]
VARIANTS = {"balance": True, "mini": "mini", "bat": "bat"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_mesh(text: str) -> tuple[int, int]:
    """'4,2' -> (4, 2): the (data, model) mesh shape."""
    try:
        data, model = (int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mesh takes DATA,MODEL (e.g. 4,2), got {text!r}") from None
    return data, model


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mesh", type=parse_mesh, default=None,
                   help="DATA,MODEL mesh shape, e.g. 4,2 (default: every device, 2-way model axis when even)")
    p.add_argument("--strategy", choices=S.STRATEGIES, default="tensor_parallel")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="balance")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--mini-r", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="global batch (split over the mesh)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", action="append", help="text file(s) to train on (bytes as tokens)")
    p.add_argument("--out", default=None, help="folder for the orbax checkpoint and the PEFT adapter folder")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: join the run (miss_jax.sharding.initialize_distributed) before anything else")
    p.add_argument("--coordinator", help="with --distributed: process 0's HOST:PORT (else $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, help="with --distributed: process count (else $JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="with --distributed: this process's id (else $JAX_PROCESS_ID)")
    p.add_argument("--timeout", type=int, default=300,
                   help="with --distributed: seconds to wait for every process to reach the coordinator")
    return p.parse_args(argv)


def default_mesh_shape() -> tuple[int, int]:
    n = jax.device_count()
    return (n // 2, 2) if n % 2 == 0 and n > 1 else (n, 1)


def read_bytes(paths: Sequence[str]) -> np.ndarray:
    """Every readable file of `paths`, concatenated, as uint8 tokens."""
    chunks = []
    for path in paths:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                chunks.append(np.frombuffer(f.read(), np.uint8))
    if not chunks:
        raise ValueError(f"None of the text files {list(paths)} exists; pass --text FILE.")
    return np.concatenate(chunks)


def local_batch(tokens: np.ndarray, step: int, args: argparse.Namespace) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step` (random byte windows of `args.seq` tokens): the same global
    batch whatever the host count, each process taking its consecutive share of rows."""
    rows = args.batch // jax.process_count()
    starts = np.random.default_rng((args.seed, step)).integers(0, len(tokens) - args.seq, args.batch)
    starts = starts[jax.process_index() * rows : (jax.process_index() + 1) * rows]
    ids = np.stack([tokens[s : s + args.seq] for s in starts]).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def build(args: argparse.Namespace, mesh: Any, rules: S.Rules) -> Any:
    """A random-init Llama with its params and its MiSS adapter created sharded on `mesh`."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2), max_position_embeddings=args.seq,
    )
    model = FlaxLlamaForCausalLM(config, input_shape=(1, args.seq), seed=args.seed, _do_init=False)
    params = S.init_sharded_params(model, mesh, rules, seed=args.seed)
    miss = MissConfig(r=args.r, mini_r=args.mini_r, init_weights=VARIANTS[args.variant], target_modules=TARGETS)
    peft_model = get_peft_model(model, miss, params=params, low_cpu_mem_usage=True)
    S.shard_peft_model(peft_model, mesh, rules, seed=args.seed)
    return peft_model


def say(*parts: Any) -> None:
    if jax.process_index() == 0:
        print(*parts, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.distributed:
        S.initialize_distributed(args.coordinator, args.num_processes, args.process_id, timeout=args.timeout)
    elif args.coordinator or args.num_processes is not None or args.process_id is not None:
        raise SystemExit("--coordinator, --num-processes and --process-id need --distributed.")
    shape = args.mesh or default_mesh_shape()
    mesh, rules = S.make_mesh(shape), S.llama_rules(args.strategy)
    batch_spec = S.llama_batch_spec(args.strategy)
    shards = S.axis_size(mesh, batch_spec[0])
    if args.batch % shards or args.batch % jax.process_count():
        raise ValueError(f"--batch {args.batch} must split over {shards} batch shards and {jax.process_count()} hosts.")
    say(f"mesh {dict(mesh.shape)} ({jax.process_count()} host(s), {jax.device_count()} {jax.devices()[0].platform} "
        f"devices), strategy {args.strategy}, variant {args.variant}")

    peft_model = build(args, mesh, rules)
    if jax.process_index() == 0:
        peft_model.print_trainable_parameters()
    q = peft_model.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    block = peft_model.adapter_params["miss"]["default"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["miss_block"]
    say(f"q_proj kernel {q.shape} sharded {q.sharding.spec}; "
        f"its miss_block {block.shape} sharded {block.sharding.spec}")

    tokens = read_bytes(args.text or DEFAULT_TEXTS)
    tx = optax.adamw(args.lr)
    state = S.create_sharded_train_state(peft_model, tx, mesh, rules)
    step = S.make_sharded_train_step(peft_model, tx, T.causal_lm_loss, mesh, rules, batch_spec)
    losses, start = [], time.perf_counter()
    for i in range(args.steps):
        batch = S.shard_batch(local_batch(tokens, i, args), mesh, batch_spec)
        state, loss = step(peft_model.params, state, batch, jax.random.PRNGKey(i))
        losses.append(float(loss))
        if i == 0 or (i + 1) % max(1, args.steps // 6) == 0:
            say(f"step {i + 1:4d}  loss {losses[-1]:.4f}  ({time.perf_counter() - start:.1f}s)")
    # every step wrote its trained (sharded) adapter into peft_model: nothing to copy back

    if args.out:
        path = T.save_checkpoint(os.path.join(args.out, "checkpoint"), state, peft_model)
        say(f"orbax checkpoint (sharded state): {path}")

    batch = S.shard_batch(local_batch(tokens, args.steps, args), mesh, batch_spec)
    unmerged = peft_model(**batch).logits
    before = {k: v.sharding for k, v in traverse_util.flatten_dict(peft_model.params).items()}
    peft_model.merge_adapter()
    merged = peft_model(**batch).logits
    after = traverse_util.flatten_dict(peft_model.params)
    kept = all(v.sharding.is_equivalent_to(before[k], v.ndim) for k, v in after.items())
    diff = float(jax.numpy.abs(merged - unmerged).max())
    say(f"merged in place: every param kept its sharding: {kept}; max |merged - unmerged| logits {diff:.2e}")
    peft_model.unmerge_adapter()

    if args.out:  # every process calls it: shards held by other hosts are gathered, process 0 writes
        peft_model.save_pretrained(os.path.join(args.out, "adapter"), is_main_process=jax.process_index() == 0)
        say(f"PEFT adapter folder: {os.path.join(args.out, 'adapter')}")
    say(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps")
    return {"losses": losses, "shardings_kept": kept, "merge_diff": diff}


if __name__ == "__main__":
    main()
