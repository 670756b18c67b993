"""Which layers MiSS can adapt in NNX, and how their kernels map to a linear layer's `(in, out)`.

MiSS adapts a linear map `y = x W^T` with torch weight `W` `(out, in)`. An NNX layer qualifies when
its kernel is such a map with its axes split in two groups: a `KernelRule` names the kernel
variable, the kernel axes that are `in` and those that are `out`, and the bias variable. The
rule's axis order is the contract with PEFT's torch layout:

* the layer's input ends with the `in` axes' sizes, in the order `in_axes` lists them, and its output
  ends with the `out` axes' sizes in the order `out_axes` lists them;
* those axes flatten row-major, in that order, to torch's `in` and `out`: the torch weight is
  `kernel.transpose(in_axes + out_axes).reshape(in, out).T`.

So tunix's `q_proj` (`einsum 'BTD,DNH->BTNH'`, kernel `(d_model, heads, head_dim)`) has `in_axes=(0,)`,
`out_axes=(1, 2)`: it is torch's `q_proj.weight` `(heads*head_dim, d_model)`, heads major, exactly as
the torch model orders it; tunix's `o_proj` (`'BTNH,NHD->BTD'`) has `in_axes=(0, 1)`, `out_axes=(2,)`.

Built-in rules: `nnx.Linear` (`(in, out)`), `nnx.LinearGeneral` (contracting the input's trailing
axes, no `batch_axis`), `nnx.Einsum`, and a Linen `nn.Dense` / `nn.DenseGeneral` wrapped by
`nnx.bridge.ToNNX` (same rules). The Linen transform adapts `nn.DenseGeneral` through the same rule
(`dense_general_rule`), so both paths flatten a kernel to torch's weight one way. Einsum-style modules
of other libraries are declared with `register(cls, rule)`; `einsum_rule` derives a rule from an
einsum string.

>>> rule = einsum_rule("BTD,DNH->BTNH", kernel="w")
>>> rule.in_axes, rule.out_axes, rule.sizes((8, 2, 4))
((0,), (1, 2), (8, 8))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class KernelRule:
    """How a layer's kernel is a linear map: its variable names and which kernel axes are `in` / `out`.

    Attributes:
      kernel: the attribute holding the kernel variable (`"kernel"`, tunix's `"w"`).
      in_axes: kernel axes contracted with the input's trailing axes, in the input's order.
      out_axes: kernel axes that make the output's trailing axes, in the output's order.
      bias: the attribute holding the bias (shaped like the `out` axes), or None.
    """

    kernel: str = "kernel"
    in_axes: tuple[int, ...] = (0,)
    out_axes: tuple[int, ...] = (1,)
    bias: Optional[str] = "bias"

    def check(self, shape: tuple[int, ...], where: str) -> None:
        """ValueError naming `where` unless `in_axes + out_axes` lists every axis of a kernel of `shape` once."""
        axes = self.in_axes + self.out_axes
        if not self.in_axes or not self.out_axes or sorted(axes) != list(range(len(shape))):
            raise ValueError(
                f"The layer rule for {where} says in_axes={self.in_axes}, out_axes={self.out_axes}, which do not "
                f"split its {self.kernel!r} of shape {tuple(shape)} (every axis must be in exactly one of them). "
                "Fix the rule passed to miss_jax.layer_rules.register."
            )

    def in_dims(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[a] for a in self.in_axes)

    def out_dims(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[a] for a in self.out_axes)

    def sizes(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """`(in_features, out_features)` of a kernel of `shape`."""
        return math.prod(self.in_dims(shape)), math.prod(self.out_dims(shape))

    def to_matrix(self, kernel: jax.Array) -> jax.Array:
        """The kernel as a flax-layout matrix `(in, out)` (its transpose is the torch weight)."""
        return jnp.transpose(kernel, self.in_axes + self.out_axes).reshape(self.sizes(kernel.shape))

    def from_matrix(self, matrix: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """`to_matrix`'s inverse: an `(in, out)` matrix back to a kernel of `shape`."""
        order = self.in_axes + self.out_axes
        stacked = matrix.reshape(self.in_dims(shape) + self.out_dims(shape))
        return jnp.transpose(stacked, tuple(order.index(a) for a in range(len(shape))))

    def flatten_input(self, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """The layer's input `(..., *in_dims)` as `(..., in)`."""
        n = len(self.in_axes)
        return x.reshape(*x.shape[: x.ndim - n], self.sizes(shape)[0])

    def unflatten_output(self, y: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """An `(..., out)` output as the layer's `(..., *out_dims)`."""
        return y.reshape(*y.shape[:-1], *self.out_dims(shape))


RuleFn = Callable[[nnx.Module], KernelRule]
_RULES: dict[type, RuleFn] = {}


def register(module_type: type, rule: Union[KernelRule, RuleFn]) -> None:
    """Declares how `module_type`'s layers are linear maps: a `KernelRule`, or a function of the layer that
    returns one (for rules that depend on the layer, e.g. `lambda m: einsum_rule(m.einsum_str, "w")`).
    Subclasses follow their closest registered base class."""
    _RULES[module_type] = rule if callable(rule) else (lambda module, rule=rule: rule)


def einsum_rule(einsum_str: str, kernel: str = "kernel", bias: Optional[str] = "bias") -> KernelRule:
    """The rule of a layer computing `jnp.einsum(einsum_str, x, kernel)`.

    Kernel letters found in the input are `in`, those found in the output are `out`. The input must end
    with the `in` letters and the output with the `out` letters (`'BTD,DNH->BTNH'`); a kernel letter in
    both (a batched kernel, e.g. MoE experts) or in neither is not a linear map of the input's last axes.
    """
    spec = einsum_str.replace(" ", "")
    try:
        operands, out = spec.split("->")
        x, k = operands.split(",")
    except ValueError:
        raise ValueError(f"{einsum_str!r} is not an einsum of an input and a kernel ('x,k->y').") from None
    x, out = x.replace("...", ""), out.replace("...", "")
    odd = [c for c in k if (c in x) == (c in out)]
    ins = [c for c in x if c in k]
    outs = [c for c in out if c in k]
    if odd or not ins or not outs or not x.endswith("".join(ins)) or not out.endswith("".join(outs)):
        raise ValueError(
            f"einsum {einsum_str!r} is not a linear map of its input's last axes: MiSS needs every kernel axis "
            "either contracted with the input's trailing axes or making the output's trailing axes"
            + (f" (kernel axes {odd} are batched or summed)" if odd else "")
            + ". Adapt another layer, or register a KernelRule for it."
        )
    return KernelRule(kernel, tuple(k.index(c) for c in ins), tuple(k.index(c) for c in outs), bias)


def _linear_general(module: nnx.LinearGeneral) -> KernelRule:
    n_in, n_out = len(module.in_features), len(module.out_features)
    if module.batch_axis or tuple(module.axis) != tuple(range(-n_in, 0)):
        raise ValueError(
            f"nnx.LinearGeneral with axis={module.axis}, batch_axis={dict(module.batch_axis)}: MiSS adapts those that "
            f"contract the input's last axes in order (axis={tuple(range(-n_in, 0))}) with no batch_axis."
        )
    return KernelRule("kernel", tuple(range(n_in)), tuple(range(n_in, n_in + n_out)), "bias")


def dense_general_rule(module: nn.DenseGeneral, input_ndim: Optional[int] = None) -> KernelRule:
    """The rule of a Linen `nn.DenseGeneral`: kernel `(*in_dims, *features)`, in axes first, out axes last.

    MiSS adapts those that contract the input's last axes in order (`axis=(-n, ..., -1)`; with
    `input_ndim`, non-negative axes are read against an input of that many axes) and have no
    `batch_dims`; ValueError naming the fix otherwise. The Linen transform and `nnx.bridge.ToNNX` use it.

    >>> dense_general_rule(nn.DenseGeneral(features=8, axis=(-2, -1)))
    KernelRule(kernel='kernel', in_axes=(0, 1), out_axes=(2,), bias='bias')
    """
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    if input_ndim is not None:
        axis = tuple(a % input_ndim - input_ndim for a in axis)
    n_in = len(axis)
    n_out = len(module.features) if isinstance(module.features, tuple) else 1
    if module.batch_dims or tuple(axis) != tuple(range(-n_in, 0)):
        raise ValueError(
            f"nn.DenseGeneral with axis={module.axis}, batch_dims={module.batch_dims}: MiSS adapts DenseGeneral "
            f"layers that contract the input's last axes in order (axis={tuple(range(-n_in, 0))}) with no "
            "batch_dims (a batched kernel is not one linear map). Leave this layer out of target_modules."
        )
    return KernelRule("kernel", tuple(range(n_in)), tuple(range(n_in, n_in + n_out)), "bias")


def _bridged(module: nnx.bridge.ToNNX) -> KernelRule:
    linen = module.module
    if isinstance(linen, nn.Dense):
        return KernelRule()
    if isinstance(linen, nn.DenseGeneral):
        return dense_general_rule(linen)
    raise ValueError(
        f"This nnx.bridge.ToNNX wraps a Linen {type(linen).__name__}: MiSS adapts bridged nn.Dense and "
        "nn.DenseGeneral (contracting the input's last axes, no batch_dims)."
    )


register(nnx.Linear, KernelRule())
register(nnx.LinearGeneral, _linear_general)
register(nnx.Einsum, lambda module: einsum_rule(module.einsum_str))
register(nnx.bridge.ToNNX, _bridged)


def has_rule(module: nnx.Module) -> bool:
    """Whether a rule is registered for `module`'s class (or a base class)."""
    return any(t in _RULES for t in type(module).__mro__)


def rule_for(module: nnx.Module, where: str) -> KernelRule:
    """The rule of `module` (at graph key `where`), checked against its kernel's shape.

    ValueError naming the layer and the fix for a class with no rule, a rule that does not fit the layer,
    or a rule whose axes do not split the kernel.
    """
    rule_fn = next((_RULES[t] for t in type(module).__mro__ if t in _RULES), None)
    if rule_fn is None:
        raise ValueError(
            f"{where} is a {type(module).__name__}, which has no layer rule: MiSS does not know which axes of its "
            "kernel are in and out. Declare them with miss_jax.layer_rules.register("
            f"{type(module).__name__}, KernelRule(kernel=..., in_axes=..., out_axes=...)) (or einsum_rule(...))."
        )
    try:
        rule = rule_fn(module)
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{where}: {e}") from None
    variable = getattr(module, rule.kernel, None)
    if not isinstance(variable, nnx.Variable):
        raise ValueError(
            f"The layer rule for {where} ({type(module).__name__}) names the kernel {rule.kernel!r}, but the layer "
            "has no such variable. Fix the rule's `kernel`."
        )
    rule.check(variable.shape, f"{where} ({type(module).__name__})")
    return rule
