"""Combines the two sides' results: ratios (JAX/PyTorch, MiSS/base), the targets, a markdown table.

Ratios are computed from the medians (`*_median`) and, as a check against noise from other processes
on the machine, from the minima (`*_min`).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

import specs

# issue targets (CPU), checked on every model that has the case: name -> (ratio key, ratio, bound)
TARGETS = {
    "MiSS train step vs PEFT (balance)": ("train/balance", "jax_over_torch", 1.0),
    "MiSS forward / base forward (balance)": ("forward/balance", "jax_miss_over_base", 1.10),
    "merged forward / base forward": ("forward/merged", "jax_miss_over_base", 1.05),
    "merge_and_unload / jitted kernel copy (balance)": ("merge_and_unload/balance", "jax_over_copy", 2.0),
    # generate with the adapter unmerged at >= 0.9x the merged model's tokens/s: time ratio <= 1 / 0.9
    "generate unmerged / merged (balance; time)": ("generate/balance", "jax_miss_over_base", 1.111),
    "long: step time vs PEFT": ("long/balance", "jax_over_torch", 1.0),
    "long: peak RSS vs PEFT": ("long/balance", "peak_rss_jax_over_torch", 1.0),
    "long, checkpointing: step time vs PEFT's": ("long/balance+remat", "jax_over_torch", 1.0),
    "long, checkpointing: peak RSS vs PEFT's": ("long/balance+remat", "peak_rss_jax_over_torch", 1.0),
}


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as JSON to a temporary name beside `path`, then renames it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    """Writes `text` to a temporary name beside `path`, then renames it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a is not None and b else None


GROUPS = ("forward", "train", "generate", "long", "create", "merge_and_unload")


def _cases(model: dict[str, Any]) -> list[tuple[str, str]]:
    """(group, case) pairs in table order: groups in `GROUPS` order, cases as measured."""
    out = [(g, c) for g in GROUPS for c in model.get(g, {})]
    return out + ([("copy_kernels", "")] if "copy_kernels" in model else [])


def _entry(side: Optional[dict[str, Any]], group: str, case: str) -> Optional[dict[str, float]]:
    if side is None:
        return None
    return side.get(group) if group == "copy_kernels" else side.get(group, {}).get(case)


def ratios(jax_model: Optional[dict[str, Any]], torch_model: Optional[dict[str, Any]]) -> dict[str, dict]:
    """Per case `group/case`: JAX/PyTorch, and within each side MiSS/base (forward: over the base
    forward; train: over full fine-tuning), merge over the kernel copy; each from medians and minima."""
    out: dict[str, dict] = {}
    ref_model = jax_model or torch_model or {}
    for group, case in _cases(ref_model):
        key = group if group == "copy_kernels" else f"{group}/{case}"
        r: dict[str, Any] = {}
        for stat in ("median", "min"):
            j, t = _entry(jax_model, group, case), _entry(torch_model, group, case)
            get = lambda e: e.get(f"{stat}_s") if e else None  # noqa: E731
            r[f"jax_over_torch_{stat}"] = _div(get(j), get(t))
            base = {"forward": "base", "train": "full", "generate": "merged"}.get(group)
            if base and case != base:
                for name, side in (("jax", jax_model), ("torch", torch_model)):
                    r[f"{name}_miss_over_base_{stat}"] = _div(get(_entry(side, group, case)),
                                                              get(_entry(side, group, base)))
            if group == "merge_and_unload":
                for name, side in (("jax", jax_model), ("torch", torch_model)):
                    r[f"{name}_over_copy_{stat}"] = _div(get(_entry(side, group, case)),
                                                         get(_entry(side, "copy_kernels", "")))
        j, t = _entry(jax_model, group, case), _entry(torch_model, group, case)
        r["peak_rss_jax_over_torch"] = _div(j and j.get("peak_rss_mb"), t and t.get("peak_rss_mb"))
        out[key] = r
    return out


def flop_ratios(jax_model: Optional[dict[str, Any]], key: str = "flops") -> dict[str, Optional[float]]:
    """Per MiSS forward `forward/<variant>`: the FLOP count over the base forward's, the ratio that the
    adapter's extra arithmetic alone would give (a floor for MiSS/base without a dense delta). `key`:
    "flops" (XLA's cost analysis; CPU) or "matmul_flops" (the lowered program's matmuls; any platform)."""
    flops = (jax_model or {}).get(key) or {}
    return {f"forward/{v}": _div(f, flops.get("base")) for v, f in flops.items() if v != "base"}


def targets(model_ratios: dict[str, dict], flops: Optional[dict[str, Optional[float]]] = None,
            matmul_flops: Optional[dict[str, Optional[float]]] = None) -> dict[str, dict]:
    """The issue's targets checked on one model's ratios (from medians); forward targets also carry
    `flop_ratio` and `matmul_flop_ratio` (see `flop_ratios`)."""
    out = {}
    for name, (key, ratio, bound) in TARGETS.items():
        if key not in model_ratios:  # a case this model does not run (e.g. generate for a classifier)
            continue
        r = model_ratios.get(key, {})
        value = r.get(f"{ratio}_median", r.get(ratio))
        out[name] = {"ratio": value, "bound": bound, "met": None if value is None else value <= bound,
                     "flop_ratio": (flops or {}).get(key), "matmul_flop_ratio": (matmul_flops or {}).get(key)}
    return out


def _ms(e: Optional[dict[str, Any]]) -> str:
    if e and "failed" in e:
        return e["failed"]
    return "-" if not e else f"{1e3 * e['median_s']:.1f}"


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def _flags_note(model: dict) -> str:
    """' Case X ran with XLA_FLAGS=...' for the cases whose JAX process got extra XLA flags."""
    long = (model.get("jax") or {}).get("long", {})
    flagged = [(name, case["xla_flags"]) for name, case in long.items() if case.get("xla_flags")]
    return "".join(f" `{name}` (JAX) ran with `XLA_FLAGS={flags}`." for name, flags in flagged)


def _memory(e: Optional[dict[str, Any]]) -> str:
    """A case's memory for the table: its device memory where measured (`device_mb`), else peak RSS."""
    if not e or "failed" in e:
        return "-"
    return str(e.get("device_mb", e.get("peak_rss_mb", "-")))


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def model_markdown(name: str, model: dict[str, Any]) -> str:
    """One model's section: median times, JAX/PyTorch, MiSS/base in each framework, memory, targets."""
    jm, tm = model.get("jax"), model.get("torch")
    spec = model["spec"]
    gpu = any("device_mb" in (e or {}) for side in (jm, tm) for g in GROUPS for e in (side or {}).get(g, {}).values())
    lines = [f"## {name} (batch {spec['batch']} x seq {spec['seq']}; targets {', '.join(spec['targets'])})", "",
             f"same weights: max |logits_jax - logits_torch| = {model.get('same_weights_max_abs_diff')}", "",
             "| case | JAX ms | PyTorch ms | JAX/PyTorch | JAX/PyTorch (min) | JAX MiSS/base | "
             f"PyTorch MiSS/base | JAX {'device' if gpu else 'peak'} MiB | PyTorch {'device' if gpu else 'peak'} MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for group, case in _cases(jm or tm or {}):
        key = group if group == "copy_kernels" else f"{group}/{case}"
        r = model["ratios"].get(key, {})
        j, t = _entry(jm, group, case), _entry(tm, group, case)
        lines.append(
            f"| {key} | {_ms(j)} | {_ms(t)} | {_num(r.get('jax_over_torch_median'))} | "
            f"{_num(r.get('jax_over_torch_min'))} | "
            f"{_num(r.get('jax_miss_over_base_median', r.get('jax_over_copy_median')))} | "
            f"{_num(r.get('torch_miss_over_base_median', r.get('torch_over_copy_median')))} | "
            f"{_memory(j)} | {_memory(t)} |")
    lines += ["", "MiSS/base: forward over the base forward, train over full fine-tuning, generate (unmerged) "
              "over the merged model's generate, merge_and_unload over copy_kernels (a copy of the same "
              "kernels). long: a balance train step at length; `balance` uses flash attention (cuDNN on a GPU, "
              "blockwise on CPU) and the chunked loss (JAX) or sdpa (PyTorch), `+remat` adds per-layer "
              "gradient checkpointing, `balance/plain` is JAX without any long-sequence feature. `/bf16`: base "
              "weights and activations bfloat16, adapter and optimizer state float32 (PyTorch: autocast)."
              + (" Device MiB: the memory one step needs (JAX: the compiled program's arguments, temporaries "
                 "and non-donated outputs; PyTorch: the tensors the step starts with plus its peak allocation "
                 "above them)." if gpu else "") + _flags_note(model), ""]
    if model.get("targets"):
        lines += ["| target | ratio | bound | met | XLA FLOP ratio | matmul FLOP ratio |", "|---|---:|---:|---|---:|---:|"]
        for tname, tv in model["targets"].items():
            lines.append(f"| {tname} | {_num(tv['ratio'])} | {tv['bound']} | {tv['met']} | "
                         f"{_fmt(tv.get('flop_ratio'))} | {_fmt(tv.get('matmul_flop_ratio'))} |")
        lines += ["", "FLOP ratios: the compiled MiSS forward over the base forward's, by XLA's cost analysis (CPU) "
                  "and by the lowered program's matmuls (any platform): the cost of the adapter's arithmetic alone.", ""]
    return "\n".join(lines) + "\n"


def markdown(result: dict[str, Any]) -> str:
    """The run's header, then one section per model (`model_markdown`)."""
    meta = result["meta"]
    lines = [f"# miss-jax vs PEFT {meta['versions'].get('peft', '')} benchmark", "",
             f"device: {meta['device']}; CPU: {meta.get('cpu', {}).get('model', '?')} "
             f"({', '.join(meta.get('cpu', {}).get('vector_extensions', [])) or 'no vector extensions listed'}); "
             f"threads: {meta['threads']}; r={meta['r']}, mini_r={meta['mini_r']}; "
             f"median of {meta['repeats']} runs after {meta['warmup']} warm-up; load average at start/end: "
             f"{meta['loadavg_start']} / {meta['loadavg_end']}.", ""]
    if meta.get("problems"):
        lines += ["Not measured: " + "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in meta["problems"].items()), ""]
    return "\n".join(lines) + "\n" + "".join(model_markdown(n, m) for n, m in result["models"].items())
