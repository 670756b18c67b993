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

The rank follows PEFT's `convert_to_lora`: an int is bat's SVD rank (at most `min(in, out)`); a float
in (0, 1] an energy threshold (each bat layer keeps the fewest singular values whose squares hold that
share of the total); balance/mini stay exact at `r` whatever the rank asked (their factors are exact
and already rank r, so nothing is gained by cutting them).

The other tensors of the folder (`modules_to_save` copies, trained biases) have the same keys in
both formats and come from `interop.state_dict`; `bias="MiSS_only"` becomes LoRA's `"lora_only"`.
`miss_dropout` becomes `lora_dropout` (both drop the layer input of the adapter path; bat has none).

>>> # tensors, config, report = lora_state_dict(peft_model, "default", rank=None)
>>> # report = save_lora(peft_model, "out-lora/")   # then peft.PeftModel.from_pretrained(torch_model, "out-lora/")
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import jax.numpy as jnp
import numpy as np

from miss_jax import adapters, tree
from miss_jax.adapters import AdapterSpec
from miss_jax.targeting import Layer
from miss_jax.ops import fold_input, to_torch

from . import folder_write, names
from .state_dict import MissModel, adapter_config_dict, get_peft_model_state_dict

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


def _rel_error(delta: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    norm = float(np.linalg.norm(delta))
    err = float(np.linalg.norm(delta.astype(np.float64) - b.astype(np.float64) @ a.astype(np.float64)))
    return (err / norm if norm else 0.0), norm


def check_rank(rank: Optional[Union[int, float]]) -> None:
    """ValueError unless `rank` is None (exact), a positive int, or a float in (0, 1] (PEFT's rules and messages)."""
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, (int, float, np.integer, np.floating)):
        raise ValueError(f"The LoRA rank must be an int, a float threshold in (0, 1], or None (exact); got {rank!r}.")
    if isinstance(rank, (float, np.floating)) and not 0 < rank <= 1:
        raise ValueError(
            f"If rank is a float, it is interpreted as a threshold. It must be between 0 and 1 but got {rank}."
        )
    if rank == 0:
        raise ValueError("Passing a rank of 0 doesn't make sense, please pass a valid value.")
    if rank < 0:
        raise ValueError(f"The LoRA rank must be positive, got {rank}.")


def energy_rank(singular_values: np.ndarray, threshold: float) -> int:
    """The fewest leading singular values whose squares hold at least `threshold` of the total (PEFT's
    `_find_cutoff_index`)."""
    energy = np.cumsum(np.square(singular_values.astype(np.float64)))
    return int(np.searchsorted(energy, threshold * energy[-1])) + 1


def layer_factors(
    spec: AdapterSpec, layer: Layer, block: Any, kernel: Optional[Any] = None,
    rank: Optional[Union[int, float]] = None,
) -> tuple[np.ndarray, np.ndarray, LayerReport]:
    """LoRA factors of one MiSS layer: `lora_A` `(k, in)`, `lora_B` `(out, k)` (float32) and a report.

    `spec` is the adapter (its variant); `block` the layer's `miss_block` (balance `(r, out)`, mini
    `(r, mini_r)`, bat `(out // r, r, r)`); `kernel` the layer's base kernel as the model holds it (bat
    only). `rank` as PEFT's `convert_to_lora` (see the module docstring); None is exact (bat at full
    rank `min(in, out)`).
    """
    check_rank(rank)
    in_f, out_f = layer.in_features, layer.out_features
    variant = spec.variant
    if variant.additive:
        d = variant.effective_block(jnp.asarray(block), out_f)
        a = np.asarray(fold_input(jnp.eye(in_f, dtype=jnp.float32), d.shape[0])).T  # (r, in): 1 where i % r == j
        b = np.asarray(d, np.float32).T  # (out, r)
        # exact: B @ A is the delta; ||delta||_F^2 = sum_j (#inputs folded onto j) * ||D[j]||^2
        norm = float(np.sqrt(np.sum(a.sum(axis=1, dtype=np.float64) * np.sum(np.square(b, dtype=np.float64), 0))))
        return a, b, LayerReport(layer.key, variant.name, d.shape[0], 0.0, norm)
    if kernel is None:
        raise ValueError(f"Exporting the {variant.name} layer {layer.key} needs its base kernel.")
    k32 = layer.matrix(jnp.asarray(kernel, jnp.float32))  # 2-D (a DenseGeneral's flattened (in, out))
    delta = np.asarray(to_torch(variant.merge(k32, block, layer.layout) - k32, layer.layout), np.float64)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    full = min(in_f, out_f)
    if rank is None:
        k = full
    elif isinstance(rank, (float, np.floating)):
        k = energy_rank(s, float(rank)) if s.any() else 1
    else:
        k = int(rank)
    if k > full:
        raise ValueError(
            f"The chosen rank {k} is larger than the weight shape ({full}) of {layer.key}, please choose a lower rank."
        )
    a, b = vt[:k], u[:, :k] * s[:k]
    err, norm = _rel_error(delta, a, b)
    return a.astype(np.float32), b.astype(np.float32), LayerReport(layer.key, variant.name, k, err, norm)


def lora_config_dict(peft_model: MissModel, adapter_name: str, reports: tuple[LayerReport, ...]) -> dict[str, Any]:
    """The LoRA `adapter_config.json` object of an export: `lora_alpha = r` (scaling 1), and layers whose
    rank differs from the most common one listed in `rank_pattern` / `alpha_pattern` (as PEFT's own
    conversion does)."""
    miss = adapter_config_dict(peft_model, adapter_name)
    config = peft_model.peft_config[adapter_name]
    r = collections.Counter(rep.rank for rep in reports).most_common(1)[0][0]
    pattern = {rep.key: rep.rank for rep in reports if rep.rank != r}
    layers = peft_model.plan.spec(adapter_name).layers
    return {
        **{k: miss[k] for k in _SHARED_FIELDS},
        "peft_type": "LORA",
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "lora_dropout": config.miss_dropout if peft_model.plan.spec(adapter_name).variant.additive else 0.0,
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
    peft_model: MissModel, adapter_name: str = "default", rank: Optional[Union[int, float]] = None,
    progress: bool = False, adapter_params: Optional[Mapping] = None, params: Optional[Mapping] = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any], LoraReport]:
    """The LoRA export of adapter `adapter_name`: (tensors by PEFT key, adapter_config.json object, report).

    Keys: `base_model.model.<torch path>.lora_A.weight` `(k, in)` and `.lora_B.weight` `(out, k)`
    (float32), plus the adapter's `modules_to_save` copies and trained biases under their MiSS keys.
    `rank`: see `layer_factors`. The adapter must not be merged (the export is relative to the base weights).
    `adapter_params` / `params` (default: the model's) are the trees to read, e.g. gathered from several hosts.
    """
    from tqdm.auto import tqdm

    spec = peft_model.plan.spec(adapter_name)
    if peft_model.merged_adapters:
        raise ValueError(
            f"Adapters {peft_model.merged_adapters} are merged into the base weights; call unmerge_adapter() before "
            "exporting to LoRA (the export is relative to the unmerged base weights)."
        )
    adapter_params = peft_model.adapter_params if adapter_params is None else adapter_params
    params = peft_model.params if params is None else params
    state = get_peft_model_state_dict(peft_model, adapter_name, adapter_params=adapter_params)
    tensors = {k: np.asarray(v) for k, v in state.items()}
    reports = []
    for layer in tqdm(spec.layers, desc=f"LoRA export ({spec.variant.name})", disable=not progress, leave=False):
        kernel = None if spec.variant.additive else tree.get(params, layer.path)["kernel"]
        block = adapters.block(adapter_params, adapter_name, layer)
        a, b, report = layer_factors(spec, layer, block, kernel, rank)
        del tensors[names.adapter_key(layer.path, names.BLOCK)]
        tensors[names.adapter_key(layer.path, "lora_A", "weight")] = a
        tensors[names.adapter_key(layer.path, "lora_B", "weight")] = b
        reports.append(report)
    report = LoraReport(adapter_name, tuple(reports))
    return tensors, lora_config_dict(peft_model, adapter_name, report.layers), report


def save_lora(
    peft_model: MissModel,
    save_directory: str,
    adapter_name: str = "default",
    rank: Optional[Union[int, float]] = None,
    progress: bool = False,
) -> LoraReport:
    """Writes adapter `adapter_name` as a PEFT LoRA folder (each file replaced atomically, see `interop.folder_write`).

    `peft.PeftModel.from_pretrained(torch_model, save_directory)` (or vLLM) loads it. Returns the
    report of the export (per-layer rank and relative Frobenius error; 0 for exact layers).
    """
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file.")
    tensors, config, report = lora_state_dict(peft_model, adapter_name, rank, progress)
    folder_write.write_adapter_folders(save_directory, {"": (config, tensors)})
    return report
