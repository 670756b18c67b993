"""miss-jax vs PEFT on PyTorch, side by side: same architectures, weights, inputs, r, targets, threads.

    python benchmarks/run.py                     # full suite, CPU (about 10 minutes on 2 cores)
    python benchmarks/run.py --quick             # tiny shapes, smoke run
    python benchmarks/run.py --models bert --batch 8 --seq 64 --repeats 3
    python benchmarks/run.py --models llama-long --long-seq 4096   # the long-sequence train step only
    python benchmarks/run.py --device gpu        # on a GPU machine (see gpu.sh)

Steps, each in its own process: `prepare.py` writes the weights for both frameworks; `jax_side.py` and
`torch_side.py` time the cases (forward, train step, adapter creation, merge_and_unload; peak memory
of each); this script combines them into one JSON (`--out`) and a markdown table beside it.

Threads (CPU): both sides are restricted to the same `--threads` CPUs with `sched_setaffinity`
(taskset). XLA:CPU sizes its intra-op thread pool from the CPUs the process may run on; torch gets
`torch.set_num_threads(threads)` and OMP/MKL_NUM_THREADS. The JAX side runs on one device: any
`--xla_force_host_platform_device_count` in XLA_FLAGS is removed for it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import report  # noqa: E402
import specs  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="bert,llama,llama-long",
                   help="comma-separated subset of: bert, llama, llama-long")
    p.add_argument("--batch", type=int, default=16, help="BERT batch size (and Llama's unless --llama-batch)")
    p.add_argument("--seq", type=int, default=128, help="BERT sequence length (and Llama's unless --llama-seq)")
    p.add_argument("--llama-batch", type=int, default=None)
    p.add_argument("--llama-seq", type=int, default=None)
    p.add_argument("--long-batch", type=int, default=2, help="llama-long batch size (default 2)")
    p.add_argument("--long-seq", type=int, default=2048, help="llama-long sequence length (default 2048)")
    p.add_argument("--r", type=int, default=None, help="MiSS r (default 64; 8 with --quick)")
    p.add_argument("--mini-r", type=int, default=None, help="mini_r of the mini variant (default 8; 4 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for each side (default: all allowed)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each case before timing (the first compiles)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 warm-up, 1 repeat (smoke test)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--sides", default="jax,torch", help="comma-separated subset of: jax, torch")
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu.json"), help="JSON path (.md beside it)")
    p.add_argument("--workdir", default=None, help="where weights and side outputs go (default: a temp dir)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the side processes")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = 1, 1
    return args


def build_settings(args: argparse.Namespace, workdir: str) -> specs.Settings:
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    batch, seq = (2, 24) if args.quick and args.batch == 16 and args.seq == 128 else (args.batch, args.seq)
    table = specs.model_specs(batch, seq, args.llama_batch or batch, args.llama_seq or seq, args.quick,
                              args.long_batch, args.long_seq)
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise ValueError(f"--models {args.models!r}: unknown {unknown}; choose from {sorted(table)}.")
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or allowed
    if not 1 <= threads <= allowed:
        raise ValueError(f"--threads {threads}: this process may use {allowed} CPUs; pass 1..{allowed}.")
    r = args.r or (8 if args.quick else 64)
    mini_r = args.mini_r or (4 if args.quick else 8)
    return specs.Settings(tuple(table[n] for n in names), r, mini_r, threads, args.warmup, args.repeats,
                          args.device, workdir)


def side_env(device: str) -> dict[str, str]:
    """Environment of the side processes: offline hub, quiet transformers, one XLA device."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    if device == "cpu":
        env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    return env


def run_step(python: str, script: str, args: list[str], env: dict[str, str]) -> float:
    """Runs `benchmarks/<script>` in its own process; returns its wall time. Raises on failure."""
    cmd = [python, os.path.join(HERE, script), *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(
            f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return time.perf_counter() - t


def same_weights(workdir: str, name: str) -> Optional[float]:
    """Max |logits_jax - logits_torch| of the base models on the benchmark batch (None if a side is missing)."""
    import numpy as np

    paths = [os.path.join(workdir, name, f"{s}_logits.npy") for s in ("jax", "torch")]
    if not all(os.path.exists(p) for p in paths):
        return None
    a, b = (np.load(p, allow_pickle=False) for p in paths)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni",
                "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_info() -> dict[str, Any]:
    """The CPU a run measured on: model name, logical CPUs and the vector extensions it has (from
    /proc/cpuinfo; ratios measured on one CPU are facts about that CPU)."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model == "unknown":
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "logical_cpus": os.cpu_count(), "vector_extensions": [f for f in VECTOR_FLAGS if f in flags]}


def combine(settings: specs.Settings, sides: dict[str, dict], step_times: dict[str, float],
            loads: tuple[Any, Any], argv: list[str]) -> dict[str, Any]:
    """The output JSON: meta, then per model its spec, both sides' numbers, ratios and targets."""
    versions: dict[str, str] = {}
    for s in sides.values():
        versions.update(s["versions"])
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["benchmarks/run.py", *argv]),
        "device": " | ".join(f"{k}: {v['device']}" for k, v in sides.items()),
        "threads": settings.threads, "r": settings.r, "mini_r": settings.mini_r,
        "warmup": settings.warmup, "repeats": settings.repeats,
        "versions": versions, "xla_flags": sides.get("jax", {}).get("xla_flags"),
        "jax_device_count": sides.get("jax", {}).get("device_count"),
        "cpus": {k: v.get("cpus") for k, v in sides.items()},
        "cpu": cpu_info(),
        "step_seconds": {k: round(v, 1) for k, v in step_times.items()},
        "loadavg_start": loads[0], "loadavg_end": loads[1],
    }
    models: dict[str, Any] = {}
    for spec in settings.models:
        jm = sides.get("jax", {}).get("models", {}).get(spec.name)
        tm = sides.get("torch", {}).get("models", {}).get(spec.name)
        r, flops = report.ratios(jm, tm), report.flop_ratios(jm)
        models[spec.name] = {
            "spec": {"batch": spec.batch, "seq": spec.seq, "targets": list(spec.targets), "config": spec.config,
                     "torch_attn_implementation": (tm or {}).get("attn_implementation")},
            "same_weights_max_abs_diff": same_weights(settings.workdir, spec.name),
            "jax": jm, "torch": tm, "ratios": r, "flop_ratios": flops,
            "targets": report.targets(r, flops),
        }
    return {"meta": meta, "models": models}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or any(s not in ("jax", "torch") for s in sides):
        raise ValueError(f"--sides {args.sides!r}: choose from jax, torch.")
    with tempfile.TemporaryDirectory(prefix="miss-bench-") as tmp:
        workdir = os.path.abspath(args.workdir or tmp)
        settings = build_settings(args, workdir)
        os.makedirs(workdir, exist_ok=True)
        settings_path = os.path.join(workdir, "settings.json")
        report.write_text(settings_path, settings.to_json())
        env = side_env(args.device)
        loads = [round(x, 2) for x in os.getloadavg()]
        step_times = {"prepare": run_step(args.python, "prepare.py", [settings_path], env)}
        results = {}
        for side in sides:
            out = os.path.join(workdir, f"{side}.json")
            step_times[side] = run_step(args.python, f"{side}_side.py", [settings_path, out], env)
            results[side] = json.load(open(out))
            print(f"{side} side done in {step_times[side]:.0f} s", flush=True)
        result = combine(settings, results, step_times, (loads, [round(x, 2) for x in os.getloadavg()]), argv)
    report.write_json(args.out, result)
    md = os.path.splitext(args.out)[0] + ".md"
    report.write_text(md, report.markdown(result))
    print(open(md).read())
    return result


if __name__ == "__main__":
    main()
