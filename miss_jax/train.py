"""Training: an optax train step over the adapter pytree only, and orbax checkpoints of it.

>>> # tx = optax.adamw(1e-3); state = create_train_state(peft_model, tx)
>>> # step = make_train_step(peft_model, tx, causal_lm_loss)
>>> # state, loss = step(peft_model.params, state, batch, rng)

The step differentiates `peft_model.trainable_params()` (active adapter blocks, the active
`modules_to_save` copies, trained biases) and updates it, less a frozen adapter's params; the base
params are an argument, never a gradient target, and the state buffers are donated. After each step
the model holds the trained adapter (the step writes `state.trainable` back), so
`peft_model.save_pretrained(...)` saves what was trained.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from . import adapters, programs, tree
from .losses import LossFn, causal_lm_loss, classification_loss, cross_entropy

if TYPE_CHECKING:
    from .adapters import Plan
    from .model import MissModel

PyTree = Any

__all__ = [  # the losses live in `miss_jax.losses`; train steps take them from here too
    "CHECKPOINT_FORMAT", "LossFn", "TrainState", "causal_lm_loss", "check_accum_steps", "checkpoint_metadata",
    "classification_loss", "create_train_state", "cross_entropy", "init_train_state", "latest_step",
    "make_eval_step", "make_loss_fn", "make_train_step", "micro_batches", "model_inputs", "model_step",
    "read_checkpoint", "read_checkpoint_metadata", "restore_checkpoint", "save_checkpoint", "train_step_fn",
]


@flax.struct.dataclass
class TrainState:
    """`step` (int32 scalar), `trainable` (the adapter pytree being trained), `opt_state` (optax)."""

    step: jax.Array
    trainable: PyTree
    opt_state: PyTree


def create_train_state(peft_model: "MissModel", tx: optax.GradientTransformation) -> TrainState:
    """A fresh state for `peft_model.trainable_params()`.

    The leaves are copies (`init_train_state`).
    """
    return init_train_state(tx, peft_model.trainable_params())


def init_train_state(tx: optax.GradientTransformation, trainable: PyTree) -> TrainState:
    """A step-0 `TrainState` over copies of `trainable` (pure: jit it with `out_shardings` to create it
    sharded). Copies: a step donates its state, and must never free buffers the model still holds (its
    adapter arrays, or for `modules_to_save` the base params the copies start as)."""
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)
    return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))


def model_inputs(peft_model: "MissModel", batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `batch` the wrapped model's `__call__` takes (the rest are for the loss)."""
    names = peft_model.input_names
    return {k: v for k, v in batch.items() if k in names and k != "labels"}


def make_loss_fn(
    peft_model: "MissModel", loss_fn: LossFn, train: bool = True, plan: Optional["Plan"] = None
) -> Callable[..., jax.Array]:
    """`loss(params, trainable, batch, rng) -> scalar` for `plan` (default: the model's current one;
    e.g. `dataclasses.replace(peft_model.plan, active=())` trains only `modules_to_save`). Pure, not jitted.

    A `loss_fn` may carry `forward_context()` (a context manager the forward is traced in) and
    `check(plan)` (raises for plans it cannot serve), as `miss_jax.losses.ChunkedCausalLMLoss` does."""
    forward = peft_model.apply_fn(plan)
    check = getattr(loss_fn, "check", None)
    if check is not None:
        check(plan or peft_model.plan)
    context = getattr(loss_fn, "forward_context", contextlib.nullcontext)

    def loss(params: PyTree, trainable: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array) -> jax.Array:
        extra = peft_model.dropout_kwargs(rng) if train else {}
        with context():
            outputs = forward(params, trainable, **model_inputs(peft_model, batch), **extra)
        return loss_fn(outputs, batch)

    return loss


def train_step_fn(
    peft_model: "MissModel",
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    plan: Optional["Plan"] = None,
    accum_steps: int = 1,
) -> Callable[[PyTree, TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, jax.Array]]:
    """The pure `step(params, state, batch, rng) -> (state, loss)` for `plan` (default: the model's current
    one): one optax update of `state.trainable`. Not jitted and never touching the model, so it composes
    with `jax.jit(in_shardings=...)` and the like; `make_train_step` is the form to call.

    The adapters of `plan` frozen in the model (`frozen_adapters`) when the step is made stay as they are:
    their gradients and updates are zeros (`adapters.frozen_part`), so neither the gradient nor an
    optimizer's own terms (weight decay, momentum) move them.

    `accum_steps=k` splits the batch into `k` micro-batches (example `i` goes to micro-batch `i % k`, so a
    batch sharded over devices stays spread over all of them), runs them one after another in a `lax.scan`
    (activations of one micro-batch alive at a time) and applies the mean gradient once: the update of one
    step on the whole batch, whose loss is the mean of the micro-batch losses (the same when each
    micro-batch counts as many tokens, e.g. without padding). Dropout keys are `fold_in(rng, i)`.
    """
    check_accum_steps(accum_steps)
    plan = plan or peft_model.plan
    loss = make_loss_fn(peft_model, loss_fn, plan=plan)
    value_and_grad = jax.value_and_grad(loss, argnums=1)
    frozen = _frozen(peft_model, plan)

    def without_frozen(t: PyTree) -> PyTree:  # zeros in place of the frozen adapters' leaves
        if not frozen:
            return t
        zeros = {p: jnp.zeros_like(v) for p, v in tree.flatten(adapters.frozen_part(t, plan, frozen)).items()}
        return tree.replace_leaves(t, zeros)

    def step(params: PyTree, state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array):
        if accum_steps == 1:
            value, grads = value_and_grad(params, state.trainable, batch, rng)
        else:
            def micro_step(carry: tuple, xs: tuple) -> tuple:
                total, acc = carry
                micro, i = xs
                v, g = value_and_grad(params, state.trainable, micro, jax.random.fold_in(rng, i))
                return (total + v, jax.tree_util.tree_map(jnp.add, acc, g)), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
            micro = micro_batches(batch, accum_steps)
            (total, grads), _ = jax.lax.scan(micro_step, (jnp.zeros((), jnp.float32), zeros),
                                             (micro, jnp.arange(accum_steps)))
            value = total / accum_steps
            grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grads)
        updates, opt_state = tx.update(without_frozen(grads), state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, without_frozen(updates))
        return TrainState(state.step + 1, trainable, opt_state), value

    return step


def check_accum_steps(accum_steps: Any) -> None:
    """ValueError unless `accum_steps` is a positive integer."""
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive integer, got {accum_steps!r}.")


def micro_batches(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """Every array `(B, ...)` of `batch` as `(k, B // k, ...)`, example `i` in micro-batch `i % k`."""
    out = {}
    for name, x in batch.items():
        if not hasattr(x, "shape"):
            raise ValueError(
                f"Batch entry {name!r} is a {type(x).__name__}, not an array: pass arrays (e.g. jnp.asarray(...) of "
                "it) with the examples on the first axis."
            )
        n = x.shape[0] if getattr(x, "ndim", 0) else 0
        if n % k or not n:
            raise ValueError(
                f"accum_steps={k} does not divide the batch: {name!r} has {n} examples. Pass a batch whose size is "
                f"a multiple of {k}, or another accum_steps."
            )
        out[name] = jnp.swapaxes(x.reshape(n // k, k, *x.shape[1:]), 0, 1)
    return out


def make_train_step(
    peft_model: "MissModel",
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    donate: bool = True,
    plan: Optional["Plan"] = None,
    update_model: bool = True,
    accum_steps: int = 1,
) -> Callable[[PyTree, TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, jax.Array]]:
    """A jitted `step(params, state, batch, rng) -> (state, loss)`; `state` is donated.

    Only `state.trainable` is differentiated (for `plan`, default the model's current one). Same
    shapes never recompile. After every call the model holds the new `state.trainable` (by reference,
    `peft_model.update_params`), as PEFT's in-place optimizer leaves the model trained: what
    `save_pretrained`, `merge_adapter` or the model's own forward use is always the trained adapter.
    `update_model=False` leaves the model alone (a state trained beside the model, e.g. a baseline).
    `accum_steps=k` accumulates gradients over `k` micro-batches of the batch in the same compiled
    program (see `train_step_fn`). An active adapter frozen in the model (`frozen_adapters`) is applied
    but never updated, as PEFT's optimizer skips parameters that do not require grad. The step refuses
    to run while one of its adapters is merged into the model (it would apply the adapter twice), or
    once one was frozen or unfrozen after it was built: see `model_step`.
    """
    plan = plan or peft_model.plan
    fn = train_step_fn(peft_model, tx, loss_fn, plan, accum_steps)
    jitted = jax.jit(fn, donate_argnums=(1,) if donate else ())
    return model_step(jitted, peft_model, plan.active, update_model=update_model, plan=plan,
                      donated=1 if donate else None)


def make_eval_step(peft_model: "MissModel", loss_fn: LossFn) -> Callable[..., jax.Array]:
    """A jitted `eval(params, trainable, batch) -> loss` without dropout (refuses while its adapters are merged)."""
    plan = peft_model.plan
    loss = make_loss_fn(peft_model, loss_fn, train=False, plan=plan)
    return model_step(jax.jit(lambda params, trainable, batch: loss(params, trainable, batch, None)),
                      peft_model, plan.active)


def _frozen(peft_model: "MissModel", plan: "Plan") -> tuple[str, ...]:
    """The adapters `plan` trains (active or saved) that `peft_model` holds frozen now."""
    return tuple(n for n in dict.fromkeys(plan.active + plan.saved) if n in peft_model.frozen_adapters)


def model_step(
    jitted: Any, peft_model: "MissModel", names: tuple[str, ...], update_model: bool = False,
    plan: Optional["Plan"] = None, donated: Optional[int] = None,
) -> Callable[..., Any]:
    """`jitted` as a step of `peft_model`. Every check runs before the call, so that nothing is refused after
    the donated state is gone:

    * refused while one of the adapters `names` (which the step applies itself) is merged into the model's
      params (called with those params it would apply them twice), once one was deleted or replaced (a new
      adapter of the same name), or once the wrapped model's config was edited (`programs.model_key`: the
      step was traced with the old one);
    * `plan`: a train step's plan (`train_step_fn`'s); refused once an adapter it trains was frozen or
      unfrozen after the step was built (the step keeps the frozen adapters of that moment);
    * `update_model`: `jitted` returns `(state, ...)` and the model takes `state.trainable` right after the
      call (`peft_model.update_params`, by reference: its previous arrays, the donated inputs of the next
      call, are replaced at once); the input state's `trainable` is checked to fit first;
    * `donated`: the position of the argument `jitted` donates. Its leaves that the model holds and keeps
      (base params, e.g. the buffer a `modules_to_save` copy starts as; adapter arrays the write-back does
      not replace) are copied before the call, so a donation never deletes the model's own arrays.

    `.lower` is kept."""
    frozen = None if plan is None else _frozen(peft_model, plan)
    configs = {n: peft_model.peft_config[n] for n in names}
    built_for = programs.model_key(peft_model.base_model)

    def call(*args: Any, **kwargs: Any) -> Any:
        changed = [n for n in names if peft_model.peft_config.get(n) != configs[n]]
        if changed:
            raise ValueError(
                f"Adapters {changed} were deleted (or deleted and added again) after this step was built; build a "
                "new step and train state for the adapters the model has now."
            )
        if programs.model_key(peft_model.base_model) != built_for:
            raise ValueError(
                "The wrapped model's config was edited after this step was built, and the step computes with the "
                "config it was built with: build a new step."
            )
        merged = [n for n in names if n in peft_model.merged_adapters]
        if merged:
            raise ValueError(
                f"Adapters {merged} were merged into the model after this step was built, so its params already hold "
                "them and the step would apply them twice: call peft_model.unmerge_adapter() first (or build a "
                "new step for the merged model)."
            )
        if plan is not None and _frozen(peft_model, plan) != frozen:
            raise ValueError(
                f"This step was built with adapters {list(frozen)} frozen, and the model now has "
                f"{list(_frozen(peft_model, plan))} frozen: build a new step (and train state) for the adapters "
                "to train now."
            )
        state = args[1] if len(args) > 1 else kwargs.get("state")
        if update_model and state is not None:
            peft_model.check_update(state.trainable)
        if donated is not None and len(args) > donated:
            args = args[:donated] + (_own_copies(peft_model, args[donated], update_model),) + args[donated + 1:]
        out = jitted(*args, **kwargs)
        if update_model:
            peft_model.update_params(out[0].trainable)
        return out

    call.lower = jitted.lower  # type: ignore[attr-defined]
    return call


def _own_copies(peft_model: "MissModel", donated: PyTree, update_model: bool) -> PyTree:
    """`donated` with a copy in place of each leaf the model holds and keeps after the call: its base params,
    and its adapter arrays except those the write-back (`update_model`: `donated.trainable`) replaces."""
    adapter = tree.flatten(peft_model.adapter_params)
    replaced = set(tree.flatten(donated.trainable)) if update_model else set()
    kept = {id(v) for v in jax.tree_util.tree_leaves(peft_model.params)}
    kept |= {id(v) for path, v in adapter.items() if path not in replaced}
    if not any(id(x) in kept for x in jax.tree_util.tree_leaves(donated)):
        return donated
    return jax.tree_util.tree_map(lambda x: jnp.copy(x) if id(x) in kept else x, donated)


# --------------------------------------------------------------------------- orbax checkpoints


CHECKPOINT_ITEMS = ("state", "meta")  # the orbax items of a step folder


def _manager(directory: str, max_to_keep: Optional[int] = None, create: bool = False) -> Any:
    import orbax.checkpoint as ocp

    if not create and not os.path.isdir(directory):
        raise FileNotFoundError(f"No checkpoint folder {directory!r}; pass the folder save_checkpoint wrote.")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


CHECKPOINT_FORMAT = "miss-jax-train-state/1"  # the `format` field of a checkpoint's metadata


def checkpoint_metadata(peft_model: "MissModel") -> dict[str, Any]:
    """What a checkpoint needs to be read back without the Python objects: configs, names, plan."""
    plan = peft_model.plan
    return {
        "format": CHECKPOINT_FORMAT,
        "adapters": {n: c.to_dict() for n, c in peft_model.peft_config.items()},
        "active": list(plan.active),
        "saved": list(plan.saved),
    }


def save_checkpoint(directory: str, state: TrainState, peft_model: "MissModel", max_to_keep: Optional[int] = 3) -> str:
    """Saves `state` (+ adapter configs as JSON) as step `state.step` under `directory`; returns its path.

    Orbax writes to a temporary folder and renames it when complete.
    """
    import orbax.checkpoint as ocp

    step = int(state.step)
    with _manager(directory, max_to_keep, create=True) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                meta=ocp.args.JsonSave(checkpoint_metadata(peft_model)),
            ),
        )
        mngr.wait_until_finished()
    return os.path.join(os.path.abspath(directory), str(step))


def _step(mngr: Any, directory: str, step: Optional[int]) -> int:
    """`step` (default: the latest) among the complete steps `mngr` holds (a step folder without both items,
    e.g. an empty `5/`, is not one); FileNotFoundError when there is none, ValueError naming the saved steps
    when `step` is not one of them."""
    steps = _complete_steps(mngr, directory)
    if not steps:
        raise FileNotFoundError(f"No checkpoint under {directory!r}.")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ValueError(f"{directory!r} has no checkpoint step {step}; it has {steps}.")
    return step


def _complete_steps(mngr: Any, directory: str) -> list[int]:
    return sorted(
        s for s in mngr.all_steps()
        if all(os.path.isdir(os.path.join(directory, str(s), item)) for item in CHECKPOINT_ITEMS)
    )


def latest_step(directory: str) -> Optional[int]:
    """The newest complete step saved under `directory`, or None."""
    if not os.path.isdir(directory):
        return None
    with _manager(directory) as mngr:
        steps = _complete_steps(mngr, directory)
    return steps[-1] if steps else None


def restore_checkpoint(directory: str, template: TrainState, step: Optional[int] = None) -> TrainState:
    """Restores a `TrainState` saved by `save_checkpoint` (latest step by default).

    `template` gives the structure, dtypes and shardings (e.g. `create_train_state(...)`, or a tree of
    `jax.ShapeDtypeStruct` with `sharding=` to restore onto another mesh).
    """
    import orbax.checkpoint as ocp

    with _manager(directory) as mngr:
        step = _step(mngr, directory, step)
        abstract = jax.tree_util.tree_map(
            lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(a),
            flax.serialization.to_state_dict(template),
        )
        _check_shapes(directory, step, mngr.item_metadata(step)["state"].tree, abstract)
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return flax.serialization.from_state_dict(template, restored["state"])


def _check_shapes(directory: str, step: int, saved: PyTree, wanted: PyTree) -> None:
    """ValueError listing the leaves whose saved shape (or presence) differs from the template's."""
    have = {tree.path_str(tree.key_path(k)): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(saved)}
    want = {tree.path_str(tree.key_path(k)): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(wanted)}
    wrong = [f"{k}: {have.get(k, 'missing')} saved, {want.get(k, 'absent')} expected"
             for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    if wrong:
        raise ValueError(
            f"Checkpoint step {step} in {directory!r} does not fit the template (another model or adapter config?): "
            + "; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else "")
            + ". Build the template from the model the checkpoint was trained with."
        )


def read_checkpoint_metadata(directory: str, step: Optional[int] = None) -> dict[str, Any]:
    """The JSON metadata saved beside a checkpoint (adapter configs, active names)."""
    import orbax.checkpoint as ocp

    with _manager(directory) as mngr:
        step = _step(mngr, directory, step)
        return json.loads(json.dumps(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]))


def read_checkpoint(directory: str, step: Optional[int] = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(state, metadata)` of a checkpoint without a template: the `TrainState` as a nested dict of arrays
    (`step`, `trainable`, `opt_state`) and the JSON metadata. ValueError if it is not a miss-jax checkpoint.
    Arrays saved on devices this process does not have (another mesh, other hosts) come back whole on its
    first device."""
    import orbax.checkpoint as ocp

    anywhere = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with _manager(directory) as mngr:
        restored = mngr.restore(
            _step(mngr, directory, step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(fallback_sharding=anywhere), meta=ocp.args.JsonRestore()
            ),
        )
    meta, state = restored["meta"], restored["state"]
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory!r} is not a miss-jax training checkpoint (no {CHECKPOINT_FORMAT!r} metadata).")
    return state, meta
