"""One layer's causal self-attention, forward and backward, three ways side by side (JSON + markdown):

    python benchmarks/attention.py                       # batch 2, 2048 tokens, 8 heads of 64
    python benchmarks/attention.py --seq 4096 --block-size 128

* `jax/transformers`: transformers' Flax formulation (full `(B, H, T, T)` float32 scores, mask added,
  softmax, weights @ values), differentiated by JAX;
* `jax/blockwise`: `miss_jax.attention.blockwise_attention` (flash-style, causal key trimming);
* `torch/sdpa`: `torch.nn.functional.scaled_dot_product_attention(is_causal=True)`, PyTorch's fused CPU
  kernel (what PEFT's Llama runs).

Each case is the gradient of `sum(out * cotangent)` w.r.t. query, key and value; the median of `--repeats`
runs after one warm-up, the CPU time (user, sys) and the minor page faults per run (fresh memory the
kernel maps: XLA:CPU allocates each execution's buffers anew, and zeroing them is sys time). Both
frameworks run on the same `--threads` CPUs. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from report import write_json, write_text  # noqa: E402
from run import cpu_info  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=256, help="blockwise_attention's queries per block")
    p.add_argument("--threads", type=int, default=None, help="CPUs for both frameworks (default: all allowed)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(HERE, "results", "attention-cpu.json"))
    return p.parse_args(argv)


def measure(run: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median wall time of `run` after a warm-up, with CPU seconds and minor page faults per run."""
    run()
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"median_s": statistics.median(times), "min_s": min(times),
            "user_s": (after.ru_utime - before.ru_utime) / repeats, "sys_s": (after.ru_stime - before.ru_stime) / repeats,
            "minor_faults": (after.ru_minflt - before.ru_minflt) / repeats}


def jax_cases(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import jax
    import jax.numpy as jnp

    from miss_jax.attention import blockwise_attention

    b, t, h, d = args.batch, args.seq, args.heads, args.head_dim
    q, k, v, cot = (jax.random.normal(jax.random.PRNGKey(i), (b, t, h, d)) for i in range(4))
    mask = jnp.ones((b, t), jnp.int32)

    def transformers_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        scores = jnp.einsum("bqhd,bkhd->bhqk", q / jnp.sqrt(d), k)
        allowed = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None, None] & (mask[:, None, None, :] != 0)
        weights = jax.nn.softmax(scores + jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)

    def blockwise(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return blockwise_attention(q, k, v, mask, block_size=args.block_size)

    out = {}
    for name, fn in (("jax/transformers", transformers_attention), ("jax/blockwise", blockwise)):
        grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.vdot(fn(q, k, v), cot), argnums=(0, 1, 2)))
        compiled = grad.lower(q, k, v).compile()
        out[name] = measure(lambda: jax.block_until_ready(compiled(q, k, v)), args.repeats)
        out[name]["temp_mb"] = round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)
    return out


def torch_case(args: argparse.Namespace, threads: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    cot = torch.randn(shape)

    def run() -> None:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad((out * cot).sum(), (q, k, v))

    return {"torch/sdpa": measure(run, args.repeats)}


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [f"# One layer's causal attention, forward + backward (batch {meta['batch']} x {meta['seq']} tokens, "
             f"{meta['heads']} heads of {meta['head_dim']})", "",
             f"CPU: {meta['cpu']['model']}; threads: {meta['threads']}; blockwise block_size {meta['block_size']}; "
             f"median of {meta['repeats']}; load average at start: {meta['loadavg_start']}.", "",
             "| case | ms | user s | sys s | minor faults | XLA temp MiB |", "|---|---:|---:|---:|---:|---:|"]
    for name, c in result["cases"].items():
        lines.append(f"| {name} | {1e3 * c['median_s']:.1f} | {c['user_s']:.2f} | {c['sys_s']:.2f} | "
                     f"{c['minor_faults']:.0f} | {c.get('temp_mb', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    allowed = sorted(os.sched_getaffinity(0))
    threads = args.threads or len(allowed)
    if not 1 <= threads <= len(allowed):
        raise SystemExit(f"--threads {threads}: this process may use {len(allowed)} CPUs; pass 1..{len(allowed)}.")
    os.sched_setaffinity(0, allowed[:threads])  # before JAX starts: XLA sizes its thread pool from it
    meta = {"batch": args.batch, "seq": args.seq, "heads": args.heads, "head_dim": args.head_dim,
            "block_size": args.block_size, "threads": threads, "repeats": args.repeats, "cpu": cpu_info(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    result = {"meta": meta, "cases": {**jax_cases(args), **torch_case(args, threads)}}
    write_json(args.out, result)
    md = markdown(result)
    write_text(os.path.splitext(args.out)[0] + ".md", md)
    print(md)
    return result


if __name__ == "__main__":
    main()
