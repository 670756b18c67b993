"""Where one JAX case's time goes: a jax.profiler trace, the compiled program, XLA's cost analysis and
its matmuls ranked by FLOPs. The tool behind the speed work (see README "How it was made fast").

    python benchmarks/profile_case.py --model bert --case forward/balance --out /tmp/prof
    python benchmarks/profile_case.py --model llama --case train/bat --threads 2 --out /tmp/prof

Cases: forward/{base,balance,mini,bat,merged}, train/{balance,mini,bat}; models, r and targets as in
run.py, with random weights (no torch needed). Writes to --out:
  * `<model>-<case>.hlo.txt`: the optimised HLO XLA runs (its fusions, dots, copies);
  * `trace/`: a jax.profiler trace of a few runs (open it in ui.perfetto.dev or TensorBoard's profile
    plugin: per-thunk times on CPU, per-kernel on GPU);
  * `<model>-<case>.json`: median time, XLA's flops and bytes accessed, and every top-level dot with
    its shapes, FLOPs, share of the dot FLOPs and the params it reads (adapter blocks are `miss_block`);
    the dot table is read from XLA:CPU programs (on GPU, matmuls are cuBLAS custom-calls: see the trace).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import hlo  # noqa: E402
import run as bench_run  # noqa: E402
import specs  # noqa: E402
import timing  # noqa: E402
from report import write_json, write_text  # noqa: E402

CASES = tuple(f"forward/{c}" for c in specs.FORWARD_CASES) + tuple(f"train/{v}" for v in specs.VARIANTS)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bert", choices=("bert", "llama"))
    p.add_argument("--case", default="forward/balance", choices=CASES)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=None, help="MiSS r (default as run.py: 64; 8 with --quick)")
    p.add_argument("--mini-r", type=int, default=None, help="mini_r (default as run.py: 8; 4 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all allowed)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (the median is reported)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, as run.py --quick (smoke run)")
    p.add_argument("--out", required=True, help="output folder")
    return p.parse_args(argv)


def build_case(spec: specs.ModelSpec, settings: specs.Settings, case: str) -> tuple[Callable[[], Any], Any]:
    """(one run of `case`, its lowered program) for `spec` with random weights."""
    import jax
    import jax.numpy as jnp
    import optax
    import transformers

    from miss_jax import MissConfig, MissModel
    from miss_jax.train import causal_lm_loss, classification_loss, create_train_state, make_train_step

    model = getattr(transformers, "Flax" + spec.model_class)(
        getattr(transformers, spec.config_class)(**spec.config), seed=0)
    batch = {k: jnp.asarray(v) for k, v in specs.inputs(spec).items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    group, name = case.split("/")
    variant = "balance" if name == "merged" else name
    pm = None if name == "base" else MissModel(model, MissConfig(**specs.miss_kwargs(variant, settings, spec)))
    if group == "forward" and name in ("base", "merged"):
        params = model.params if pm is None else pm.merge_and_unload(return_params=True)[1]
        forward = jax.jit(lambda p: model(**inputs, params=p).logits)
        return (lambda: forward(params)), forward.lower(params)
    if group == "forward":
        apply = pm.apply_fn()
        forward = jax.jit(lambda p, a: apply(p, a, **inputs).logits)
        return (lambda: forward(pm.params, pm.adapter_params)), forward.lower(pm.params, pm.adapter_params)
    tx = optax.adamw(1e-4, weight_decay=0.01)
    step = make_train_step(pm, tx, classification_loss if spec.task == "classification" else causal_lm_loss)
    box = {"state": create_train_state(pm, tx)}
    rng = jax.random.PRNGKey(0)
    lowered = step.lower(pm.params, box["state"], batch, rng)

    def run() -> Any:
        box["state"], loss = step(pm.params, box["state"], batch, rng)  # the state is donated
        return loss

    return run, lowered


def summary(text: str, cost: dict[str, float], times: list[float]) -> dict[str, Any]:
    """Median time, XLA's totals, and the dots by FLOPs with their share of all dot FLOPs."""
    dots = sorted(hlo.dots(text), key=lambda d: -d["flops"])
    total = sum(d["flops"] for d in dots)
    adapter = sum(d["flops"] for d in dots if any("miss_block" in r for r in d["reads"]))
    for d in dots:
        d["share"] = round(d["flops"] / total, 4) if total else None
    return {"median_s": statistics.median(times), "min_s": min(times),
            "xla_flops": cost.get("flops"), "xla_bytes_accessed": cost.get("bytes accessed"),
            "dot_flops": total, "dot_flops_reading_adapter_blocks": adapter, "dots": dots}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        timing.pin_threads(args.threads)
    import jax

    # The shapes, r and mini_r run.py would use for the same options.
    bench_options = ["--models", args.model, "--batch", str(args.batch), "--seq", str(args.seq)]
    if args.quick:
        bench_options.append("--quick")
    for flag, value in (("--r", args.r), ("--mini-r", args.mini_r)):
        if value:
            bench_options += [flag, str(value)]
    settings = bench_run.build_settings(bench_run.parse_args(bench_options), args.out)
    spec = settings.models[0]
    run, lowered = build_case(spec, settings, args.case)
    compiled = lowered.compile()
    cost = hlo.xla_cost(compiled)
    jax.block_until_ready(run())  # compiles the cached program, warms up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t)
    with jax.profiler.trace(os.path.join(args.out, "trace")):
        for _ in range(min(args.repeats, 3)):
            jax.block_until_ready(run())
    stem = os.path.join(args.out, f"{args.model}-{args.case.replace('/', '-')}")
    text = compiled.as_text()
    write_text(stem + ".hlo.txt", text)
    result = {"model": args.model, "case": args.case, "r": settings.r, "batch": spec.batch, "seq": spec.seq,
              "device": str(jax.devices()[0]), **summary(text, cost, times)}
    write_json(stem + ".json", result)
    print(f"{args.model} {args.case}: {1e3 * result['median_s']:.1f} ms, XLA flops {result['xla_flops']}")
    if result["dot_flops"]:
        top = "\n".join(f"  {d['share']:6.1%}  {d['lhs']} x {d['rhs']} -> {d['out']}  {', '.join(d['reads'])}"
                        for d in result["dots"][:8])
        share = result["dot_flops_reading_adapter_blocks"] / result["dot_flops"]
        print(f"dots reading adapter blocks: {share:.1%} of dot FLOPs\nlargest dots:\n{top}")
    else:
        print("no dot instructions: matmuls run as custom-calls here (GPU), see the trace and the HLO")
    print(f"wrote {stem}.json, {stem}.hlo.txt, {os.path.join(args.out, 'trace')}")
    return result


if __name__ == "__main__":
    main()
