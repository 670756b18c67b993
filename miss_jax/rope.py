"""Rotary position embeddings as transformers' PyTorch models compute them (`modeling_rope_utils`'s
`ROPE_INIT_FUNCTIONS`, `apply_rotary_pos_emb`): the inverse frequencies of a config and the rotation. One
home for the Linen fidelity fix (`miss_jax.fidelity`) and the tunix models built from a transformers folder
(`interop.tunix_models`).

Layout: transformers' `rotate_half` pairs feature `i` with `i + head_dim // 2` (the halves, not neighbours),
so a head is rotated as `[x1 cos - x2 sin, x2 cos + x1 sin]` with `x1, x2` its halves and angle
`position * inv_freq[i]`; YaRN also scales cos and sin (its attention factor).

>>> import numpy as np
>>> inv_freq, scale = frequencies(4, 10000.0)
>>> np.allclose(inv_freq, [1.0, 0.01]), scale
(True, 1.0)
>>> frequencies(4, 10000.0, {"rope_type": "linear", "factor": 2.0})[0].tolist()
[0.5, 0.004999999888241291]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

# "dynamic" is "default" within `max_position_embeddings`, which miss-jax's forward never exceeds
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
REQUIRED_KEYS = {"linear": ("factor",), "yarn": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def scaling_type(rope_scaling: Optional[Mapping[str, Any]]) -> str:
    """The `rope_type` (or legacy `type`) of a `rope_scaling` dict; "default" for None."""
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def frequencies(head_dim: int, rope_theta: float, rope_scaling: Optional[Mapping[str, Any]] = None,
                max_position_embeddings: Optional[int] = None) -> tuple[np.ndarray, float]:
    """transformers' `inv_freq` `(head_dim // 2,)` float32 for `rope_theta` and `rope_scaling`, and the cos/sin
    scale (`attention_scaling`: 1 but for YaRN). ValueError naming the type for one outside `ROPE_TYPES`, or
    the keys a type lacks."""
    kind, scaling = scaling_type(rope_scaling), dict(rope_scaling or {})
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not computed (only {', '.join(ROPE_TYPES)}).")
    missing = [k for k in REQUIRED_KEYS.get(kind, ()) if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {kind!r} lacks {missing}; re-save the config with transformers.")
    # float32 as torch computes it: int64 arange -> float32, theta ** (...) in float32
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(rope_theta) ** exponents)).astype(np.float32)
    if kind == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32), 1.0
    if kind == "llama3":
        return llama3_frequencies(inv_freq, scaling), 1.0
    if kind == "yarn":
        return yarn_frequencies(float(rope_theta), head_dim, scaling, max_position_embeddings)
    return inv_freq, 1.0


def llama3_frequencies(inv_freq: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    """Llama 3.1's scaling of `inv_freq` `(n,)`: wavelengths longer than `context / low_freq_factor` are divided
    by `factor`, shorter than `context / high_freq_factor` kept, those between blended smoothly."""
    factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    context = float(scaling["original_max_position_embeddings"])
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > context / low, inv_freq / np.float32(factor), inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def yarn_frequencies(base: float, dim: int, scaling: Mapping[str, Any],
                     max_position_embeddings: Optional[int]) -> tuple[np.ndarray, float]:
    """YaRN: inv_freq `(dim // 2,)` blended between interpolation and extrapolation, and its attention factor."""
    factor = scaling["factor"]
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (np.arange(0, dim, 2).astype(np.float32) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention)


def rotate(inputs: jax.Array, positions: jax.Array, inv_freq: Any, scale: float = 1.0) -> jax.Array:
    """RoPE on `inputs` `(batch, seq, heads, head_dim)` at integer `positions` `(batch, seq)` with frequencies
    `inv_freq` `(head_dim // 2,)` and cos/sin times `scale`: float32 maths, `inputs`' dtype out."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # (batch, seq, half)
    angles = angles[..., None, :]  # over the heads
    sin, cos = jnp.sin(angles) * scale, jnp.cos(angles) * scale
    first, second = jnp.split(inputs.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return out.astype(inputs.dtype)
