"""Export a MiSS adapter as a PEFT LoRA adapter (what vLLM and other LoRA-only servers load).

A LoRA layer adds `x @ A.T @ B.T * (alpha / r)`, with `lora_A` `(k, in)` and `lora_B` `(out, k)`
for every layer type (for GPT-2's `Conv1D` PEFT sets `fan_in_fan_out=True` but the factors keep
these shapes). Every export here uses `alpha = rank`, so the scaling is 1.

* balance / mini are exact at rank `r`: the fold of the input over `r` shards is the linear map
  `lora_A[j, i] = 1 if i % r == j` (built as `ops.fold_input` of the identity) and `lora_B = D.T`
  (`D` the `(r, out)` balance block, a mini block tiled by `ops.expand_mini`). This is PEFT 0.21's
  own conversion (`peft.tuners.lora.conversion._convert_miss_module_to_lora`).
* bat depends on the base weight: the delta `bat_kernel(W, B) - W` is factored by a truncated SVD
  at the rank asked for (default: full rank, exact); the relative Frobenius error is reported.
  A balance/mini adapter asked for a rank below `r` is truncated the same way.

The other tensors of the folder (`modules_to_save` copies, trained biases) have the same keys in
both formats and come from `interop.peft_io`; `bias="MiSS_only"` becomes LoRA's `"lora_only"`.
`miss_dropout` becomes `lora_dropout` (both drop the layer input of the adapter path; bat has none).

>>> # tensors, config, report = lora_state_dict(peft_model, "default", rank=None)
>>> # report = save_lora(peft_model, "out-lora/")   # then peft.PeftModel.from_pretrained(torch_model, "out-lora/")
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from miss_jax import ops
from miss_jax.linen import AdapterSpec, _get, block_of, effective_block
from miss_jax.targeting import Layer

from . import names, peft_io

_BIAS = {"none": "none", "all": "all", "MiSS_only": "lora_only"}
# adapter_config.json fields a MiSS adapter passes on to its LoRA export unchanged
_SHARED_FIELDS = (
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
)


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One exported layer: its torch module path, the MiSS variant, the LoRA rank, the error."""

    key: str
    variant: str
    rank: int
    rel_error: float  # ||delta - B @ A||_F / ||delta||_F (0.0 when the factors are exact)
    delta_norm: float  # ||delta||_F


@dataclasses.dataclass(frozen=True)
class LoraReport:
    """What an export did, layer by layer."""

    adapter_name: str
    layers: tuple[LayerReport, ...]

    @property
    def max_rel_error(self) -> float:
        """The worst layer's relative Frobenius error."""
        return max((layer.rel_error for layer in self.layers), default=0.0)

    @property
    def rel_error(self) -> float:
        """Relative Frobenius error over all layers together: sqrt(sum err^2) / sqrt(sum ||delta||^2)."""
        total = sum(layer.delta_norm**2 for layer in self.layers)
        err = sum((layer.rel_error * layer.delta_norm) ** 2 for layer in self.layers)
        return float(np.sqrt(err / total)) if total else 0.0

    def summary(self) -> str:
        ranks = sorted({layer.rank for layer in self.layers})
        return (
            f"LoRA export of adapter {self.adapter_name!r}: {len(self.layers)} layers, rank "
            f"{'/'.join(map(str, ranks))}, relative Frobenius error {self.rel_error:.3e} "
            f"(worst layer {self.max_rel_error:.3e})"
        )


def _svd_factors(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncated SVD of `delta` `(out, in)`: `A` `(rank, in)`, `B` `(out, rank)` with `B @ A` the best rank-k fit."""
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    return vt[:rank], u[:, :rank] * s[:rank]


def _rel_error(delta: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    norm = float(np.linalg.norm(delta))
    err = float(np.linalg.norm(delta.astype(np.float64) - b.astype(np.float64) @ a.astype(np.float64)))
    return (err / norm if norm else 0.0), norm


def layer_factors(
    spec: AdapterSpec, layer: Layer, block: Any, kernel: Optional[Any] = None, rank: Optional[int] = None
) -> tuple[np.ndarray, np.ndarray, LayerReport]:
    """LoRA factors of one MiSS layer: `lora_A` `(k, in)`, `lora_B` `(out, k)` (float32) and a report.

    `spec` is the adapter (its variant); `block` the layer's `miss_block` (balance `(r, out)`, mini
    `(r, mini_r)`, bat `(out // r, r, r)`); `kernel` the layer's base kernel in `layer.layout` (bat
    only). `rank=None` means exact (balance/mini: `r`; bat: full rank `min(in, out)`); a rank above
    the exact one is capped at it.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0):
        raise ValueError(f"The LoRA rank must be a positive integer (or None for exact), got {rank!r}.")
    in_f, out_f = layer.in_features, layer.out_features
    if spec.variant == "bat":
        if kernel is None:
            raise ValueError(f"Exporting the bat layer {layer.key} needs its base kernel.")
        k32 = jnp.asarray(kernel, jnp.float32)
        delta = np.asarray(ops.to_torch(ops.bat_kernel(k32, block, layer.layout) - k32, layer.layout))
        k = min(rank or min(in_f, out_f), min(in_f, out_f))
        a, b = _svd_factors(delta, k)
    else:
        d = effective_block(spec, layer, jnp.asarray(block))
        r = d.shape[0]
        if rank is None or rank >= r:
            a = np.asarray(ops.fold_input(jnp.eye(in_f, dtype=jnp.float32), r)).T  # (r, in): 1 where i % r == j
            b = np.asarray(d, np.float32).T  # (out, r)
            # exact: B @ A is the delta; ||delta||_F^2 = sum_j (#inputs folded onto j) * ||D[j]||^2
            norm = float(np.sqrt(np.sum(a.sum(axis=1, dtype=np.float64) * np.sum(np.square(b, dtype=np.float64), 0))))
            return a, b, LayerReport(layer.key, spec.variant, r, 0.0, norm)
        k = int(rank)
        delta = np.asarray(ops.balance_delta(d.astype(jnp.float32), in_f, "torch"))
        a, b = _svd_factors(delta, k)
    err, norm = _rel_error(delta, a, b)
    return a.astype(np.float32), b.astype(np.float32), LayerReport(layer.key, spec.variant, int(k), err, norm)


def lora_config_dict(peft_model: Any, adapter_name: str, reports: tuple[LayerReport, ...]) -> dict[str, Any]:
    """The LoRA `adapter_config.json` object of an export: `lora_alpha = r` (scaling 1), and layers whose
    rank differs from the most common one listed in `rank_pattern` / `alpha_pattern` (as PEFT's own
    conversion does)."""
    miss = peft_io.adapter_config_dict(peft_model, adapter_name)
    config = peft_model.peft_config[adapter_name]
    r = collections.Counter(rep.rank for rep in reports).most_common(1)[0][0]
    pattern = {rep.key: rep.rank for rep in reports if rep.rank != r}
    layers = peft_model._specs[adapter_name].layers
    return {
        **{k: miss[k] for k in _SHARED_FIELDS},
        "peft_type": "LORA",
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "lora_dropout": 0.0 if config.variant == "bat" else config.miss_dropout,
        # GPT-2's Conv1D stores (in, out); PEFT's LoRA needs fan_in_fan_out=True for it
        "fan_in_fan_out": any(layer.layout == "torch" for layer in layers),
        "bias": _BIAS[config.bias],
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "layer_replication": None,
    }


def lora_state_dict(
    peft_model: Any, adapter_name: str = "default", rank: Optional[int] = None, progress: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any], LoraReport]:
    """The LoRA export of adapter `adapter_name`: (tensors by PEFT key, adapter_config.json object, report).

    Keys: `base_model.model.<torch path>.lora_A.weight` `(k, in)` and `.lora_B.weight` `(out, k)`
    (float32), plus the adapter's `modules_to_save` copies and trained biases under their MiSS keys.
    `rank`: see `layer_factors`. The adapter must not be merged (the export is relative to the base weights).
    """
    from tqdm.auto import tqdm

    peft_model._check_name(adapter_name)
    if peft_model.merged_adapters:
        raise ValueError(
            f"Adapters {peft_model.merged_adapters} are merged into the base weights; call unmerge_adapter() before "
            "exporting to LoRA (the export is relative to the unmerged base weights)."
        )
    spec = peft_model._specs[adapter_name]
    tensors = {k: np.asarray(v) for k, v in peft_io.get_peft_model_state_dict(peft_model, adapter_name).items()}
    reports = []
    for layer in tqdm(spec.layers, desc=f"LoRA export ({spec.variant})", disable=not progress, leave=False):
        kernel = _get(peft_model.params, layer.path)["kernel"] if spec.variant == "bat" else None
        block = block_of(peft_model.adapter_params, adapter_name, layer)
        a, b, report = layer_factors(spec, layer, block, kernel, rank)
        del tensors[names.adapter_key(layer.path, names.BLOCK)]
        tensors[names.adapter_key(layer.path, "lora_A", "weight")] = a
        tensors[names.adapter_key(layer.path, "lora_B", "weight")] = b
        reports.append(report)
    report = LoraReport(adapter_name, tuple(reports))
    return tensors, lora_config_dict(peft_model, adapter_name, report.layers), report


def save_lora(
    peft_model: Any,
    save_directory: str,
    adapter_name: str = "default",
    rank: Optional[int] = None,
    progress: bool = False,
) -> LoraReport:
    """Writes adapter `adapter_name` as a PEFT LoRA folder (written beside it, then renamed into place).

    `peft.PeftModel.from_pretrained(torch_model, save_directory)` (or vLLM) loads it. Returns the
    report of the export (per-layer rank and relative Frobenius error; 0 for exact layers).
    """
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file.")
    tensors, config, report = lora_state_dict(peft_model, adapter_name, rank, progress)
    peft_io.write_folders(save_directory, {"": (config, tensors)})
    return report
