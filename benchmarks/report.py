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


def _cases(model: dict[str, Any]) -> list[tuple[str, str]]:
    """(group, case) pairs in table order."""
    out = [("forward", c) for c in specs.FORWARD_CASES] + [("train", c) for c in specs.TRAIN_CASES]
    out += [("generate", c) for c in specs.GENERATE_CASES] + [("long", c) for c in specs.LONG_CASES]
    out += [(g, v) for g in ("create", "merge_and_unload") for v in specs.VARIANTS]
    return [(g, c) for g, c in out if c in model.get(g, {})] + ([("copy_kernels", "")] if "copy_kernels" in model else [])


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


def flop_ratios(jax_model: Optional[dict[str, Any]]) -> dict[str, Optional[float]]:
    """Per MiSS forward `forward/<variant>`: XLA's FLOP count over the base forward's, the ratio that
    the adapter's extra arithmetic alone would give (a floor for MiSS/base without a dense delta)."""
    flops = (jax_model or {}).get("flops") or {}
    return {f"forward/{v}": _div(f, flops.get("base")) for v, f in flops.items() if v != "base"}


def targets(model_ratios: dict[str, dict], flops: Optional[dict[str, Optional[float]]] = None) -> dict[str, dict]:
    """The issue's targets checked on one model's ratios (from medians); forward targets also carry
    `flop_ratio` (see `flop_ratios`)."""
    out = {}
    for name, (key, ratio, bound) in TARGETS.items():
        if key not in model_ratios:  # a case this model does not run (e.g. generate for a classifier)
            continue
        r = model_ratios.get(key, {})
        value = r.get(f"{ratio}_median", r.get(ratio))
        out[name] = {"ratio": value, "bound": bound, "met": None if value is None else value <= bound,
                     "flop_ratio": (flops or {}).get(key)}
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


def markdown(result: dict[str, Any]) -> str:
    """One table per model: median times, JAX/PyTorch, MiSS/base in each framework, peak memory."""
    meta = result["meta"]
    lines = [f"# miss-jax vs PEFT {meta['versions'].get('peft', '')} benchmark", "",
             f"device: {meta['device']}; CPU: {meta.get('cpu', {}).get('model', '?')} "
             f"({', '.join(meta.get('cpu', {}).get('vector_extensions', [])) or 'no vector extensions listed'}); "
             f"threads: {meta['threads']}; r={meta['r']}, mini_r={meta['mini_r']}; "
             f"median of {meta['repeats']} runs after {meta['warmup']} warm-up; load average at start/end: "
             f"{meta['loadavg_start']} / {meta['loadavg_end']}.", ""]
    for name, model in result["models"].items():
        jm, tm = model.get("jax"), model.get("torch")
        spec = model["spec"]
        lines += [f"## {name} (batch {spec['batch']} x seq {spec['seq']}; targets {', '.join(spec['targets'])})", "",
                  f"same weights: max |logits_jax - logits_torch| = {model.get('same_weights_max_abs_diff')}", "",
                  "| case | JAX ms | PyTorch ms | JAX/PyTorch | JAX/PyTorch (min) | JAX MiSS/base | "
                  "PyTorch MiSS/base | JAX peak MiB | PyTorch peak MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for group, case in _cases(jm or tm):
            key = group if group == "copy_kernels" else f"{group}/{case}"
            r = model["ratios"][key]
            j, t = _entry(jm, group, case), _entry(tm, group, case)
            lines.append(
                f"| {key} | {_ms(j)} | {_ms(t)} | {_num(r.get('jax_over_torch_median'))} | "
                f"{_num(r.get('jax_over_torch_min'))} | "
                f"{_num(r.get('jax_miss_over_base_median', r.get('jax_over_copy_median')))} | "
                f"{_num(r.get('torch_miss_over_base_median', r.get('torch_over_copy_median')))} | "
                f"{j.get('peak_rss_mb', '-') if j else '-'} | {t.get('peak_rss_mb', '-') if t else '-'} |")
        lines += ["", "MiSS/base: forward over the base forward, train over full fine-tuning, generate (unmerged) "
                  "over the merged model's generate, merge_and_unload over copy_kernels (a copy of the same "
                  "kernels). long: a balance train step at length; `balance` uses blockwise attention and the "
                  "chunked loss (JAX) or sdpa (PyTorch), `+remat` adds per-layer gradient checkpointing, "
                  "`balance/plain` is JAX without any long-sequence feature." + _flags_note(model), ""]
        if model.get("targets"):
            lines += ["| target | ratio | bound | met | XLA FLOP ratio |", "|---|---:|---:|---|---:|"]
            for tname, tv in model["targets"].items():
                lines.append(f"| {tname} | {_num(tv['ratio'])} | {tv['bound']} | {tv['met']} | "
                             f"{'-' if tv.get('flop_ratio') is None else format(tv['flop_ratio'], '.3f')} |")
            lines += ["", "XLA FLOP ratio: floating-point operations of the compiled MiSS forward over the base "
                      "forward's (XLA's cost analysis), the cost of the adapter's arithmetic alone.", ""]
    return "\n".join(lines) + "\n"
