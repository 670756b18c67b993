"""Sharded MiSS on the NNX path: the model's own sharding annotations, blocks sharded like their kernels, a step.

An NNX model carries its partitioning on its variables (`out_sharding` metadata: `nnx.with_partitioning`, or
`nnx.Param(..., sharding=...)`). tunix's Llama 3 / Qwen 3 annotate every weight from their `ShardingConfig`
over the mesh axes `fsdp` and `tp` (`TUNIX_AXES`); `ShardingConfig.get_default_sharding()` shards each
kernel's `in` axis over `fsdp` and its heads / hidden axis over `tp`, so a `(8, 1)` mesh is FSDP over 8 devices
and a `(4, 2)` mesh is FSDP(4) x TP(2). Placing the model is tunix's recipe (`nnx.get_partition_spec` of the
state, `jax.device_put`, `nnx.update`), after two things only this module knows:

* every MiSS block is annotated like its kernel's `out` axis on the mesh (`annotate_blocks`): the one rule of
  `ops.Variant.partition` on the kernel's `out` entry (`ops.out_entry`), as `sharding.block_spec` places Linen
  blocks and `miss_jax.nnx` annotates blocks made under a mesh. balance `(r, out)` axis 1, mini `(r, mini_r)`
  axis 1, bat `(out // r, r, r)` axis 0 take the kernel's `out` entry where their length divides over those
  mesh axes, else they are replicated; a block whose kernel's `out` axis is replicated (a kernel annotated
  on its `in` axis only) is replicated, and so is one whose kernel spreads `out` over several axes unevenly
  (`ops.out_entry`). Under tunix's default config, q/k/v/gate/up blocks follow `tp`, o/down blocks `fsdp`.
* every annotated dimension of the model must split over its mesh axes (`check_divides`): a ValueError names
  the variable, its shape and annotation, and the fix (another mesh shape, or the `ShardingConfig` entry),
  before anything moves.

>>> # mesh = sharding.make_mesh((4, 2), TUNIX_AXES)            # FSDP(4) x TP(2), Auto axes
>>> # peft_model = get_peft_model(Llama3(config, rngs=nnx.Rngs(0)), MissConfig(r=8, target_modules=[...]))
>>> # shard_model(peft_model, mesh)                            # base and blocks placed, nothing gathered
>>> # optimizer = shard_optimizer(nnx.Optimizer(peft_model, optax.adam(1e-3), wrt=peft_model.trainable), mesh)
>>> # step = make_train_step(loss_fn, peft_model.trainable, mesh)
>>> # loss = step(peft_model, optimizer, sharding.shard_batch(batch, mesh, BATCH_SPEC))

The step is `nnx.jit`-compiled; it constrains the batch to its spec and the trained variables and the
optimizer state to their annotations, so every array stays where it was (no recompile, no drift), and runs
inside `jax.set_mesh(mesh)`. Merging (`merge_adapter`, `merge_and_unload`) and `nnx_io.save_pretrained` work
on the sharded model as on one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import ops
from .nnx import MissParam, miss_layers
from .sharding import check_mesh, check_spec

FSDP_AXIS, TP_AXIS = "fsdp", "tp"
TUNIX_AXES = (FSDP_AXIS, TP_AXIS)  # the mesh axes tunix's ShardingConfig names
BATCH_SPEC = P(FSDP_AXIS)  # how tunix splits a `(batch, seq)` batch (`act_btd` starts with `fsdp`)
FIX = ("pick a mesh shape whose axes divide it, or change the model's sharding annotation for it (tunix: its "
       "ModelConfig's shd_config, e.g. ShardingConfig.get_default_sharding() with the entry changed)")

N = TypeVar("N", bound=nnx.Module)
Batch = Any
LossFn = Callable[[nnx.Module, Batch], jax.Array]


def annotate_blocks(model: nnx.Module, mesh: Mesh) -> None:
    """Sets every MiSS block's `out_sharding` (in place) to its kernel's `out` axis on `mesh` (module
    docstring): the block axis `ops.Variant.out_axis` names takes the kernel's `out` entry where it divides
    over those mesh axes; the rest, and every block of a kernel with no annotation, is replicated."""
    for layer in miss_layers(model).values():
        names = layer.kernel.get_metadata().get("out_sharding")
        out = ops.out_entry(names, layer.rule.out_axes) if names else None
        for name, variant in layer.variants.items():
            block = layer.miss_block[name]
            block.set_metadata(out_sharding=ops.variant(variant).partition(block.shape, out, dict(mesh.shape)))


def _annotated(node: nnx.Module) -> list[tuple[str, tuple[int, ...], P]]:
    """`(path, shape, spec)` of every array variable of `node` but the MiSS blocks (`annotate_blocks` derives
    theirs), its spec from `nnx.get_partition_spec`."""
    state = nnx.state(node, nnx.Not(MissParam))
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
    return [(".".join(map(str, path)), tuple(var.shape), specs[path].get_value())
            for path, var in nnx.to_flat_state(state) if hasattr(var, "shape")]


def check_divides(node: nnx.Module, mesh: Mesh) -> None:
    """ValueError naming the variable, its shape and annotation, and the fix when an annotation of `node` (a
    model or an optimizer; MiSS blocks aside) names an axis `mesh` lacks or a dimension that does not split over
    its mesh axes. Also refuses a mesh with explicit-sharding axes (`sharding.check_mesh`)."""
    check_mesh(mesh)
    for path, shape, spec in _annotated(node):
        unknown = [n for entry in spec for n in ops.axis_names(entry) if n not in mesh.shape]
        if unknown:
            raise ValueError(
                f"{path} is annotated {spec}, which names mesh axes {unknown}; the mesh has {mesh.axis_names}. "
                f"Build the mesh with the axes the model names (tunix: miss_jax.sharding.make_mesh(shape, "
                f"{TUNIX_AXES}))."
            )
        check_spec(path, spec, shape, mesh, fix=FIX)


def _put(node: N, mesh: Mesh) -> N:
    """Every variable of `node` placed by its annotation (tunix's recipe), in place."""
    state = nnx.state(node)
    nnx.update(node, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
    return node


def shard_model(model: N, mesh: Mesh) -> N:
    """Places `model` (a `MissNnxModel` or a model adapted by `apply_miss`) on `mesh`, in place; returns it.

    Every annotation is checked against the mesh first (`check_divides`: a ValueError naming the fix, the model
    left as it was); then the blocks are annotated like their kernels (`annotate_blocks`) and each variable goes
    where its annotation says (`jax.device_put`; variables without one are replicated)."""
    check_divides(model, mesh)
    annotate_blocks(model, mesh)
    return _put(model, mesh)


def shard_optimizer(optimizer: nnx.Optimizer, mesh: Mesh) -> nnx.Optimizer:
    """Places an `nnx.Optimizer`'s state like the variables it tracks (their annotations, which its state
    copies; counters replicated), in place, as tunix's trainer does before its first step; returns it. Make the
    optimizer after `shard_model`."""
    check_divides(optimizer, mesh)
    return _put(optimizer, mesh)


def _constrain(node: nnx.Module, mesh: Mesh, *filters: Any) -> None:
    """Inside a jit: the variables of `node` that `filters` select constrained to their annotations."""
    state = nnx.state(node, *filters)
    nnx.update(node, jax.lax.with_sharding_constraint(state, nnx.get_named_sharding(state, mesh)))


def make_train_step(
    loss_fn: LossFn, wrt: Any, mesh: Mesh, batch_spec: P = BATCH_SPEC
) -> Callable[[nnx.Module, nnx.Optimizer, Batch], jax.Array]:
    """`step(model, optimizer, batch) -> loss`: one `optimizer` update of the variables `wrt` selects
    (`peft_model.trainable`: the MiSS blocks) on `loss_fn(model, batch)`, `nnx.jit`-compiled and run inside
    `jax.set_mesh(mesh)`.

    Every array of `batch` is constrained to `batch_spec` (default `BATCH_SPEC`, the batch axis over `fsdp`);
    the updated variables and the optimizer state are constrained to their annotations, so a step leaves
    every array where it was. Place the model (`shard_model`) and the optimizer (`shard_optimizer`) first,
    and the batch with `miss_jax.sharding.shard_batch`.
    """
    check_mesh(mesh)
    batch_sharding = NamedSharding(mesh, batch_spec)

    @nnx.jit
    def step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch) -> jax.Array:
        batch = jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), batch)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, batch)
        optimizer.update(model, grads)
        _constrain(model, mesh, wrt)
        _constrain(optimizer, mesh)
        return loss

    def run(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch) -> jax.Array:
        with jax.set_mesh(mesh):
            return step(model, optimizer, batch)

    return run
