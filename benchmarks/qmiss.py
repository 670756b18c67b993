"""QMiSS benchmark: MiSS on a float base vs a qwix-quantized base (int8, nf4) vs qwix's own QLoRA, side by side.

    .venv-modern/bin/python benchmarks/qmiss.py                      # llama-small, 30 steps -> benchmarks/results/qmiss.{json,md}
    .venv-modern/bin/python benchmarks/qmiss.py --preset tiny --steps 2 --out /tmp/qmiss   # a smoke run (the test's)

One invocation runs every case on the same tunix Llama 3 (random weights, seed 0), the same data in the same order
(byte windows of examples/data/fables.txt, a vocabulary of the 256 bytes) and the same optimizer (Adam, `--lr`):

| case | base | trainable |
|---|---|---|
| float + MiSS | float32 | MiSS balance, r=`--r`, on all seven projections |
| int8 + MiSS / nf4 + MiSS | `miss_jax.quantized.quantize` (int8 per output channel; nf4 in blocks of `tile`) | the same MiSS |
| int8 + qwix QLoRA / nf4 + qwix QLoRA | qwix's `LoraProvider` (the same quantization of the same layers) | LoRA on the same layers, its rank chosen so that its parameter count is the closest to MiSS's |

Each case runs in a process of its own (its memory is its own) and records: the bytes of the model's arrays
(`weight_bytes`), XLA's memory of the compiled train step (`step_peak_bytes`: arguments + outputs + temporaries -
donated aliases), the resident high-water mark of the process while training (`peak_rss_bytes`, reset after the
model is built and quantized), the compile time, the median step time after the first step, the loss at every
step, and `base_logit_error` (max |logits of the quantized base - logits of the float base| on a probe batch:
what quantization costs before any training). Output: `qmiss.json` and `qmiss.md` in `--out`
(default benchmarks/results), and `qmiss.png` (the loss curves) where matplotlib is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import timing  # noqa: E402

TEXT = os.path.join(ROOT, "examples", "data", "fables.txt")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QWIX_PATHS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclasses.dataclass(frozen=True)
class Preset:
    """A tunix Llama 3 shape, the batch, MiSS's rank and the 4-bit block size."""

    model: dict[str, int]
    batch: int
    seq: int
    r: int
    tile: int


PRESETS = {
    # ~19M parameters (4 layers, hidden 512, MLP 1408, 8 heads of 64, 4 KV heads): a couple of minutes on 2 cores
    "llama-small": Preset(dict(num_layers=4, vocab_size=256, embed_dim=512, hidden_dim=1408, num_heads=8, head_dim=64,
                               num_kv_heads=4), batch=4, seq=128, r=32, tile=64),
    "tiny": Preset(dict(num_layers=2, vocab_size=256, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
                        num_kv_heads=2), batch=2, seq=16, r=4, tile=8),
}
CASES = {  # name: (quantization type or None, method)
    "float + MiSS": (None, "miss"),
    "int8 + MiSS": ("int8", "miss"),
    "nf4 + MiSS": ("nf4", "miss"),
    "int8 + qwix QLoRA": ("int8", "qlora"),
    "nf4 + qwix QLoRA": ("nf4", "qlora"),
}


def windows(preset: Preset, steps: int, seed: int = 0) -> Any:
    """`(steps, batch, seq + 1)` random windows of the text's UTF-8 bytes (the same for every case)."""
    import numpy as np

    with open(TEXT, "rb") as f:
        data = np.frombuffer(f.read(), np.uint8).astype(np.int32)
    starts = np.random.default_rng(seed).integers(0, len(data) - preset.seq - 1, (steps, preset.batch))
    return np.stack([np.stack([data[s: s + preset.seq + 1] for s in row]) for row in starts])


def lora_rank(model: Any, r: int) -> tuple[int, int]:
    """`(LoRA rank, MiSS's trainable count)`: MiSS balance trains `r x out` per layer, LoRA `rank x (in + out)`;
    the rank whose count is the closest to MiSS's."""
    from miss_jax.nnx import discover

    layers = [layer for layer in discover(model).values() if layer.is_linear and layer.path[-1] in TARGETS]
    miss = r * sum(layer.out_features for layer in layers)
    per_rank = sum(layer.in_features + layer.out_features for layer in layers)
    return max(1, round(miss / per_rank)), miss


def run_case(name: str, preset: Preset, steps: int, lr: float) -> dict[str, Any]:
    """Builds, quantizes, adapts and trains one case in this process; its measurements."""
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import qwix
    from flax import nnx
    from tunix.models.llama3 import model as llama3

    from interop import nnx_io
    from miss_jax import MissConfig
    from miss_jax import quantized as qm
    from miss_jax import get_peft_model

    nnx_io.tunix_rules()
    qtype, method = CASES[name]
    config = llama3.ModelConfig(**preset.model, rope_theta=500_000, norm_eps=1e-5)
    model = llama3.Llama3(config, rngs=nnx.Rngs(0))
    data = windows(preset, steps)
    b, t = preset.batch, preset.seq
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    probe = jnp.asarray(data[0, :, :-1])
    float_logits = np.asarray(model(probe, positions, None, mask)[0])
    rank, miss_count = lora_rank(model, preset.r)
    quantization = None if qtype is None else qm.Quantization(qtype, preset.tile if qtype == "nf4" else None)
    if method == "miss":
        if quantization is not None:
            qm.quantize(model, quantization, target_modules=list(TARGETS))
        base_logits = np.asarray(model(probe, positions, None, mask)[0])
        model = get_peft_model(model, MissConfig(r=preset.r, target_modules=list(TARGETS)))
        wrt = model.trainable
    else:
        provider = qwix.LoraProvider(module_path=QWIX_PATHS, rank=rank, alpha=float(rank),
                                     weight_qtype=qm.QTYPES[qtype], tile_size=quantization.tile_size)
        model = qwix.apply_lora_to_model(model, provider, probe, positions, None, mask, rngs=nnx.Rngs(1))
        base_logits = np.asarray(model(probe, positions, None, mask)[0])  # LoRA's B starts at zero
        wrt = nnx.LoRAParam
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=wrt)
    trainable = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt))))
    weight_bytes = int(sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))
                           if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)) - 4 * trainable)
    graphdef, state = nnx.split((model, optimizer))
    del model, optimizer

    def step(state: Any, batch: jax.Array) -> tuple[jax.Array, Any]:
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model: Any) -> jax.Array:
            logits = model(batch[:, :-1], positions, None, mask)[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    first = jnp.asarray(data[0])
    started = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, first).compile()
    compile_s = time.perf_counter() - started
    memory = compiled.memory_analysis()
    step_peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                 - memory.alias_size_in_bytes)
    gc.collect()
    timing.trim_heap()
    timing.reset_peak_rss()
    losses, times = [], []
    for batch in data:
        started = time.perf_counter()
        loss, state = compiled(state, jnp.asarray(batch))
        losses.append(float(loss))
        times.append(time.perf_counter() - started)
    return {
        "case": name, "qtype": qtype, "method": method, "tile_size": quantization.tile_size if quantization else None,
        "trainable": trainable, "miss_trainable": miss_count, "lora_rank": rank if method == "qlora" else None,
        "weight_bytes": weight_bytes, "step_peak_bytes": int(step_peak), "xla_temp_bytes": int(memory.temp_size_in_bytes),
        "peak_rss_bytes": int(timing.Memory().peak()["rss"] * 2**20), "compile_s": compile_s,
        "step_s_median": statistics.median(times[1:] or times), "step_s": times, "losses": losses,
        "base_logit_error": float(np.max(np.abs(base_logits - float_logits))),
        "float_logit_scale": float(np.max(np.abs(float_logits))),
    }


def machine() -> dict[str, Any]:
    import jax
    import qwix

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "jax": jax.__version__, "qwix": qwix.__version__, "device": str(jax.devices()[0]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table and loss curves."""
    mb = lambda n: f"{n / 2**20:.2f}"  # noqa: E731
    args, cases = result["args"], result["cases"]
    lines = [f"# QMiSS: float vs quantized base, MiSS vs qwix QLoRA ({args['preset']}, {args['steps']} steps)", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['logical_cpus']} logical CPUs, "
             f"{result['machine']['device']}; jax {result['machine']['jax']}, qwix {result['machine']['qwix']}; "
             f"{result['machine']['date']}. Model: tunix Llama 3 {result['preset']['model']}, batch "
             f"{result['preset']['batch']} x {result['preset']['seq']}, Adam lr {args['lr']}, the same data order "
             "in every case.", "",
             "| case | trainable | weights MiB | XLA step MiB | peak RSS MiB | compile s | step ms (median) | "
             "loss first -> last | base logit error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        method = f"LoRA rank {c['lora_rank']}" if c["lora_rank"] else f"MiSS r={result['preset']['r']}"
        lines.append(f"| {c['case']} | {c['trainable']:,} ({method}) | {mb(c['weight_bytes'])} | "
                     f"{mb(c['step_peak_bytes'])} | {mb(c['peak_rss_bytes'])} | {c['compile_s']:.1f} | "
                     f"{1000 * c['step_s_median']:.1f} | {c['losses'][0]:.3f} -> {c['losses'][-1]:.3f} | "
                     f"{c['base_logit_error']:.2e} |")
    steps = len(cases[0]["losses"])
    shown = sorted({0, steps - 1, *range(0, steps, max(1, steps // 8))})
    lines += ["", "Loss at step:", "", "| case | " + " | ".join(str(s) for s in shown) + " |",
              "|---|" + "---|" * len(shown)]
    lines += [f"| {c['case']} | " + " | ".join(f"{c['losses'][s]:.3f}" for s in shown) + " |" for c in cases]
    lines += ["", "Weights: bytes of the model's arrays less the trainable ones (quantized kernels at their storage "
              "dtype). XLA step: arguments + outputs + temporaries of the compiled train step, less donated buffers. "
              "Peak RSS: the process's resident high-water mark while training (reset after building the model). "
              "Base logit error: max |quantized base - float base| on a probe batch (logit scale "
              f"{cases[0]['float_logit_scale']:.2f}).", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> bool:
    """The loss curves as a PNG, where matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in result["cases"]:
        ax.plot(c["losses"], label=c["case"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # a child process: one case
    parser.add_argument("--case-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.case:
        with open(args.case_out, "w", encoding="utf-8") as f:
            json.dump(run_case(args.case, preset, args.steps, args.lr), f)
        return 0
    cases = []
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]  # one CPU device, all its threads
    env = {**os.environ, "XLA_FLAGS": " ".join(flags)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            out = os.path.join(tmp, "case.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--steps", str(args.steps),
                   "--lr", str(args.lr), "--case", name, "--case-out", out]
            print(f"{name} ...", flush=True)
            subprocess.run(cmd, check=True, env=env)
            with open(out, encoding="utf-8") as f:
                cases.append(json.load(f))
            c = cases[-1]
            print(f"  trainable {c['trainable']:,}, step {1000 * c['step_s_median']:.1f} ms, XLA step "
                  f"{c['step_peak_bytes'] / 2**20:.1f} MiB, loss {c['losses'][0]:.3f} -> {c['losses'][-1]:.3f}",
                  flush=True)
    result = {"args": vars(args) | {"case": None, "case_out": None}, "preset": dataclasses.asdict(preset),
              "machine": machine(), "cases": cases}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "qmiss.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "qmiss.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result))
    plot(result, os.path.join(args.out, "qmiss.png"))
    print(f"wrote {os.path.join(args.out, 'qmiss.json')} and qmiss.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
