"""Sharded MiSS on a device mesh: partition rules, adapters sharded like their kernels, a sharded step.

Base params are placed by t5x/MaxText-style rules: a sequence of `(regex, PartitionSpec)` pairs,
matched with `re.search` against each param's '/'-joined path (for example
`model/layers/0/self_attn/q_proj/kernel`); the first match wins, and a param no rule matches is an
error (end the rules with `(".*", PartitionSpec())` to replicate whatever is left).
`llama_rules(strategy)` gives ready rule sets for llama-style models (Llama, Mistral, Gemma).

Adapter params get no rules of their own: each follows its base kernel (shapes as in docs/DESIGN.md §1), so
the adapter path of a layer runs where the layer's kernel shard lives:
  * balance block `(r, out)`: axis 1 sharded like the kernel's `out` axis;
  * mini block `(r, mini_r)`: axis 1 sharded like the kernel's `out` axis when `mini_r` divides over
    those mesh axes, else replicated. (Column `j` of the tiled `(r, out)` block is `D[:, j % mini_r]`,
    so each `out` shard needs every column anyway: XLA gathers the tiny `r x mini_r` block, never a
    kernel; sharding it when it divides keeps its optimizer state partitioned like everything else.)
  * bat block `(out // r, r, r)`: axis 0 sharded like the kernel's `out` axis when `out // r` divides
    over those mesh axes, else replicated (block `a` touches only kernel rows `a*r:(a+1)*r` of `out`);
  * `modules_to_save` copies and trained biases: exactly like the base params they copy.
Where the kernel's `out` axis is replicated (e.g. `o_proj` under tensor parallelism, whose `in` axis is
sharded) the block is replicated. A kernel with several `out` axes (a Linen `nn.DenseGeneral`,
`(d_model, heads, head_dim)`) flattens them row-major to `out` (its `layer_rules.KernelRule`): its `out`
is sharded like its first `out` axis when the other `out` axes are replicated, else replicated
(`ops.out_entry`, as in the NNX transform). Optimizer state is sharded like the params it tracks.

>>> # mesh = make_mesh((4, 2))                              # axes ("data", "model")
>>> # rules = llama_rules("tensor_parallel")
>>> # pm = get_peft_model(model, cfg, params=params, low_cpu_mem_usage=True)
>>> # shard_peft_model(pm, mesh, rules)                    # adapters created sharded, no gather
>>> # state = create_sharded_train_state(pm, tx, mesh, rules)
>>> # step = make_sharded_train_step(pm, tx, causal_lm_loss, mesh, rules, llama_batch_spec("tensor_parallel"))
>>> # state, loss = step(pm.params, state, shard_batch(batch, mesh, spec), rng)

Meshes must use `AxisType.Auto` axes (GSPMD propagation, what `make_mesh` builds); transformers' Flax
models do not run under JAX's explicit-sharding mode.
"""

from __future__ import annotations

import functools
import math
import os
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import adapters, ops, train, tree
from .targeting import Layer
from .train import TrainState, init_train_state
from .tree import Path, path_str

if TYPE_CHECKING:
    from .model import MissModel

PyTree = Any
Rules = Sequence[tuple[str, P]]
AxisEntry = ops.AxisEntry

DATA_AXIS = "data"
MODEL_AXIS = "model"
STRATEGIES = ("data_parallel", "fsdp", "tensor_parallel")

COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


# --------------------------------------------------------------------------- many hosts


def distributed_settings(
    coordinator: Optional[str] = None, num_processes: Optional[int] = None, process_id: Optional[int] = None
) -> Optional[tuple[str, int, int]]:
    """`(coordinator, num_processes, process_id)` from the arguments, else from `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, checked; None when none of the three is set anywhere (leave it
    to JAX's cluster detection: Cloud TPU, SLURM, Open MPI). ValueError naming the fix when only some are set,
    a count or id is not an integer, the id is out of `[0, num_processes)`, or the address is not `host:port`."""
    got = {
        "coordinator": (coordinator, COORDINATOR_ENV, "--coordinator"),
        "num_processes": (num_processes, NUM_PROCESSES_ENV, "--num-processes"),
        "process_id": (process_id, PROCESS_ID_ENV, "--process-id"),
    }
    values = {k: v if v is not None else os.environ.get(env) or None for k, (v, env, _) in got.items()}
    if all(v is None for v in values.values()):
        return None
    missing = [f"{env} (or {flag})" for k, (_, env, flag) in got.items() if values[k] is None]
    if missing:
        raise ValueError(
            f"Multi-host launch: {', '.join(missing)} not set. Set all three of {COORDINATOR_ENV}=HOST:PORT "
            f"(process 0's address), {NUM_PROCESSES_ENV}=N and {PROCESS_ID_ENV}=0..N-1 on every process, or none "
            "of them on a cluster JAX detects itself (Cloud TPU, SLURM)."
        )
    ints = {}
    for k in ("num_processes", "process_id"):
        try:
            ints[k] = int(values[k])
        except (TypeError, ValueError):
            raise ValueError(f"{got[k][1]} / {got[k][2]} must be an integer, got {values[k]!r}.") from None
    n, i = ints["num_processes"], ints["process_id"]
    if n < 1:
        raise ValueError(f"{NUM_PROCESSES_ENV} / --num-processes must be at least 1, got {n}.")
    if not 0 <= i < n:
        raise ValueError(
            f"{PROCESS_ID_ENV} / --process-id {i} is out of range for {n} processes: give each process a "
            f"distinct id in 0..{n - 1} (process 0 runs the coordinator)."
        )
    address = str(values["coordinator"])
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{COORDINATOR_ENV} / --coordinator must be HOST:PORT (process 0's address and a free port, e.g. "
            f"10.0.0.1:1234), got {address!r}."
        )
    return address, n, i


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Returns once `address` (`host:port`) accepts a TCP connection; RuntimeError naming the fix when it has
    not within `timeout` seconds (JAX itself would abort the process without saying which setting is wrong)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(1.0, timeout)).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"No multi-host coordinator at {address} after {timeout} s ({e}). Start process 0 (it runs "
                    f"the coordinator) with the same {COORDINATOR_ENV} / --coordinator, use its host's address as "
                    "seen from this host, and open that port; or raise the timeout if process 0 starts later."
                ) from None
            time.sleep(0.2)


def initialize_distributed(
    coordinator: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    timeout: int = 300,
    heartbeat_timeout: int = 100,
) -> tuple[int, int]:
    """Joins this process to a multi-host JAX run (`jax.distributed.initialize`); returns
    `(process_index, process_count)`. Call it on every process before any other JAX call.

    The settings come from the arguments or the `JAX_*` environment variables (`distributed_settings`, which
    checks them); with none set, JAX detects the cluster itself (Cloud TPU pod slices, SLURM). On CPU the
    cross-process collectives are gloo's. `timeout` bounds (seconds) the wait for every process to reach
    the coordinator, `heartbeat_timeout` how long a dead peer goes unnoticed: then this process stops with
    an error instead of hanging. Already initialized: a no-op.
    """
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    settings = distributed_settings(coordinator, num_processes, process_id)
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address, n, i = settings or (None, None, None)
    if settings and i != 0:
        wait_for_coordinator(address, timeout)
    try:
        jax.distributed.initialize(
            address, n, i, initialization_timeout=int(timeout), heartbeat_timeout_seconds=int(heartbeat_timeout)
        )
    except Exception as e:  # XLA's runtime errors have no public class of their own
        where = f"coordinator {address} as process {i} of {n}" if settings else "the cluster JAX detected"
        raise RuntimeError(
            f"Multi-host start failed ({where}): {str(e).strip().splitlines()[0]}. Check that "
            f"every process was started with the same coordinator address and process count and a distinct "
            f"process id, that process 0 runs and its port is reachable from every host, and that no JAX "
            f"computation ran before this call."
        ) from e
    return jax.process_index(), jax.process_count()


# --------------------------------------------------------------------------- meshes and rule sets


def make_mesh(
    shape: Sequence[int], axis_names: Sequence[str] = (DATA_AXIS, MODEL_AXIS), devices: Optional[Sequence] = None
) -> Mesh:
    """A mesh of `shape` (e.g. `(4, 2)`) over `devices` (default: every device of every process), Auto axes."""
    shape = tuple(int(s) for s in shape)
    devices = list(jax.devices() if devices is None else devices)
    if len(shape) != len(axis_names):
        raise ValueError(f"Mesh shape {shape} has {len(shape)} axes but {len(axis_names)} names {tuple(axis_names)}.")
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"Mesh shape {shape} needs {math.prod(shape)} devices but {len(devices)} are available; pick a shape "
            "whose product is the device count (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
            "simulates N devices)."
        )
    return jax.make_mesh(shape, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def check_mesh(mesh: Mesh) -> None:
    """Raises if `mesh` has explicit-sharding axes (transformers' Flax models need Auto axes)."""
    explicit = [n for n, t in zip(mesh.axis_names, getattr(mesh, "axis_types", ())) if t != AxisType.Auto]
    if explicit:
        raise ValueError(
            f"Mesh axes {explicit} are not AxisType.Auto; build the mesh with miss_jax.sharding.make_mesh or "
            "jax.make_mesh(..., axis_types=(AxisType.Auto,) * ndim)."
        )


def llama_rules(strategy: str, data_axis: str = DATA_AXIS, model_axis: str = MODEL_AXIS) -> tuple[tuple[str, P], ...]:
    """Partition rules for llama-style Flax params (Llama, Mistral, Gemma) on a `(data, model)` mesh.

    * "data_parallel": every param replicated; the batch is split over all devices.
    * "fsdp": every kernel's `out` axis (and the embedding's hidden axis) sharded over all devices
      (`(data, model)` together), so adapters and their optimizer state are sharded too; XLA gathers
      each layer's kernel just in time, as FSDP does.
    * "tensor_parallel": Megatron-style over `model_axis`: q/k/v/gate/up and lm_head split their `out`
      axis, o_proj/down_proj their `in` axis, the embedding its vocab axis; the batch is split over `data_axis`.
    """
    if strategy == "data_parallel":
        return ((".*", P()),)
    if strategy == "fsdp":
        every = (data_axis, model_axis)
        return (
            (r"embed_tokens/embedding$", P(None, every)),
            (r"kernel$", P(None, every)),
            (".*", P()),
        )
    if strategy == "tensor_parallel":
        return (
            (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", P(None, model_axis)),
            (r"(o_proj|down_proj)/kernel$", P(model_axis, None)),
            (r"embed_tokens/embedding$", P(model_axis, None)),
            (r"lm_head/kernel$", P(None, model_axis)),
            (".*", P()),
        )
    raise ValueError(f"Unknown sharding strategy {strategy!r}; expected one of {STRATEGIES}.")


def llama_batch_spec(strategy: str, data_axis: str = DATA_AXIS, model_axis: str = MODEL_AXIS) -> P:
    """How `llama_rules(strategy)` splits a `(batch, seq)` batch: over every device, or over `data_axis` (TP)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown sharding strategy {strategy!r}; expected one of {STRATEGIES}.")
    return P(data_axis) if strategy == "tensor_parallel" else P((data_axis, model_axis))


# --------------------------------------------------------------------------- partition specs


def axis_size(mesh: Mesh, entry: AxisEntry) -> int:
    """Number of shards a PartitionSpec entry (None, an axis name or a tuple of names) makes on `mesh`."""
    return math.prod(mesh.shape[n] for n in ops.axis_names(entry))


def check_spec(
    key: str, spec: P, shape: tuple[int, ...], mesh: Mesh, fix: str = "change the rule for it or the mesh shape"
) -> None:
    """ValueError naming `key`, its `shape` and `spec`, and `fix` (what to change) when `spec` has more entries than
    `shape` has axes, names an axis `mesh` lacks, or a dimension does not split over its mesh axes."""
    if len(spec) > len(shape):
        raise ValueError(f"Partition spec {spec} for {key!r} has more entries than the param's shape {shape}; {fix}.")
    for dim, entry in zip(shape, spec):
        unknown = [n for n in ops.axis_names(entry) if n not in mesh.shape]
        if unknown:
            raise ValueError(
                f"Partition spec {spec} for {key!r} names mesh axes {unknown}; the mesh has {mesh.axis_names}: {fix}."
            )
        size = axis_size(mesh, entry)
        if dim % size:
            raise ValueError(
                f"Param {key!r} of shape {shape}: dimension {dim} does not split over mesh axes {entry!r} "
                f"({size} shards); {fix}."
            )


def spec_for(rules: Rules, path: Path, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of the first rule whose regex `re.search`es `path_str(path)`, checked against `shape`."""
    key = path_str(path)
    for pattern, spec in rules:
        if re.search(pattern, key):
            check_spec(key, spec, tuple(shape), mesh)
            return spec
    raise ValueError(
        f"No partition rule matches param {key!r}; add one, or end the rules with ('.*', PartitionSpec()) "
        "to replicate unmatched params."
    )


def param_specs(params: PyTree, rules: Rules, mesh: Mesh) -> PyTree:
    """A PartitionSpec for every leaf of the base `params` (same tree structure)."""
    return jax.tree_util.tree_map_with_path(lambda kp, leaf: spec_for(rules, tree.key_path(kp), leaf.shape, mesh), params)


def _kernel_out_entry(layer: Layer, rules: Rules, mesh: Mesh) -> AxisEntry:
    """The spec entry of the base kernel's flattened `out` axis, whatever its layout or number of axes (an
    `nn.DenseGeneral`'s, through its rule): `ops.out_entry` of the kernel's spec under `rules`."""
    if layer.rule is not None:
        shape, out_axes = layer.kernel_shape, layer.rule.out_axes
    elif layer.layout == "flax":
        shape, out_axes = (layer.in_features, layer.out_features), (1,)
    else:
        shape, out_axes = (layer.out_features, layer.in_features), (0,)
    return ops.out_entry(spec_for(rules, layer.path + ("kernel",), shape, mesh), out_axes)


def block_spec(variant: str, layer: Layer, r: int, mini_r: int, rules: Rules, mesh: Mesh) -> P:
    """The spec of an adapter block on `layer`: its `ops.Variant.out_axis` follows the kernel's `out` axis
    when its length splits over the same mesh axes, else it is replicated (module docstring). A kernel with
    several `out` axes (`nn.DenseGeneral`, `(d_model, heads, head_dim)`) counts as sharded along its
    flattened `out` when only its first `out` axis is (`ops.out_entry`), as in the NNX transform."""
    v = ops.variant(variant)
    shape = v.block_shape(layer.in_features, layer.out_features, r, mini_r)
    return P(*v.partition(shape, _kernel_out_entry(layer, rules, mesh), mesh.shape))


def adapter_specs(
    peft_model: "MissModel", rules: Rules, mesh: Mesh, adapter_tree: Optional[PyTree] = None
) -> PyTree:
    """PartitionSpecs for `adapter_tree` (default `peft_model.adapter_params`; `trainable_params()` works too).

    Leaves may be arrays or `jax.ShapeDtypeStruct`s (abstract adapters).
    """
    adapter_tree = peft_model.adapter_params if adapter_tree is None else adapter_tree
    layers = {layer.path: layer for layer in peft_model.layers.values()}
    configs = peft_model.peft_config

    def one(keypath: tuple, leaf: Any) -> P:
        ref = adapters.locate(tree.key_path(keypath))
        if ref.group == adapters.MISS:
            config = configs[ref.adapter]
            return block_spec(config.variant, layers[ref.module], config.r, config.mini_r, rules, mesh)
        return spec_for(rules, ref.module + (ref.leaf,), leaf.shape, mesh)

    return jax.tree_util.tree_map_with_path(one, adapter_tree)


def named(mesh: Mesh, specs: PyTree) -> PyTree:
    """PartitionSpecs -> NamedShardings on `mesh`."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(params: PyTree, mesh: Mesh, rules: Rules) -> PyTree:
    """NamedShardings of the base params."""
    return named(mesh, param_specs(params, rules, mesh))


def adapter_shardings(
    peft_model: "MissModel", mesh: Mesh, rules: Rules, adapter_tree: Optional[PyTree] = None
) -> PyTree:
    """NamedShardings of `adapter_tree` (default: the whole adapter pytree), each following its base kernel."""
    return named(mesh, adapter_specs(peft_model, rules, mesh, adapter_tree))


# --------------------------------------------------------------------------- placing a model


def init_sharded_params(model: Any, mesh: Mesh, rules: Rules, seed: int = 0) -> PyTree:
    """Random base params of a transformers Flax model (made with `_do_init=False`), created sharded.

    `model.init_weights` runs under `jax.jit(out_shardings=...)`, so no kernel exists whole on one device.
    """
    check_mesh(mesh)
    init = functools.partial(model.init_weights, input_shape=model.input_shape)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(seed))
    return jax.jit(init, out_shardings=param_shardings(shapes, mesh, rules))(jax.random.PRNGKey(seed))


def shard_peft_model(peft_model: "MissModel", mesh: Mesh, rules: Rules, seed: int = 0) -> None:
    """Places every param of `peft_model` on `mesh`, in place.

    Base params go where `rules` say (a no-op for params already placed so, e.g. by `init_sharded_params`).
    Adapters made with `low_cpu_mem_usage=True` (abstract) are created here directly sharded, by
    `jax.jit(init, out_shardings=...)` with key `fold_in(PRNGKey(seed), i)` for the i-th adapter;
    concrete adapters and trained biases are moved to their shardings.
    """
    check_mesh(mesh)
    params = jax.device_put(peft_model.params, param_shardings(peft_model.params, mesh, rules))
    shardings = adapter_shardings(peft_model, mesh, rules)
    placed = adapters.empty()
    for i, name in enumerate(peft_model.peft_config):
        own = adapters.own(peft_model.adapter_params, name)
        own_sh = adapters.own(shardings, name)
        if tree.is_abstract(own):
            create = functools.partial(adapters.init, peft_model.plan.spec(name))
            key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
            own = jax.jit(create, out_shardings=own_sh)(params, key)
        else:
            own = jax.device_put(own, own_sh)
        placed = adapters.with_adapter(placed, name, own, {})
    placed[adapters.BIAS] = jax.device_put(peft_model.adapter_params[adapters.BIAS], shardings[adapters.BIAS])
    peft_model.place(params, placed)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, batch_spec: P = P(DATA_AXIS)) -> dict[str, jax.Array]:
    """Global arrays from this process's part of a batch (the whole batch on one host), split by `batch_spec`."""
    sharding = NamedSharding(mesh, batch_spec)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


# --------------------------------------------------------------------------- training


def train_state_shardings(peft_model: "MissModel", tx: optax.GradientTransformation, mesh: Mesh, rules: Rules) -> TrainState:
    """NamedShardings of a `TrainState`: the step replicated, the trainables like their kernels, the
    optimizer state like the params it tracks (its counters replicated)."""
    trainable = peft_model.trainable_params()
    trainable_sh = adapter_shardings(peft_model, mesh, rules, trainable)
    replicated = NamedSharding(mesh, P())
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, trainable), trainable_sh, transform_non_params=lambda _: replicated
    )
    return TrainState(replicated, trainable_sh, opt_sh)


def abstract_train_state(peft_model: "MissModel", tx: optax.GradientTransformation, mesh: Mesh, rules: Rules) -> TrainState:
    """A `TrainState` of `jax.ShapeDtypeStruct`s with shardings on `mesh`: the template that
    `miss_jax.train.restore_checkpoint` restores onto (any mesh shape)."""
    shapes = jax.eval_shape(functools.partial(init_train_state, tx), peft_model.trainable_params())
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        shapes,
        train_state_shardings(peft_model, tx, mesh, rules),
    )


def create_sharded_train_state(
    peft_model: "MissModel", tx: optax.GradientTransformation, mesh: Mesh, rules: Rules
) -> TrainState:
    """A fresh `TrainState` for `peft_model.trainable_params()`, optimizer state created sharded."""
    check_mesh(mesh)
    shardings = train_state_shardings(peft_model, tx, mesh, rules)
    return jax.jit(functools.partial(init_train_state, tx), out_shardings=shardings)(peft_model.trainable_params())


def make_sharded_train_step(
    peft_model: "MissModel",
    tx: optax.GradientTransformation,
    loss_fn: train.LossFn,
    mesh: Mesh,
    rules: Rules,
    batch_spec: P = P(DATA_AXIS),
    donate: bool = True,
    update_model: bool = True,
    accum_steps: int = 1,
) -> Callable[[PyTree, TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, jax.Array]]:
    """`miss_jax.train.make_train_step`'s `step(params, state, batch, rng) -> (state, loss)`, jitted with
    shardings: params by `rules`, state by `train_state_shardings`, every batch array by `batch_spec`
    (e.g. `P("data")`: batch axis split over `data`), the rng and loss replicated; `state` is donated.
    As there, the model holds the new (sharded) `state.trainable` after every call (`update_model`), and
    `accum_steps` accumulates gradients over micro-batches (each spread over the data shards).

    Shard the model first (`shard_peft_model`) and the batch with `shard_batch`.
    """
    check_mesh(mesh)
    state_sh = train_state_shardings(peft_model, tx, mesh, rules)
    replicated = NamedSharding(mesh, P())
    plan = peft_model.plan
    params_sh = param_shardings(peft_model.params, mesh, rules)
    jitted = jax.jit(
        train.train_step_fn(peft_model, tx, loss_fn, plan, accum_steps),
        in_shardings=(params_sh, state_sh, NamedSharding(mesh, batch_spec), replicated),
        out_shardings=(state_sh, replicated),
        donate_argnums=(1,) if donate else (),
    )
    return train.model_step(jitted, peft_model, plan.active, update_model=update_model, plan=plan,
                            donated=1 if donate else None)
