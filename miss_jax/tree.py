"""Nested-dict pytrees addressed by paths: the one home of miss-jax's tree helpers.

A *path* is a tuple of string keys, `("model", "layers", "0", "self_attn", "q_proj", "kernel")`.
Param trees (Flax `params`) and the adapter pytree (`miss_jax.adapters`) are nested dicts.

>>> t = unflatten({("a", "b"): 1, ("a", "c"): 2, ("d",): 3})
>>> get(t, ("a", "c")), path_str(("a", "c"))
(2, 'a/c')
>>> sorted(flatten(replace_leaves(t, {("a", "b"): 9})).items())
[(('a', 'b'), 9), (('a', 'c'), 2), (('d',), 3)]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import traverse_util
from flax.core import unfreeze

Path = tuple[str, ...]
PyTree = Any


def flatten(tree: Mapping) -> dict[Path, Any]:
    """`{path: leaf}` of a nested dict (a FrozenDict too); `{}` for an empty or None tree."""
    return traverse_util.flatten_dict(unfreeze(tree)) if tree else {}


def unflatten(flat: Mapping[Path, Any]) -> dict:
    """The nested dict of `{path: leaf}` (`flatten`'s inverse)."""
    return traverse_util.unflatten_dict(dict(flat))


def get(tree: Mapping, path: Path) -> Any:
    """The leaf or subtree at `path`; KeyError naming the missing key when there is none."""
    for key in path:
        tree = tree[key]
    return tree


def put(flat: dict[Path, Any], path: Path, value: Any) -> None:
    """Writes `value` (a leaf, or a subtree whose leaves go under `path`) into the flat tree `flat`."""
    if isinstance(value, Mapping):
        for sub, leaf in flatten(value).items():
            flat[path + sub] = leaf
    else:
        flat[path] = value


def replace_leaves(tree: Mapping, leaves: Mapping[Path, Any]) -> dict:
    """A copy of `tree` with the leaf at each path of `leaves` replaced; only the dicts on those paths
    are copied, every other subtree is shared."""
    out = dict(tree)
    heads: dict[str, dict[Path, Any]] = {}
    for path, leaf in leaves.items():
        if len(path) == 1:
            out[path[0]] = leaf
        else:
            heads.setdefault(path[0], {})[path[1:]] = leaf
    for head, sub in heads.items():
        out[head] = replace_leaves(tree[head], sub)
    return out


def copy_containers(tree: Any) -> Any:
    """A copy of every dict / list / set of `tree` (leaves shared: JAX arrays are immutable)."""
    if isinstance(tree, dict):
        return {k: copy_containers(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [copy_containers(v) for v in tree]
    if isinstance(tree, set):
        return set(tree)
    return tree


def is_abstract(tree: PyTree) -> bool:
    """True when some leaf is a `jax.ShapeDtypeStruct` (shapes only, e.g. `low_cpu_mem_usage` adapters)."""
    return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree_util.tree_leaves(tree))


def shapes(tree: PyTree) -> PyTree:
    """`tree` with every leaf replaced by its `jax.ShapeDtypeStruct`."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def count(tree: PyTree) -> int:
    """The number of scalars in `tree`'s leaves."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        n = 1
        for d in leaf.shape:
            n *= int(d)
        total += n
    return total


def path_str(path: Path) -> str:
    """The '/'-joined form of a path (what sharding rules match), e.g. `model/layers/0/mlp/up_proj/kernel`."""
    return "/".join(str(p) for p in path)


def key_path(keypath: tuple) -> Path:
    """A `jax.tree_util` key path (DictKey, GetAttrKey, SequenceKey entries) as a path of strings."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath)
