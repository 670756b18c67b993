"""A quantized frozen base for MiSS on NNX models (QMiSS): qwix quantizes the base layers' kernels, the MiSS
blocks stay float32 and train, and for export the kernels are dequantized and the adapters merged in float.

This is the QLoRA pattern with MiSS adapters. `quantize(model, "int8")` (or `"int4"`, `"nf4"`, ...; `QTYPES`)
turns every targeted layer (default `"all-linear"`: every layer with a layer rule but the output head, as PEFT's
`all-linear`) into a quantized layer in place: its kernel variable holds qwix's quantized values
(`QuantizedKernel`, not an `nnx.Param`: no optimizer or gradient filter sees it) beside a per-output-channel scale
(`kernel_scale`), quantized by `qwix.quantize` exactly as qwix's own PTQ quantizes a weight (symmetric absmax,
one scale per output channel, or per block of `tile_size` along the last input axis). The layer keeps its class's
own forward, run on the dequantized kernel inside `jax.checkpoint` (nothing saved), so training keeps only the
quantized kernel between the forward and backward passes, as QLoRA recomputes its 4-bit weights.

MiSS then adapts the quantized model as any NNX model (`miss_jax.nnx.get_peft_model`): the adapted layer's base
matmul uses the quantized kernel, the block adds its float32 term, `peft_model.trainable` trains the blocks only,
and a PEFT folder (`interop.nnx_io.save_pretrained`) holds the adapter only: PyTorch PEFT loads it on the float
twin. Merging into a quantized kernel is refused (it would re-quantize the merged weight), and so is the bat
variant (its forward needs the float kernel); `merge_for_export` dequantizes the kernels, merges in float and
reports the errors.

    >>> from flax import nnx
    >>> from miss_jax import MissConfig
    >>> from miss_jax.nnx import get_peft_model
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.up_proj = nnx.Linear(64, 32, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.up_proj(x)
    >>> model = quantize(MLP(nnx.Rngs(0)), "int8")
    >>> type(model.up_proj).__name__, model.up_proj.kernel.get_value().dtype
    ('QuantizedLinear', dtype('int8'))
    >>> peft_model = get_peft_model(model, MissConfig(r=4, target_modules=["up_proj"]))
    >>> peft_model.get_nb_trainable_parameters()[0]      # the (r, out) block; the int8 kernel is not a Param
    128

Needs qwix (`pip install 'miss-jax[tunix]'`, Python >= 3.12).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar, Union

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from .config import MissConfig
from .layer_rules import KernelRule, rule_for
from .nnx import MissLinear, MissNnxModel, key_of, miss_layers, select_layers

M = TypeVar("M", bound=nnx.Module)

# qwix's weight quantization types offered here: name -> qwix's qtype (nf4 is stored as uint4 bucket indices).
QTYPES: dict[str, Any] = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4", "float8_e4m3fn": jnp.float8_e4m3fn}


class QuantizedKernel(nnx.Variable):
    """A quantized kernel's stored parts (qwix's `QArray` fields `qvalue` and `scale`): frozen, not an `nnx.Param`."""


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How kernels are quantized: qwix's weight type `qtype` (a `QTYPES` name), symmetric absmax, one scale per
    output channel, or per block of `tile_size` entries along the layer's last input axis (qwix's rule
    `tile_size`: subchannel quantization, as QLoRA's blocks). ValueError naming the valid types otherwise."""

    qtype: str = "int8"
    tile_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.qtype not in QTYPES:
            raise ValueError(f"qwix has no weight quantization type {self.qtype!r} here; use one of "
                             f"{', '.join(map(repr, QTYPES))}.")
        if self.tile_size is not None and (not isinstance(self.tile_size, int) or self.tile_size < 1):
            raise ValueError(f"tile_size must be a positive int (a block along the last input axis) or None (one "
                             f"scale per output channel), not {self.tile_size!r}.")

    def axes(self, rule: KernelRule, shape: tuple[int, ...], where: str) -> tuple[tuple[int, ...], dict[int, int]]:
        """`(channelwise_axes, tiled_axes)` of `qwix.quantize` for a kernel of `shape` under `rule` (qwix's PTQ
        choice: every output axis channelwise, the last input axis tiled); ValueError naming `where` if
        `tile_size` does not divide that axis."""
        tiled = {} if self.tile_size is None else {rule.in_axes[-1]: self.tile_size}
        for axis, size in tiled.items():
            if shape[axis] % size:
                raise ValueError(f"{where}: tile_size {size} does not divide its last input axis ({shape[axis]}); "
                                 "pick a tile_size that divides every targeted layer's, or None.")
        return tuple(sorted(rule.out_axes)), tiled

    def quantize(self, kernel: jax.Array, rule: KernelRule, where: str = "this layer") -> qwix.QArray:
        """`kernel` (float, the layer's own shape) as qwix's `QArray`."""
        channelwise, tiled = self.axes(rule, kernel.shape, where)
        return qwix.quantize(kernel, QTYPES[self.qtype], channelwise_axes=channelwise, tiled_axes=tiled,
                             calibration_method="absmax")


class QuantizedLayer(nnx.Module):
    """The mixin of quantized layers: `quantized_class(cls)` is `cls` with this forward (a `QuantizedLinear` is an
    `nnx.Linear`, so it keeps its layer rule, attributes and bias).

    The layer's kernel variable (its rule's `kernel`) is a `QuantizedKernel` holding qwix's quantized values, of
    the kernel's shape; `kernel_scale` (a `QuantizedKernel`) holds the scales (shape: 1 on the input axes but the
    tiled one, which has `in // tile_size`); `quantization` says how, `kernel_type` what the kernel variable was
    (`nnx.Param`); the class attribute `float_class` is `cls`.
    """

    def kernel_rule(self) -> KernelRule:
        """The float class's layer rule."""
        return rule_for(self, type(self).__name__)

    def qarray(self) -> qwix.QArray:
        """The kernel as qwix's `QArray`."""
        qvalue = getattr(self, self.kernel_rule().kernel).get_value()
        return qwix.QArray(qvalue, self.kernel_scale.get_value(), None, QTYPES[self.quantization.qtype])

    def dequantized_kernel(self) -> jax.Array:
        """The kernel the layer computes with `(layer's kernel shape)`, in the scale's dtype (the float kernel's)."""
        return qwix.dequantize(self.qarray())

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """The float layer's own forward on the dequantized kernel; only the quantized kernel is kept for the
        backward pass (the dequantization is recomputed there)."""
        graphdef, state = nnx.split(self)
        name = self.kernel_rule().kernel
        qtype = QTYPES[self.quantization.qtype]
        float_call = self.float_class.__call__

        def forward(values: dict[str, Any], x: jax.Array) -> jax.Array:
            kernel = qwix.dequantize(qwix.QArray(values[name], values["kernel_scale"], None, qtype))
            view = nnx.merge(graphdef, {**values, name: kernel})
            return float_call(view, x, *args, **kwargs)

        policy = jax.checkpoint_policies.nothing_saveable
        return jax.checkpoint(forward, policy=policy)(nnx.to_pure_dict(state), x)

    def miss_refusal(self, action: str) -> Optional[str]:
        """Why MiSS cannot `action` on this base ("merge", or a new adapter's variant), or None."""
        what = f"this layer's kernel is quantized ({self.quantization.qtype}, miss_jax.quantized)"
        if action == "merge":
            return (f"Cannot merge: {what}; merging would re-quantize the merged weight. Use "
                    "miss_jax.quantized.merge_for_export(peft_model, forward) (dequantizes, then merges in float), or "
                    "miss_jax.quantized.dequantize(model) first.")
        if action == "bat":
            return (f"Cannot add a bat adapter: {what}, and bat transforms the kernel itself in every forward "
                    "(W' = W + W B + B). Use balance or mini (init_weights=True or 'mini'), or "
                    "miss_jax.quantized.dequantize(model) first.")
        return None


@functools.cache
def quantized_class(cls: type) -> type:
    """The quantized twin of layer class `cls` (one per class): `QuantizedLayer`'s forward, then `cls`."""
    return type("Quantized" + cls.__name__, (QuantizedLayer, cls), {"float_class": cls, "__module__": __name__})


def _nodes(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every module by layer key, with a `MissLinear`'s base layer under the `MissLinear`'s key (and nothing from
    inside a `MissLinear`)."""
    modules = {path: node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}
    wrappers = [path for path, node in modules.items() if isinstance(node, MissLinear)]
    return {key_of(path): node.base_layer if isinstance(node, MissLinear) else node
            for path, node in modules.items() if not any(path[: len(w)] == w and len(path) > len(w) for w in wrappers)}


def quantize(
    model: M,
    qtype: Union[str, Quantization] = "int8",
    target_modules: Union[str, Sequence[str]] = "all-linear",
    tile_size: Optional[int] = None,
) -> M:
    """Quantizes the kernels of the layers `target_modules` names (PEFT's matching rules, as `MissConfig`'s; the
    default `"all-linear"` is every layer with a layer rule but the output head), in place; returns `model`.

    `qtype` is a `QTYPES` name (or a `Quantization`, which then carries `tile_size`). Layers already quantized are
    left as they are. ValueError, changing nothing, for a type qwix lacks (naming the valid ones), a target that
    matches no layer, a `tile_size` that does not divide a layer's last input axis, or an adapted layer with
    merged adapters.
    """
    if isinstance(qtype, Quantization) and tile_size is not None:
        raise ValueError("Pass tile_size inside the Quantization (Quantization(qtype, tile_size)), not beside it.")
    quantization = qtype if isinstance(qtype, Quantization) else Quantization(qtype, tile_size)
    _, layers = select_layers(model, MissConfig(target_modules=target_modules))
    nodes = _nodes(model)
    adapted = miss_layers(model)
    merged = [layer.key for layer in layers if layer.key in adapted and adapted[layer.key].merged]
    if merged:
        raise ValueError(f"{merged} have merged adapters; unmerge them (peft_model.unmerge_adapter()) before quantizing.")
    plans = []
    for layer in layers:
        node = nodes[layer.key]
        if isinstance(node, QuantizedLayer):
            continue
        rule = rule_for(node, layer.key)
        kernel = getattr(node, rule.kernel)
        quantization.axes(rule, kernel.shape, layer.key)  # a tile that does not fit: refused before any change
        plans.append((node, rule, kernel))
    for node, rule, kernel in plans:
        qarray = quantization.quantize(kernel.get_value(), rule)
        setattr(node, rule.kernel, QuantizedKernel(qarray.qvalue, **kernel.get_metadata()))
        node.kernel_scale = QuantizedKernel(qarray.scale)
        node.quantization = quantization
        node.kernel_type = type(kernel)
        object.__setattr__(node, "__class__", quantized_class(type(node)))
    return model


def quantized_layers(model: nnx.Module) -> dict[str, QuantizedLayer]:
    """The model's quantized layers by layer key (an adapted one under its `MissLinear`'s key)."""
    return {k: node for k, node in _nodes(model).items() if isinstance(node, QuantizedLayer)}


def dequantize(model: M) -> M:
    """Turns every quantized layer back into its float class, with the dequantized kernel as its `nnx.Param`
    (what it computed with), in place; returns `model`. Adapters are untouched (merge them in float next)."""
    for node in quantized_layers(model).values():
        name = node.kernel_rule().kernel
        kernel = getattr(node, name)
        value = node.dequantized_kernel()
        metadata = kernel.get_metadata()
        float_class, kernel_type = node.float_class, node.kernel_type
        del node.kernel_scale, node.quantization, node.kernel_type
        setattr(node, name, kernel_type(value, **metadata))
        object.__setattr__(node, "__class__", float_class)
    return model


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What `merge_for_export` measured on the probe `forward` (max absolute differences of its outputs):

    Attributes:
      merge_error: the merged float model vs the quantized base with the adapters unmerged.
      quantization_error: the quantized base vs `float_model` (both without adapters), or None without one.
      layers: how many layers were dequantized.
    """

    merge_error: float
    quantization_error: Optional[float]
    layers: int


def merge_for_export(
    peft_model: MissNnxModel,
    forward: Callable[[nnx.Module], Any],
    float_model: Optional[nnx.Module] = None,
    safe_merge: bool = True,
) -> tuple[nnx.Module, ExportReport]:
    """Dequantizes the kernels, merges the active adapters in float and unwraps them (in place, as
    `merge_and_unload`); returns the plain float model and an `ExportReport`.

    `forward(model)` runs a model on probe inputs (e.g. `lambda m: interop.nnx_check.causal_logits(m, ids)`);
    `float_model` is the base before quantization, if at hand, to report what quantization costs.
    """
    unmerged = np.asarray(forward(peft_model), np.float64)
    quantization_error = None
    if float_model is not None:
        with peft_model.disable_adapter():
            base = np.asarray(forward(peft_model), np.float64)
        quantization_error = float(np.max(np.abs(base - np.asarray(forward(float_model), np.float64))))
    layers = len(quantized_layers(peft_model.base_model))
    dequantize(peft_model.base_model)
    merged_model = peft_model.merge_and_unload(safe_merge=safe_merge)
    merge_error = float(np.max(np.abs(np.asarray(forward(merged_model), np.float64) - unmerged)))
    return merged_model, ExportReport(merge_error, quantization_error, layers)
