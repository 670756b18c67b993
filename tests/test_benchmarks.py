"""The benchmark end to end on tiny shapes (one warm-up, one timed run, both sides), and its CLI checks.

No timing assertions: the run must produce every field, for both frameworks, from one invocation.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
MEASURE_FIELDS = ("median_s", "min_s", "cpu_s", "first_s", "transient_mb", "peak_rss_mb")


def _bench_module(name: str) -> Any:
    """Imports `benchmarks/<name>.py` (the scripts import each other by plain name)."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    key = f"benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(BENCH, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One `run.py --quick` (both models, both sides) under the suite's 8-device XLA_FLAGS."""
    out = str(tmp_path_factory.mktemp("bench") / "quick.json")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--quick", "--out", out],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f), out


def _check_measure(entry: dict[str, float], where: str, repeated: bool = True) -> None:
    for field in MEASURE_FIELDS:
        value = entry.get(field)
        assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (where, field, value)
    assert entry["min_s"] <= entry["median_s"], where
    assert entry["peak_rss_mb"] > 0, where
    if repeated:  # cases timed in rounds also report the memory they hold
        assert isinstance(entry.get("static_mb"), (int, float)) and math.isfinite(entry["static_mb"]), where


@pytest.mark.slow
def test_every_case_is_measured_on_both_sides(quick_run: tuple[dict[str, Any], str]) -> None:
    specs = _bench_module("specs")
    result, _ = quick_run
    assert set(result["models"]) == {"bert", "llama", "llama-long"}
    models = dict(result["models"])
    long = models.pop("llama-long")
    for case in specs.LONG_CASES:  # PyTorch has no twin of JAX's plain case (no long-sequence features)
        for side in ("jax", "torch") if case != "balance/plain" else ("jax",):
            _check_measure(long[side]["long"][case], f"llama-long/{side}/long/{case}")
    for side in ("jax", "torch"):
        numbers = result["models"]["llama"][side]
        for case in specs.GENERATE_CASES:
            _check_measure(numbers["generate"][case], f"llama/{side}/generate/{case}")
        assert "generate" not in result["models"]["bert"][side]  # a classifier does not generate
    for name, model in models.items():
        for side in ("jax", "torch"):
            numbers = model[side]
            for case in specs.FORWARD_CASES:
                _check_measure(numbers["forward"][case], f"{name}/{side}/forward/{case}")
            for case in specs.TRAIN_CASES:
                _check_measure(numbers["train"][case], f"{name}/{side}/train/{case}")
            for group in ("create", "merge_and_unload"):
                for case in specs.VARIANTS:
                    _check_measure(numbers[group][case], f"{name}/{side}/{group}/{case}", repeated=False)
            _check_measure(numbers["copy_kernels"], f"{name}/{side}/copy_kernels", repeated=False)
            assert set(numbers["trainable_params"]) == set(specs.VARIANTS)
        # Same r and targets on both sides: PEFT and miss_jax train the same number of parameters.
        assert model["jax"]["trainable_params"] == model["torch"]["trainable_params"]


@pytest.mark.slow
def test_same_weights_and_one_device_without_recompiles(quick_run: tuple[dict[str, Any], str]) -> None:
    result, _ = quick_run
    meta = result["meta"]
    assert "xla_force_host_platform_device_count" not in meta["xla_flags"]
    assert meta["jax_device_count"] == 1
    assert meta["cpus"]["jax"] == meta["cpus"]["torch"] and len(meta["cpus"]["jax"]) == meta["threads"]
    assert meta["cpu"]["model"] and isinstance(meta["cpu"]["vector_extensions"], list)
    for name, model in result["models"].items():
        assert model["same_weights_max_abs_diff"] < 1e-4, name
        # Every jitted forward and train step compiled once for its shape, however often it ran.
        assert model["jax"]["compiles"] and all(n == 1 for n in model["jax"]["compiles"].values()), name


@pytest.mark.slow
def test_train_steps_skip_frozen_kernels_and_donate(quick_run: tuple[dict[str, Any], str]) -> None:
    result, _ = quick_run
    for name, model in result["models"].items():
        if "train" not in model["jax"]:  # the long-sequence model runs its own cases
            continue
        train = model["jax"]["train"]
        for case in ("balance", "mini", "full"):
            hlo = train[case]["hlo"]
            assert hlo["donated_buffers"] == hlo["state_buffers"] > 0, (name, case, hlo)
        # The detector finds weight gradients where they exist (full fine-tuning), and MiSS has none.
        assert train["full"]["hlo"]["kernel_grad_dots"] > 0, name
        assert train["balance"]["hlo"]["kernel_grad_dots"] == train["mini"]["hlo"]["kernel_grad_dots"] == 0, name


@pytest.mark.slow
def test_ratios_and_table_follow_the_numbers(quick_run: tuple[dict[str, Any], str]) -> None:
    result, out = quick_run
    models = dict(result["models"])
    long = models.pop("llama-long")
    for case in ("balance", "balance+remat"):
        r = long["ratios"][f"long/{case}"]
        assert r["jax_over_torch_median"] == round(long["jax"]["long"][case]["median_s"] /
                                                   long["torch"]["long"][case]["median_s"], 3)
    assert all(t["ratio"] is not None for n, t in long["targets"].items() if n.startswith("long"))
    for name, model in models.items():
        jm, tm, ratios = model["jax"], model["torch"], model["ratios"]
        for group in ("forward", "train", "merge_and_unload"):
            cases = jm[group]
            for case in cases:
                r = ratios[f"{group}/{case}"]
                assert r["jax_over_torch_median"] == round(cases[case]["median_s"] / tm[group][case]["median_s"], 3)
        base = jm["forward"]["base"]["median_s"]
        assert ratios["forward/balance"]["jax_miss_over_base_median"] == round(
            jm["forward"]["balance"]["median_s"] / base, 3)
        measured = [t for n, t in model["targets"].items() if not n.startswith("long")
                    and (name == "llama" or not n.startswith("generate"))]
        assert measured and all(t["ratio"] is not None for t in measured), name
        # XLA's FLOP counts: every MiSS forward does more arithmetic than the base forward.
        flops = jm["flops"]
        for variant in ("balance", "mini", "bat"):
            assert flops[variant] > flops["base"] > 0, (name, flops)
            assert model["flop_ratios"][f"forward/{variant}"] == round(flops[variant] / flops["base"], 3)
        assert model["targets"]["MiSS forward / base forward (balance)"]["flop_ratio"] == model["flop_ratios"][
            "forward/balance"]
    table = open(os.path.splitext(out)[0] + ".md").read()
    for row in ("forward/base", "train/full", "create/bat", "merge_and_unload/balance", "copy_kernels",
                "generate/balance", "long/balance+remat", "long/balance/plain"):
        assert f"| {row} |" in table


def test_bad_options_name_the_problem() -> None:
    run = _bench_module("run")
    with pytest.raises(ValueError, match="unknown \\['gpt9'\\]"):
        run.build_settings(run.parse_args(["--models", "bert,gpt9"]), "/tmp/unused")
    with pytest.raises(ValueError, match="--threads 999"):
        run.build_settings(run.parse_args(["--threads", "999"]), "/tmp/unused")
    with pytest.raises(ValueError, match="--sides"):
        run.main(["--sides", "jax,tf"])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["forward/balance", "train/bat"])
def test_profile_case_writes_trace_program_and_dot_table(tmp_path: Any, case: str) -> None:
    env = dict(os.environ, XLA_FLAGS="")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "profile_case.py"), "--model", "llama", "--case", case,
                           "--quick", "--repeats", "2", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stem = tmp_path / f"llama-{case.replace('/', '-')}"
    result = json.loads((tmp_path / f"{stem.name}.json").read_text())
    text = (tmp_path / f"{stem.name}.hlo.txt").read_text()
    assert result["case"] == case and result["median_s"] > 0 and result["xla_flops"] > 0
    assert any(files for _, _, files in os.walk(tmp_path / "trace")), "no profiler trace written"
    hlo = _bench_module("hlo")
    assert [d["name"] for d in result["dots"]] == [d["name"] for d in sorted(hlo.dots(text), key=lambda d: -d["flops"])]
    assert abs(sum(d["share"] for d in result["dots"]) - 1) < 1e-3
    adapter = [d for d in result["dots"] if any(r.endswith("miss_block") for r in d["reads"])]
    assert result["dot_flops_reading_adapter_blocks"] == sum(d["flops"] for d in adapter)
    if case == "forward/balance":  # the fused form (>= ops.FUSED_MIN_ROWS rows): each of the 7 adapted layers is one
        assert not adapter         # dot with its adapted kernel, built in the program: no dot reads a block or kernel
        assert not any(r.endswith("q_proj/kernel") for d in result["dots"] for r in d["reads"])
    else:  # bat's backward contracts with its blocks
        assert adapter


def test_dot_table_reads_shapes_flops_and_params() -> None:
    hlo = _bench_module("hlo")
    text = """HloModule m, entry_computation_layout={(f32[4,3]{1,0}, f32[3,5]{1,0})->f32[4,5]{1,0}}

ENTRY %main (p__layer____kernel__.1: f32[3,5], x.2: f32[4,3]) -> f32[4,5] {
  %x.2 = f32[4,3]{1,0} parameter(1)
  %p__layer____kernel__.1 = f32[3,5]{1,0} parameter(0)
  %neg = f32[4,3]{1,0} negate(%x.2)
  ROOT %dot.7 = f32[4,5]{1,0} dot(%neg, %p__layer____kernel__.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
    (dot,) = hlo.dots(text)
    assert dot == {"name": "dot.7", "out": [4, 5], "lhs": [4, 3], "rhs": [3, 5], "contracted": 3,
                   "flops": 2 * 4 * 5 * 3, "reads": ["p/layer/kernel"]}
    # A dot producing a (3, 5) gradient from 4 tokens, not reading a program input, is a kernel gradient.
    grad = text.replace("dot(%neg, %p__layer____kernel__.1), lhs_contracting_dims={1}", "dot(%neg, %neg2), "
                        "lhs_contracting_dims={0}").replace("%dot.7 = f32[4,5]", "%dot.7 = f32[3,5]")
    grad = grad.replace("  ROOT", "  %neg2 = f32[4,5]{1,0} negate(%x.2)\n  ROOT")
    assert hlo.train_step_facts(grad, {(3, 5)}, 4)["kernel_grad_dots"] == 1
    assert hlo.train_step_facts(text, {(3, 5)}, 4)["kernel_grad_dots"] == 0
    # No dot instruction at all (GPU programs call cuBLAS): the count is unknown, not zero.
    no_dot = text.replace(" dot(%neg, %p__layer____kernel__.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
                          ' custom-call(%neg, %p__layer____kernel__.1), custom_call_target="__cublas$gemm"')
    assert hlo.dots(no_dot) == [] and hlo.train_step_facts(no_dot, {(3, 5)}, 4)["kernel_grad_dots"] is None


def test_attention_benchmark_writes_every_case(tmp_path: Any) -> None:
    out = tmp_path / "attention.json"
    env = dict(os.environ, XLA_FLAGS="")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "attention.py"), "--batch", "1", "--seq", "32",
                           "--heads", "2", "--head-dim", "8", "--block-size", "8", "--repeats", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert list(result["cases"]) == ["jax/transformers", "jax/blockwise", "torch/sdpa"]
    for name, case in result["cases"].items():
        assert case["median_s"] > 0 and case["min_s"] <= case["median_s"] and case["minor_faults"] >= 0, name
    assert result["cases"]["jax/blockwise"]["temp_mb"] >= 0 and result["meta"]["seq"] == 32
    assert "| jax/blockwise |" in (tmp_path / "attention.md").read_text()


# --------------------------------------------------------------------------- the GPU suite, dry-run on CPU


@pytest.fixture(scope="module")
def gpu_dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """`run.py --device gpu --quick`: the GPU suite's code paths (bf16 cases, flash attention, long cases in
    process order, per-model saves) on tiny shapes, on whatever device this machine has."""
    out = str(tmp_path_factory.mktemp("gpu") / "gpu.json")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--device", "gpu", "--quick", "--out", out],
                          cwd=ROOT, env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f), out


@pytest.mark.slow
def test_gpu_suite_dry_run_measures_every_named_case_on_both_sides(gpu_dry_run: tuple[dict[str, Any], str]) -> None:
    specs = _bench_module("specs")
    result, out = gpu_dry_run
    table = specs.gpu_specs(8, 2048, 4, 8192, quick=True)
    assert list(result["models"]) == list(table) == ["llama-1b-long", "smollm2", "llama-1b"]
    assert not result["meta"]["problems"]
    for name, spec in table.items():
        model = result["models"][name]
        assert model["same_weights_max_abs_diff"] < 1e-4, name
        for side in ("jax", "torch"):
            for case in spec.cases:
                group, _, rest = case.partition("/")
                _check_measure(model[side][group][rest], f"{name}/{side}/{case}",
                               repeated=group not in ("create", "merge_and_unload"))
        if spec.suite == "long":  # flash attention: blockwise on CPU, cuDNN on a GPU
            assert all(c["attention"] == "flash" for c in model["jax"]["long"].values())
    text = open(os.path.splitext(out)[0] + ".md").read()
    for row in ("long/balance/bf16", "long/balance+remat/bf16", "train/balance/bf16", "generate/balance"):
        assert f"| {row} |" in text


def test_a_run_past_its_deadline_still_writes_what_it_has(tmp_path: Any) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--device", "gpu", "--quick", "--models",
                           "smollm2", "--deadline", "0.5", "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    problems = result["meta"]["problems"]
    assert problems and all(k.startswith("smollm2/") for k in problems)
    assert "stopped at the deadline" in " ".join(problems.values()) or "past the deadline" in " ".join(problems.values())
    assert "Not measured: smollm2/" in (tmp_path / "gpu.md").read_text()


def test_matmul_flops_count_every_dot_of_a_lowered_program() -> None:
    import jax
    import jax.numpy as jnp

    hlo = _bench_module("hlo")

    def f(x: Any, w: Any, v: Any) -> Any:
        inner = jax.checkpoint(lambda y: jnp.einsum("btd,de->bte", y, w))  # a dot inside a called computation
        return inner(x).sum(-1, keepdims=True) @ v

    lowered = jax.jit(f).lower(jnp.ones((2, 3, 4)), jnp.ones((4, 7)), jnp.ones((1, 5)))
    assert hlo.matmul_flops(lowered.as_text(dialect="hlo")) == 2 * (2 * 3 * 7) * 4 + 2 * (2 * 3 * 5) * 1
    assert hlo.program_memory_mb(lowered.compile()) >= 0


def test_gpu_cases_option_sets_each_models_cases() -> None:
    run = _bench_module("run")
    settings = run.build_settings(run.parse_args(["--device", "gpu", "--quick", "--cases",
                                                  "train/balance,long/balance/bf16"]), "/tmp/unused")
    cases = {s.name: s.cases for s in settings.models}
    assert cases == {"llama-1b-long": ("long/balance/bf16",), "smollm2": ("train/balance",),
                     "llama-1b": ("train/balance",)}
    with pytest.raises(ValueError, match="--device gpu"):
        run.build_settings(run.parse_args(["--device", "gpu", "--models", "bert"]), "/tmp/unused")
