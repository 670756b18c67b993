"""miss-jax vs PEFT on PyTorch, side by side: same architectures, weights, inputs, r, targets, threads.

    python benchmarks/run.py                     # full suite, CPU (about 10 minutes on 2 cores)
    python benchmarks/run.py --quick             # tiny shapes, smoke run
    python benchmarks/run.py --models bert --batch 8 --seq 64 --repeats 3
    python benchmarks/run.py --models llama-long --long-seq 4096   # the long-sequence train step only
    python benchmarks/run.py --device gpu --deadline 420   # the GPU suite (real LLM shapes; see gpu.sh)
    python benchmarks/run.py --device gpu --quick          # its tiny-shape dry run (on a CPU machine too)

Steps, each in its own process, model by model: `prepare.py` writes the weights for both frameworks;
`jax_side.py` and `torch_side.py` time the cases (forward, train step, adapter creation, merge_and_unload;
peak memory of each); this script combines them into one JSON (`--out`) and a markdown table beside it,
rewritten after every model. Each side saves after every group of cases, and `--deadline` stops a side
that would run past it: a run cut short still reports everything it measured.

Threads (CPU): both sides are restricted to the same `--threads` CPUs with `sched_setaffinity`
(taskset). XLA:CPU sizes its intra-op thread pool from the CPUs the process may run on; torch gets
`torch.set_num_threads(threads)` and OMP/MKL_NUM_THREADS. The JAX side runs on one device: any
`--xla_force_host_platform_device_count` in XLA_FLAGS is removed for it.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    p.add_argument("--models", default=None,
                   help="comma-separated subset of: bert, llama, llama-long (CPU; default), smollm2, smollm2-long; "
                        "llama-1b-long, smollm2, llama-1b (--device gpu; default all)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 16 on CPU, BERT and Llama; 8 on GPU)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 128 on CPU; 2048 on GPU)")
    p.add_argument("--llama-batch", type=int, default=None)
    p.add_argument("--llama-seq", type=int, default=None)
    p.add_argument("--long-batch", type=int, default=None, help="long-sequence batch size (default 2; 4 on GPU)")
    p.add_argument("--long-seq", type=int, default=None, help="long-sequence length (default 2048; 8192 on GPU)")
    p.add_argument("--r", type=int, default=None, help="MiSS r (default 64; 8 with --quick)")
    p.add_argument("--mini-r", type=int, default=None, help="mini_r of the mini variant (default 8; 4 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for each side (default: all allowed)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each case before timing (the first compiles)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs; the median is reported (default 5; 3 on GPU)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 warm-up, 1 repeat (smoke test)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: the CPU suite; gpu: the GPU suite (a dry run where there is no GPU)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole run: a side still running then is stopped, what it measured is kept")
    p.add_argument("--cases", default=None,
                   help="comma-separated group/case names each model runs instead of its own (e.g. "
                        "forward/base,forward/balance,train/balance/bf16; long/... for the long models)")
    p.add_argument("--sides", default="jax,torch", help="comma-separated subset of: jax, torch")
    p.add_argument("--out", default=None, help="JSON path, .md beside it (default results/cpu.json or gpu.json)")
    p.add_argument("--workdir", default=None, help="where weights and side outputs go (default: a temp dir)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the side processes")
    args = p.parse_args(argv)
    gpu = args.device == "gpu"
    args.models = args.models or ("llama-1b-long,smollm2,llama-1b" if gpu else "bert,llama,llama-long")
    args.out = args.out or os.path.join(HERE, "results", f"{args.device}.json")
    args.repeats = args.repeats or (3 if gpu else 5)
    if args.quick:
        args.warmup, args.repeats = 1, 1
    return args


def build_settings(args: argparse.Namespace, workdir: str) -> specs.Settings:
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.device == "gpu":
        table = specs.gpu_specs(args.batch or 8, args.seq or 2048, args.long_batch or 4, args.long_seq or 8192,
                                args.quick)
    else:
        batch, seq = (2, 24) if args.quick and args.batch is None and args.seq is None else (args.batch or 16, args.seq or 128)
        table = specs.model_specs(batch, seq, args.llama_batch or batch, args.llama_seq or seq, args.quick,
                                  args.long_batch or 2, args.long_seq or 2048)
    if args.cases:  # the GPU suite's models name their cases; --cases sets them
        keep = tuple(c.strip() for c in args.cases.split(",") if c.strip())
        table = {n: dataclasses.replace(s, cases=tuple(c for c in keep if c.startswith("long/") == (s.suite == "long"))
                                        or ("none",)) for n, s in table.items()}
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise ValueError(f"--models {args.models!r}: unknown {unknown}; choose from {sorted(table)} "
                         f"(--device {args.device}).")
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
    else:  # processes take turns on the GPU: none holds XLA's default 75% preallocation
        env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false")
    return env


def run_step(python: str, script: str, args: list[str], env: dict[str, str],
             timeout: Optional[float] = None) -> tuple[float, Optional[str]]:
    """Runs `benchmarks/<script>` in its own process: (wall time, None), or (wall time, why it stopped) when it
    failed or ran past `timeout` seconds (then it is killed)."""
    cmd = [python, os.path.join(HERE, script), *args]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t, f"stopped at the deadline ({timeout:.0f} s left for it)"
    if proc.returncode:
        return time.perf_counter() - t, (f"{shlex.join(cmd)} failed ({proc.returncode}):\n"
                                         f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return time.perf_counter() - t, None


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
        r, flops, matmuls = report.ratios(jm, tm), report.flop_ratios(jm), report.flop_ratios(jm, "matmul_flops")
        models[spec.name] = {
            "spec": {"batch": spec.batch, "seq": spec.seq, "targets": list(spec.targets), "config": spec.config,
                     "torch_attn_implementation": (tm or {}).get("attn_implementation")},
            "same_weights_max_abs_diff": same_weights(settings.workdir, spec.name),
            "jax": jm, "torch": tm, "ratios": r, "flop_ratios": flops, "matmul_flop_ratios": matmuls,
            "targets": report.targets(r, flops, matmuls),
        }
    return {"meta": meta, "models": models}


def merge_side(sides: dict[str, dict], side: str, path: str) -> None:
    """Adds the side JSON at `path` (one model's run, complete or cut short) to `sides[side]`."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        part = json.load(f)
    if side not in sides:
        sides[side] = dict(part, models={})
    sides[side]["models"].update(part["models"])


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or any(s not in ("jax", "torch") for s in sides):
        raise ValueError(f"--sides {args.sides!r}: choose from jax, torch.")
    start = time.perf_counter()
    left = lambda: None if args.deadline is None else max(args.deadline - (time.perf_counter() - start), 1.0)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="miss-bench-") as tmp:
        workdir = os.path.abspath(args.workdir or tmp)
        settings = build_settings(args, workdir)
        os.makedirs(workdir, exist_ok=True)
        env = side_env(args.device)
        loads = [round(x, 2) for x in os.getloadavg()]
        step_times: dict[str, float] = {}
        results: dict[str, dict] = {}
        problems: dict[str, str] = {}
        result: dict[str, Any] = {}
        md = os.path.splitext(args.out)[0] + ".md"
        for spec in settings.models:
            # the side scripts (and timing.isolated) read the settings of the model at hand
            settings_path = os.path.join(workdir, "settings.json")
            report.write_text(settings_path, dataclasses.replace(settings, models=(spec,)).to_json())
            for step, script, extra in [("prepare", "prepare.py", [])] + [
                    (side, f"{side}_side.py", [os.path.join(workdir, f"{side}-{spec.name}.json")]) for side in sides]:
                if args.deadline is not None and left() <= 1.0:
                    problems[f"{spec.name}/{step}"] = "not started: past the deadline"
                    continue
                wall, problem = run_step(args.python, script, [settings_path, *extra], env, left())
                step_times[f"{spec.name}/{step}"] = wall
                if problem:
                    problems[f"{spec.name}/{step}"] = problem
                    print(f"{spec.name}: {step} {problem.splitlines()[0]}", flush=True)
                if step == "prepare" and problem:
                    break
                if extra:
                    merge_side(results, step, extra[0])
                    print(f"{spec.name}: {step} side done in {wall:.0f} s", flush=True)
            result = combine(settings, results, step_times, (loads, [round(x, 2) for x in os.getloadavg()]), argv)
            result["meta"]["problems"] = problems
            report.write_json(args.out, result)
            report.write_text(md, report.markdown(result))
            print(report.model_markdown(spec.name, result["models"][spec.name]), flush=True)
    print(open(md).read())
    if problems:
        print("problems:\n" + "\n".join(f"  {k}: {v.splitlines()[0]}" for k, v in problems.items()), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
