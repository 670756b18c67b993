"""Reading a compiled program's HLO text (stdlib only): its top-level instructions, and the facts the
benchmark and the profiler report from them.

Matmuls are read as `dot` instructions, which is how XLA:CPU runs them; XLA:GPU calls cuBLAS through
custom-calls instead, so on GPU `dots` finds none and `train_step_facts` reports no gradient count.
`matmul_flops` reads the program as lowered, before any backend rewrote it, so it counts the same matmuls
on every platform (XLA's cost analysis of a GPU program does not).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from typing import Any

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* ([\w\-]+)\((.*)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One instruction of the entry computation: `name = op(operands)` with output `dims`."""

    name: str
    dims: tuple[int, ...]
    op: str
    operands: tuple[str, ...]
    attributes: str

    def int_list(self, key: str) -> list[int]:
        """An attribute such as `lhs_contracting_dims={1}` as a list of ints ([] when absent)."""
        m = re.search(rf"{key}=\{{([\d,]*)\}}", self.attributes)
        return [int(d) for d in m[1].split(",") if d] if m else []


def entry_instructions(hlo: str) -> Iterator[Instruction]:
    """The array-valued instructions of the entry computation (tuple-valued ones are skipped)."""
    for line in hlo.split("ENTRY", 1)[-1].splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            args, _, rest = m[4].partition(")")
            yield Instruction(m[1], tuple(int(d) for d in m[2].split(",") if d), m[3],
                              tuple(re.findall(r"%([\w.\-]+)", args)), rest)


def param_path(name: str) -> str:
    """A parameter's HLO name as its argument's pytree path: `p__bert____pooler____dense____kernel__.1`
    -> `p/bert/pooler/dense/kernel`."""
    return re.sub(r"_{2,}", "/", re.sub(r"\.\d+$", "", name)).strip("/")


def xla_cost(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a compiled program (`jax.jit(f).lower(...).compile()`) as one dict: `flops`,
    `bytes accessed`, ... (empty when the backend gives none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(cost or {})


_ANY_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]\S* ([\w\-]+)\(([^)]*)\)(.*)")


def matmul_flops(lowered_hlo: str) -> int:
    """Floating-point operations of every `dot` in a lowered program's HLO text (`jax.jit(f).lower(...)
    .as_text(dialect="hlo")`, all computations): 2 x output elements x contracted size each. A program's
    matmul work, the same whatever backend later runs it."""
    shapes: dict[str, tuple[int, ...]] = {}
    flops = 0
    for line in lowered_hlo.splitlines():
        m = _ANY_INSTRUCTION.match(line)
        if not m:
            continue
        dims = tuple(int(d) for d in m[2].split(",") if d)
        shapes[m[1]] = dims
        if m[3] != "dot":
            continue
        lhs = shapes.get(m[4].split(",")[0].strip().lstrip("%"), ())
        contracted_dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", m[5])
        contracted = math.prod(lhs[int(d)] for d in (contracted_dims[1].split(",") if contracted_dims else []) if d)
        flops += 2 * math.prod(dims) * contracted
    return flops


def program_memory_mb(compiled: Any) -> float:
    """Device memory a compiled program needs while it runs, MiB: its arguments, temporaries and the outputs
    that do not reuse a donated argument (XLA's `memory_analysis`; what PyTorch's `max_memory_allocated`
    counts over one step that starts with the same arrays alive)."""
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return round(total / 2**20, 1)


def dots(hlo: str) -> list[dict]:
    """Every top-level dot: output and operand shapes, contracted size, FLOPs (2 x output x contracted),
    and the program inputs it reads, by pytree path (see `param_path`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    params: set[str] = set()
    out = []
    for ins in entry_instructions(hlo):
        shapes[ins.name] = ins.dims
        if ins.op == "parameter":
            params.add(ins.name)
        if ins.op != "dot" or len(ins.operands) < 2:
            continue
        lhs, rhs = (shapes.get(o, ()) for o in ins.operands[:2])
        contracted = math.prod(lhs[d] for d in ins.int_list("lhs_contracting_dims") if d < len(lhs))
        out.append({"name": ins.name, "out": list(ins.dims), "lhs": list(lhs), "rhs": list(rhs),
                    "contracted": contracted, "flops": 2 * math.prod(ins.dims) * contracted,
                    "reads": [param_path(o) for o in ins.operands[:2] if o in params]})
    return out


def train_step_facts(hlo: str, kernel_shapes: set[tuple[int, ...]], tokens: int) -> dict[str, int]:
    """Facts read off a compiled train step's HLO text.

    `kernel_grad_dots`: dots that produce a weight gradient of one of `kernel_shapes`: output of that
    shape, `tokens` (batch x sequence) elements contracted, no operand a program input (forward and
    input-gradient dots read the kernel itself). None may exist for frozen kernels. None (unknown)
    when the program has no dot instruction (GPU).
    `donated_buffers`: outputs aliased to (donated) inputs.
    """
    inputs: set[str] = set()
    shapes: dict[str, tuple[int, ...]] = {}
    grads, seen_dots = 0, 0
    for ins in entry_instructions(hlo):
        shapes[ins.name] = ins.dims
        if ins.op == "parameter" or (ins.op in ("bitcast", "copy") and ins.operands and ins.operands[0] in inputs):
            inputs.add(ins.name)
        seen_dots += ins.op == "dot"
        if ins.op != "dot" or len(ins.operands) < 2 or inputs.intersection(ins.operands[:2]):
            continue
        lhs = shapes.get(ins.operands[0], ())
        contracted = math.prod(lhs[d] for d in ins.int_list("lhs_contracting_dims") if d < len(lhs))
        grads += ins.dims in kernel_shapes and contracted == tokens
    header = hlo.split("\n", 1)[0]
    return {"kernel_grad_dots": grads if seen_dots else None, "donated_buffers": header.count("-alias)")}
