"""Helpers shared by the JAX-side tests: filling adapters, reading logits, comparing trees, state snapshots.

(The torch-side helpers live in `interop_helpers`, the NumPy reference maths in `reference`.)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import traverse_util

from miss_jax import MissModel


def fill_blocks(model: MissModel, name: str, scale: float, seed: int) -> None:
    """Sets every miss_block of adapter `name` to `scale * N(0, 1)` (PEFT's mini/bat init is zeros)."""
    tree = model.adapter_params["miss"][name]
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    new = [scale * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    model.update_params({"miss": {name: jax.tree_util.tree_unflatten(treedef, new)}})


def logits(out: Any) -> np.ndarray:
    """The first output (logits) of a transformers Flax output, as float32 numpy."""
    return np.asarray(out[0], np.float32)


def assert_trees_close(a: Any, b: Any, atol: float) -> None:
    """Same structure, every leaf within `atol` (float32 comparison)."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=0, atol=atol)


def snapshot(model: MissModel) -> tuple:
    """Everything a failed call must leave as it was: the adapter state, and every param and adapter leaf (by
    identity: arrays are immutable, so an unchanged model holds the very same leaves)."""
    return (
        dict(model.peft_config),
        list(model.active_adapters),
        list(model.merged_adapters),
        model.frozen_adapters,
        {k: id(v) for k, v in traverse_util.flatten_dict(model.adapter_params, keep_empty_nodes=True).items()},
        {k: id(v) for k, v in traverse_util.flatten_dict(model.params).items()},
    )
