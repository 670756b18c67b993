"""The NumPy reference maths of MiSS (docs/DESIGN.md §1), written once, loop by loop, for every test.

Everything is float64 and torch layout (`(out, in)` weights) unless a function says otherwise.
"""

from __future__ import annotations

import numpy as np


def ref_balance_output(x: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Adapter term of balance: `sum_i x[..., i] * block[i mod r, :]`; x `(..., in)`, block `(r, out)`."""
    r = block.shape[0]
    out = np.zeros(x.shape[:-1] + (block.shape[1],), np.float64)
    for i in range(x.shape[-1]):
        out += x[..., i : i + 1].astype(np.float64) * block[i % r].astype(np.float64)
    return out


def ref_dense_delta(block: np.ndarray, in_features: int) -> np.ndarray:
    """Torch-layout dense update `dW[o, i] = block[i mod r, o]`, `(out, in)`."""
    r, out_features = block.shape
    delta = np.zeros((out_features, in_features), np.float64)
    for o in range(out_features):
        for i in range(in_features):
            delta[o, i] = block[i % r, o]
    return delta


def ref_expand_mini(block: np.ndarray, out_features: int) -> np.ndarray:
    """Mini block `(r, mini_r)` -> `(r, out)`: column j is `block[:, j mod mini_r]`."""
    cols = [block[:, j % block.shape[1]] for j in range(out_features)]
    return np.stack(cols, axis=1)


def ref_bat(weight: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Torch-layout `W'[a, c] = W[a, c] + W[a, c] @ B[a] + B[a]` over r x r blocks; weight `(out, in)`."""
    r = block.shape[-1]
    w = weight.astype(np.float64)
    out = w.copy()
    for a in range(w.shape[0] // r):
        for c in range(w.shape[1] // r):
            blk = w[a * r : (a + 1) * r, c * r : (c + 1) * r]
            out[a * r : (a + 1) * r, c * r : (c + 1) * r] = blk + blk @ block[a] + block[a]
    return out


def to_layout(weight: np.ndarray, layout: str) -> np.ndarray:
    """Torch-layout `(out, in)` weight in `layout`."""
    return weight.T if layout == "flax" else weight


def rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def ref_merge(weight: np.ndarray, block: np.ndarray, variant: str) -> np.ndarray:
    """Torch-layout weight `(out, in)` with a MiSS block merged in (`variant`: balance, mini or bat)."""
    if variant == "bat":
        return ref_bat(weight, block)
    full = ref_expand_mini(block, weight.shape[0]) if variant == "mini" else block
    return weight.astype(np.float64) + ref_dense_delta(full, weight.shape[1])
