"""Fidelity: the transformers Flax model computes what the PyTorch model of the same config computes, or is refused.

transformers 4.x's Flax code ignores some config fields its PyTorch twin honours (docs/DESIGN.md §6 has the
audit table). Wrapping a model (`MissModel`, so `get_peft_model` and `MissModel.from_pretrained`) calls
`make_faithful`, which, for the families it knows:
  * **RoPE** (Llama, Mistral, Gemma): the Flax rotary embedding hard-codes `rope_theta=10000` and no
    `rope_scaling`. The model's class is swapped, in place, for a subclass of the same name whose `__call__`
    runs under `rope_interceptor`: the rotary embedding then computes `cos/sin` from the config's
    `rope_theta` and `rope_scaling` ("linear", "dynamic", "yarn", "llama3"; PyTorch's `ROPE_INIT_FUNCTIONS`
    redone in NumPy, `rope_frequencies`). Every forward, train step, `generate` and the plain model
    `merge_and_unload()` returns go through that `__call__`.
  * **tied embeddings** (Llama, Mistral): Flax keeps `lm_head` as its own (from PyTorch: randomly
    initialised) kernel; `make_faithful` sets it to the input embedding's transpose in the params.
  * **sliding window** (Mistral): Flax masks `i - j <= sliding_window` (PyTorch: `< sliding_window`) and
    attends to the diagonal only when it is None; the model's module gets a config whose window gives
    PyTorch's mask (the user-facing `model.config` is untouched).
  * fields no fix covers (`mlp_bias`, a `head_dim` other than `hidden_size // num_attention_heads` where the
    Flax code derives it, `partial_rotary_factor`, "longrope") raise `UnfaithfulConfig` naming the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from . import rope

# model_type -> the class name of its Flax rotary embedding (called as `rotary(key, query, position_ids)`)
ROTARY_MODULES = {"llama": "FlaxLlamaRotaryEmbedding", "mistral": "FlaxMistralRotaryEmbedding",
                  "gemma": "FlaxGemmaRotaryEmbedding"}
FLAX_ROPE_THETA = 10000.0  # what those Flax rotary embeddings hard-code
UNTIED_LM_HEAD = ("llama", "mistral")  # Flax families that ignore `tie_word_embeddings`
HEAD_DIM_DERIVED = ("llama", "mistral")  # Flax families that derive head_dim as hidden_size // heads
WINDOWED = ("mistral",)  # Flax families masking with `config.sliding_window`


class UnfaithfulConfig(ValueError):
    """The config asks for something transformers' Flax code of this family does not compute, and no
    fidelity fix covers it: running it would silently differ from PyTorch."""


@dataclasses.dataclass(frozen=True)
class Fixes:
    """What `make_faithful` does to one model (from `audit(config)`)."""

    rope: bool = False  # run the rotary embedding under `rope_interceptor`
    tie: bool = False  # lm_head's kernel := embed_tokens' embedding transposed
    window: Optional[int] = None  # the Flax `sliding_window` giving PyTorch's mask (None: leave the config's)

    def swaps_class(self) -> bool:
        return self.rope or self.window is not None


def rope_type(config: Any) -> str:
    """The config's RoPE type ("default" without `rope_scaling`; `miss_jax.rope.scaling_type`)."""
    return rope.scaling_type(getattr(config, "rope_scaling", None))


def refuse(config: Any, field: str, problem: str, fix: str) -> UnfaithfulConfig:
    name = getattr(config, "model_type", "?")
    return UnfaithfulConfig(
        f"transformers' Flax {name} model would silently differ from PyTorch: {field} {problem}, and miss-jax does not "
        f"compute it. {fix}"
    )


# (families, field, is it set to a value the Flax code does not compute?, what PyTorch does with it, the fix)
REFUSALS: tuple[tuple[tuple[str, ...], str, Callable[[Any], bool], str, str], ...] = (
    (("llama",), "mlp_bias", bool, "adds biases to gate/up/down_proj, which the Flax MLP has no params for",
     "Use the PyTorch model (miss-jax cannot add the MLP biases)."),
    (tuple(ROTARY_MODULES), "partial_rotary_factor", lambda v: v not in (None, 1.0), "rotates part of each head only",
     "Use the PyTorch model."),
    (("bert", "roberta"), "position_embedding_type", lambda v: v not in (None, "absolute"),
     "adds relative position embeddings to the attention scores, which the Flax attention does not have",
     "Use a checkpoint with position_embedding_type='absolute', or the PyTorch model."),
)


def audit(config: Any) -> Fixes:
    """The fixes a model of `config` needs; raises `UnfaithfulConfig` for a field that cannot be honoured."""
    family = getattr(config, "model_type", None)
    for families, field, unsupported, problem, fix in REFUSALS:
        value = getattr(config, field, None)
        if family in families and unsupported(value):
            raise refuse(config, f"{field}={value!r}", problem, fix)
    if family not in ROTARY_MODULES:
        return Fixes()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None)
    if family in HEAD_DIM_DERIVED and head_dim not in (None, config.hidden_size // heads):
        raise refuse(config, f"head_dim={head_dim}", f"differs from hidden_size // num_attention_heads = "
                     f"{config.hidden_size // heads} (the Flax code's head size)",
                     "Use the PyTorch model, or a checkpoint with head_dim * num_attention_heads == hidden_size.")
    kind = rope_type(config)
    if kind not in rope.ROPE_TYPES:
        raise refuse(config, f"rope_scaling type {kind!r}", "scales RoPE in a way the Flax rotary embedding lacks "
                     "(longrope: frequencies switched by the sequence length)",
                     f"miss-jax computes rope_scaling types {list(rope.ROPE_TYPES)}; use the PyTorch model.")
    swap_rope = kind != "default" or float(getattr(config, "rope_theta", FLAX_ROPE_THETA)) != FLAX_ROPE_THETA
    tie = family in UNTIED_LM_HEAD and bool(getattr(config, "tie_word_embeddings", False))
    window = None
    if family in WINDOWED:
        w = getattr(config, "sliding_window", None)
        # PyTorch attends to keys with i - j < w (all of them when w is None); Flax to i - j <= its window.
        window = config.max_position_embeddings if w is None or w >= config.max_position_embeddings else w - 1
        if window < 1:
            raise refuse(config, f"sliding_window={w}", "is below 2", "Use a window of at least 2 positions.")
        window = None if window == w else window
    return Fixes(rope=swap_rope, tie=tie, window=window)


def rope_frequencies(config: Any, head_dim: int) -> tuple[np.ndarray, float]:
    """PyTorch's RoPE inverse frequencies `(head_dim // 2,)` float32 and the cos/sin scale for `config`
    (`miss_jax.rope.frequencies`)."""
    return rope.frequencies(head_dim, float(getattr(config, "rope_theta", FLAX_ROPE_THETA)),
                            getattr(config, "rope_scaling", None), getattr(config, "max_position_embeddings", None))


@contextlib.contextmanager
def rope_interceptor(config: Any) -> Iterator[None]:
    """Within this context, the family's Flax rotary embedding computes `config`'s RoPE (`rope_frequencies`)."""
    name = ROTARY_MODULES[config.model_type]
    tables: dict[int, tuple[np.ndarray, float]] = {}

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.method_name != "__call__" or type(context.module).__name__ != name:
            return next_fun(*args, **kwargs)
        key, query, position_ids = args
        dim = key.shape[-1]
        if dim not in tables:
            tables[dim] = rope_frequencies(config, dim)
        inv_freq, scale = tables[dim]
        dtype = context.module.dtype
        return tuple(jnp.asarray(rope.rotate(x, position_ids, inv_freq, scale), dtype=dtype) for x in (key, query))

    with nn.intercept_methods(interceptor):
        yield


@functools.lru_cache(maxsize=None)
def faithful_class(cls: type) -> type:
    """A subclass of the transformers Flax model class `cls` (same name) whose `__call__` runs its RoPE as
    PyTorch does (`rope_interceptor` of the model's config). Cached: one class per base class."""

    @functools.wraps(cls.__call__)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        with rope_interceptor(self.config) if audit(self.config).rope else contextlib.nullcontext():
            return cls.__call__(self, *args, **kwargs)

    def adopt_module(self: Any, module: Any) -> None:
        """Replaces the Linen module the model applies (`FlaxPreTrainedModel.module`)."""
        self._module = module

    return type(cls.__name__, (cls,), {"__call__": __call__, "adopt_module": adopt_module,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                       "faithful": True})


def make_faithful(model: Any, params: Mapping) -> Mapping:
    """Makes the transformers Flax `model` compute what its PyTorch twin computes (see the module docstring),
    in place, and returns `params` with the param-level fixes (a tied `lm_head`). Raises `UnfaithfulConfig`
    (and leaves the model as it was) for a config field no fix covers. Idempotent."""
    config = getattr(model, "config", None)
    fixes = audit(config) if config is not None else Fixes()
    if fixes.swaps_class() and not getattr(model, "faithful", False):
        model.__class__ = faithful_class(type(model))
        if fixes.window is not None:
            flax_config = type(config).from_dict(config.to_dict())
            flax_config.sliding_window = fixes.window
            model.adopt_module(model.module.clone(config=flax_config))
    return tie_lm_head(params) if fixes.tie else params


def tie_lm_head(params: Mapping) -> dict:
    """`params` with `lm_head.kernel` `(hidden, vocab)` set to `model.embed_tokens.embedding` `(vocab, hidden)`
    transposed (PyTorch's tied output embedding), in the embedding's dtype."""
    embedding = params["model"]["embed_tokens"]["embedding"]
    return {**params, "lm_head": {**params.get("lm_head", {}), "kernel": jnp.asarray(embedding).T}}
