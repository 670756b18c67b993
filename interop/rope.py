"""Rotary position embeddings as transformers 4.x computes them for Llama and Qwen 3 (`modeling_rope_utils`,
`apply_rotary_pos_emb`): the inverse frequencies of a `config.json` and the rotation.

Layout: transformers' `rotate_half` pairs feature `i` with `i + head_dim // 2` (the halves, not neighbours),
so a head `(..., head_dim)` is rotated as `[x1 cos - x2 sin, x2 cos + x1 sin]` with `x1, x2` its halves and
angle `position * inv_freq[i]`. Scaling types: `default`, `linear` (frequencies divided by `factor`) and
`llama3` (Llama 3.1's smooth blend of low and high frequencies); the others (`dynamic`, `yarn`, `longrope`,
...) change the attention's scale or depend on the sequence length and are refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

SCALING_TYPES = ("default", "linear", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def scaling_type(rope_scaling: Optional[Mapping[str, Any]]) -> str:
    """The `rope_type` (or legacy `type`) of a `rope_scaling` dict; `default` for None."""
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def inverse_frequencies(head_dim: int, rope_theta: float,
                        rope_scaling: Optional[Mapping[str, Any]] = None) -> np.ndarray:
    """`(head_dim // 2,)` float32: transformers' `inv_freq` for `rope_theta` and `rope_scaling`
    (`1 / theta ** (2i / head_dim)`, then the scaling). ValueError naming the field for a scaling type
    outside `SCALING_TYPES` or a missing scaling key."""
    kind = scaling_type(rope_scaling)
    if kind not in SCALING_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported (only {', '.join(SCALING_TYPES)}): it changes "
                         "the attention beyond the rotary frequencies.")
    # float32 as torch computes it: int64 arange -> float32, theta ** (...) in float32
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(rope_theta) ** exponents)).astype(np.float32)
    scaling = dict(rope_scaling or {})
    needed = {"linear": ("factor",), "llama3": LLAMA3_KEYS}.get(kind, ())
    missing = [k for k in needed if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {kind!r} lacks {missing}; re-save the config with transformers.")
    if kind == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        return llama3_frequencies(inv_freq, **{k: float(scaling[k]) for k in LLAMA3_KEYS})
    return inv_freq


def llama3_frequencies(inv_freq: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_max_position_embeddings: float) -> np.ndarray:
    """Llama 3.1's scaling of `inv_freq` `(n,)`: wavelengths longer than `context / low_freq_factor` are
    divided by `factor`, shorter than `context / high_freq_factor` kept, those between blended smoothly."""
    wavelen = np.float32(2 * math.pi) / inv_freq
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rotate(inputs: jax.Array, positions: jax.Array, inv_freq: Any) -> jax.Array:
    """RoPE on `inputs` `(batch, seq, heads, head_dim)` at integer `positions` `(batch, seq)` with frequencies
    `inv_freq` `(head_dim // 2,)`: the halves rotated by `position * inv_freq`, in `inputs`' dtype."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # (batch, seq, half)
    angles = angles[..., None, :]  # over the heads
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    first, second = jnp.split(inputs.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return out.astype(inputs.dtype)
