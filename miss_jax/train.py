"""Training: an optax train step over the adapter pytree only, and orbax checkpoints of it.

>>> # tx = optax.adamw(1e-3); state = create_train_state(peft_model, tx)
>>> # step = make_train_step(peft_model, tx, causal_lm_loss)
>>> # state, loss = step(peft_model.params, state, batch, rng)

The step differentiates `peft_model.trainable_params()` (active adapter blocks, the active
`modules_to_save` copies, trained biases); the base params are an argument, never a gradient
target, and the state buffers are donated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any
LossFn = Callable[[Any, Mapping[str, jax.Array]], jax.Array]


@flax.struct.dataclass
class TrainState:
    """`step` (int32 scalar), `trainable` (the adapter pytree being trained), `opt_state` (optax)."""

    step: jax.Array
    trainable: PyTree
    opt_state: PyTree


def create_train_state(peft_model: Any, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state for `peft_model.trainable_params()`.

    The leaves are copied: the step donates the state, and must never free buffers the model (or,
    for `modules_to_save`, the base params) still holds.
    """
    return init_train_state(tx, jax.tree_util.tree_map(lambda a: a.copy(), peft_model.trainable_params()))


def init_train_state(tx: optax.GradientTransformation, trainable: PyTree) -> TrainState:
    """A step-0 `TrainState` over `trainable` as given (pure: jit it with `out_shardings` to create it sharded)."""
    return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """Mean token/example cross-entropy: `logits` `(..., C)`, integer `labels` `(...)`, optional 0/1 `mask`."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    if mask is None:
        return losses.mean()
    mask = mask.astype(jnp.float32)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def classification_loss(outputs: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Cross-entropy of `outputs.logits` `(B, C)` against `batch["labels"]` `(B,)`."""
    return cross_entropy(outputs.logits, batch["labels"])


def causal_lm_loss(outputs: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Next-token cross-entropy: `outputs.logits` `(B, T, V)` predicts `batch["labels"]` (default
    `batch["input_ids"]`) shifted by one, masked by `batch["attention_mask"]` when present; label -100
    is ignored, as in transformers."""
    labels = (batch["labels"] if "labels" in batch else batch["input_ids"])[:, 1:]
    mask = labels >= 0
    if "attention_mask" in batch:
        mask = mask & (batch["attention_mask"][:, 1:] > 0)
    return cross_entropy(outputs.logits[:, :-1], jnp.where(mask, labels, 0), mask)


def model_inputs(peft_model: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `batch` the wrapped model's `__call__` takes (the rest are for the loss)."""
    names = peft_model._signature.parameters
    return {k: v for k, v in batch.items() if k in names and k != "labels"}


def make_loss_fn(peft_model: Any, loss_fn: LossFn, train: bool = True, plan: Any = None) -> Callable[..., jax.Array]:
    """`loss(params, trainable, batch, rng) -> scalar` for `plan` (default: the model's current one;
    e.g. `dataclasses.replace(peft_model.plan, active=())` trains only `modules_to_save`). Pure, not jitted."""
    forward = peft_model.apply_fn(plan)

    def loss(params: PyTree, trainable: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array) -> jax.Array:
        extra = {"train": True, "dropout_rng": rng} if train else {}
        outputs = forward(params, trainable, **model_inputs(peft_model, batch), **extra)
        return loss_fn(outputs, batch)

    return loss


def make_train_step(
    peft_model: Any, tx: optax.GradientTransformation, loss_fn: LossFn, donate: bool = True, plan: Any = None
) -> Callable[[PyTree, TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, jax.Array]]:
    """A jitted `step(params, state, batch, rng) -> (state, loss)`; `state` is donated.

    Only `state.trainable` is differentiated (for `plan`, default the model's current one). Same
    shapes never recompile.
    """
    loss = make_loss_fn(peft_model, loss_fn, plan=plan)

    def step(params: PyTree, state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array):
        value, grads = jax.value_and_grad(loss, argnums=1)(params, state.trainable, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return TrainState(state.step + 1, trainable, opt_state), value

    return jax.jit(step, donate_argnums=(1,) if donate else ())


def make_eval_step(peft_model: Any, loss_fn: LossFn) -> Callable[..., jax.Array]:
    """A jitted `eval(params, trainable, batch) -> loss` without dropout."""
    loss = make_loss_fn(peft_model, loss_fn, train=False)
    return jax.jit(lambda params, trainable, batch: loss(params, trainable, batch, None))


# --------------------------------------------------------------------------- orbax checkpoints


def _manager(directory: str, max_to_keep: Optional[int] = None) -> Any:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


CHECKPOINT_FORMAT = "miss-jax-train-state/1"  # the `format` field of a checkpoint's metadata


def checkpoint_metadata(peft_model: Any) -> dict[str, Any]:
    """What a checkpoint needs to be read back without the Python objects: configs, names, plan."""
    plan = peft_model.plan
    return {
        "format": CHECKPOINT_FORMAT,
        "adapters": {n: c.to_dict() for n, c in peft_model.peft_config.items()},
        "active": list(plan.active),
        "saved": plan.saved,
    }


def save_checkpoint(directory: str, state: TrainState, peft_model: Any, max_to_keep: Optional[int] = 3) -> str:
    """Saves `state` (+ adapter configs as JSON) as step `state.step` under `directory`; returns its path.

    Orbax writes to a temporary folder and renames it when complete.
    """
    import orbax.checkpoint as ocp

    step = int(state.step)
    with _manager(directory, max_to_keep) as mngr:
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
    """`step` (default: the latest) among the complete steps `mngr` holds; FileNotFoundError when there
    is none, ValueError naming the saved steps when `step` is not one of them."""
    steps = sorted(mngr.all_steps())
    if not steps:
        raise FileNotFoundError(f"No checkpoint under {directory!r}.")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ValueError(f"{directory!r} has no checkpoint step {step}; it has {steps}.")
    return step


def latest_step(directory: str) -> Optional[int]:
    """The newest complete step saved under `directory`, or None."""
    if not os.path.isdir(directory):
        return None
    with _manager(directory) as mngr:
        return mngr.latest_step()


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
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return flax.serialization.from_state_dict(template, restored["state"])


def read_checkpoint_metadata(directory: str, step: Optional[int] = None) -> dict[str, Any]:
    """The JSON metadata saved beside a checkpoint (adapter configs, active names)."""
    import orbax.checkpoint as ocp

    with _manager(directory) as mngr:
        step = _step(mngr, directory, step)
        return json.loads(json.dumps(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]))
