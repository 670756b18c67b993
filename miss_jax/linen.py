"""The Linen transform: MiSS on the Dense / DenseGeneral layers of any Linen model, without editing its code.

Two mechanisms, both thin users of `ops` (docs/DESIGN.md §3):
  * additive adapters (balance / mini) add `fold_input(x) @ D` to a layer's output through a
    `flax.linen.intercept_methods` interceptor keyed by the layer's scope path (the efficient form);
  * the other variants (bat), `modules_to_save` copies and trained biases are overlaid on the params
    the model is applied with (bat builds the adapted kernel; gradients reach `B` through it).

State is functional: `params` is the base model's param tree (untouched), `adapter_params` the adapter
pytree of `miss_jax.adapters`, and a `Plan` (static, hashable) says which adapters are applied.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

import flax.linen as nn
import jax

from . import adapters, ops, tree
from .adapters import AdapterSpec, Plan
from .tree import Path

PyTree = Any


# --------------------------------------------------------------------------- the forward


def overlay(plan: Plan, params: Mapping, adapter_params: Mapping) -> dict:
    """The params the model runs with: trained biases, the `saved` adapters' module copies (disjoint), and
    the kernels of non-additive (bat) adapters, transformed in activation order, over the base `params`."""
    flat = tree.flatten(params)
    flat.update(tree.flatten(adapter_params.get(adapters.BIAS, {})))
    for name in plan.saved:
        flat.update(tree.flatten(adapter_params.get(adapters.MODULES_TO_SAVE, {}).get(name, {})))
    for name in plan.active:
        spec = plan.spec(name)
        if spec.variant.additive:
            continue
        for layer in spec.layers:
            k = layer.path + ("kernel",)
            block = adapters.block(adapter_params, name, layer)
            flat[k] = layer.kernel(spec.variant.merge(layer.matrix(flat[k]), block, layer.layout))
    return tree.unflatten(flat)


def additive_terms(plan: Plan, adapter_params: Mapping) -> dict[Path, list[tuple[AdapterSpec, jax.Array]]]:
    """For each layer path, the (spec, `(r, out)` block) pairs of the applied additive adapters (`out` is
    the layer's flattened `out_features`)."""
    terms: dict[Path, list[tuple[AdapterSpec, jax.Array]]] = {}
    for name in plan.active:
        spec = plan.spec(name)
        if not spec.variant.additive:
            continue
        for layer in spec.layers:
            block = spec.variant.effective_block(adapters.block(adapter_params, name, layer), layer.out_features)
            terms.setdefault(layer.path, []).append((spec, block))
    return terms


@contextlib.contextmanager
def intercept(plan: Plan, adapter_params: Mapping, deterministic: bool = True) -> Iterator[None]:
    """Within this context, every Linen call of an adapted layer adds its balance/mini terms.

    Dropout (`miss_dropout`) applies to the layer input on the adapter path only, in training only,
    with the `"dropout"` rng stream the caller passed to `apply`. A layer contracting several input axes
    (`nn.DenseGeneral`) gets its term on its input flattened to `(..., in)`, unflattened to its output axes.
    """
    terms = additive_terms(plan, adapter_params)
    layers = {layer.path: layer for n in plan.active for layer in plan.spec(n).layers}
    # Layers with a 2-D kernel whose (bat-adapted) kernel the forward differentiates run on a 2-D view of
    # their input: the kernel gradient is then a plain (T, in)^T @ (T, out) matmul, where for 3-D operands
    # XLA:CPU first transposes copies of both. (A DenseGeneral's `axis` may count from the input's front.)
    flat_input = {
        layer.path for n in plan.active if not plan.spec(n).variant.additive
        for layer in plan.spec(n).layers if layer.rule is None
    }

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.method_name != "__call__" or not args:
            return next_fun(*args, **kwargs)
        x = args[0]
        if context.module.path in flat_input and x.ndim > 2:
            out = next_fun(x.reshape(-1, x.shape[-1]), *args[1:], **kwargs)
            out = out.reshape(*x.shape[:-1], out.shape[-1])
        else:
            out = next_fun(*args, **kwargs)
        entries = terms.get(context.module.path)
        if not entries:
            return out
        layer = layers[context.module.path]
        if deterministic or not any(spec.config.miss_dropout for spec, _ in entries):
            fused = fused_dense(context.module, x, tuple(block for _, block in entries))
            if fused is not None:
                return fused
        delta = None
        for spec, block in entries:
            rate = 0.0 if deterministic else spec.config.miss_dropout
            xi = ops.dropout(x, rate, context.module.make_rng("dropout") if rate else None)
            term = ops.balance_output(layer.flatten_input(xi), block)
            delta = term if delta is None else delta + term
        return (out.astype(delta.dtype) + layer.unflatten_output(delta)).astype(out.dtype)

    with nn.intercept_methods(interceptor):
        yield


def fused_dense(module: nn.Module, x: jax.Array, blocks: tuple[jax.Array, ...]) -> Optional[jax.Array]:
    """A plain `nn.Dense`'s call with its balance terms as one `ops.adapted_matmul` (same dtype promotion,
    precision and bias as `nn.Dense`), `(..., in)` -> `(..., out)`; None where that form does not apply
    (another layer class, a custom `dot_general`, or `ops.fuses` says no)."""
    if type(module) is not nn.Dense or module.dot_general is not None or module.dot_general_cls is not None:
        return None
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    if kernel is None:  # not yet initialised
        return None
    x, kernel, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
    if not ops.fuses(math.prod(x.shape[:-1]), [x.dtype, kernel.dtype, *(b.dtype for b in blocks)]):
        return None
    y = ops.adapted_matmul(x, kernel, blocks, module.precision)
    return y if bias is None else y + bias


def apply(
    plan: Plan,
    call: Callable[..., Any],
    params: Mapping,
    adapter_params: Mapping,
    *args: Any,
    deterministic: bool = True,
    **kwargs: Any,
) -> Any:
    """Runs `call(effective_params, *args, **kwargs)` with the plan's adapters applied.

    `call` is the model's own apply, e.g. `lambda p, *a, **k: hf_model(*a, params=p, **k)` or
    `lambda p, *a, **k: module.apply({"params": p}, *a, **k)`. `deterministic=False` turns on
    `miss_dropout` (Flax's convention). Pure and jit-able; differentiate with respect to `adapter_params`.
    """
    with intercept(plan, adapter_params, deterministic):
        return call(overlay(plan, params, adapter_params), *args, **kwargs)


# --------------------------------------------------------------------------- merging


def merge_order(plan: Plan, names: tuple[str, ...]) -> tuple[str, ...]:
    """The order merging applies `names` in (`ops.composition_order`: bat first, then additive adapters).
    The unmerged forward composes them in the same order (the overlay builds the kernel, the interceptor
    adds to its output), so merged equals unmerged."""
    return ops.composition_order({n: plan.spec(n).config.variant for n in names}, names)


def merge(
    plan: Plan, params: Mapping, adapter_params: Mapping, names: tuple[str, ...], sign: int = 1
) -> dict:
    """Params with adapters `names` merged in (`sign=1`, in `merge_order`) or taken out (`sign=-1`).

    Unmerging undoes the same `merge_order` last-first (bat exactly, through the inverse), so the
    `names` that merged also unmerge. Float32 maths, cast back to each kernel's dtype.
    """
    flat = tree.flatten(params)
    order = merge_order(plan, names)
    order = order if sign > 0 else order[::-1]
    for spec in (plan.spec(n) for n in order):
        fn = spec.variant.merge if sign > 0 else spec.variant.unmerge
        for layer in spec.layers:
            k = layer.path + ("kernel",)
            block = adapters.block(adapter_params, spec.name, layer)
            flat[k] = layer.kernel(fn(layer.matrix(flat[k]), block, layer.layout))
    return tree.unflatten(flat)


def check_mergeable(plan: Plan, adapter_params: Mapping, names: tuple[str, ...]) -> None:
    """`safe_merge`'s check before merging: every block of `names` is finite, and unmerging it later would
    give the base kernel back (bat: `I + B` well conditioned). ValueError naming the adapter and layer."""
    for name in names:
        spec = plan.spec(name)
        for layer in spec.layers:
            block = adapters.block(adapter_params, name, layer)
            problem = None if ops.is_finite(block) else "its miss_block holds NaN or inf"
            problem = problem or spec.variant.unmerge_problem(block)
            if problem:
                raise ValueError(
                    f"Adapter {name!r} cannot be merged safely at {layer.key}: {problem}. The model was left "
                    "unmerged; fix or retrain the adapter, or use it unmerged."
                )


def check_finite(params: Mapping, plan: Plan, names: tuple[str, ...], action: str = "merging") -> None:
    """Raises if a kernel of the layers of `names` holds NaN or inf after `action` (the caller keeps the
    model as it was): `safe_merge`'s check after merging, and every unmerge's."""
    for layer in {layer.path: layer for n in names for layer in plan.spec(n).layers}.values():
        if not ops.is_finite(tree.get(params, layer.path)["kernel"]):
            owners = [n for n in names if layer in plan.spec(n).layers]
            raise ValueError(
                f"NaNs or infs detected in the weights of {layer.key} after {action} adapters {owners}; the model "
                "was left as it was."
            )
