"""Generation with MiSS adapters: transformers' own Flax `generate`, run under the adapter plan.

`generate(peft_model, input_ids, ...)` runs the wrapped model's `generate` (greedy, sampling, beam
search, with its KV cache) inside `linen.apply`, so every decoding step, and the encoder pass of an
encoder-decoder, goes through the MiSS interceptor (balance/mini) and the param overlay (bat,
`modules_to_save`, trained biases) of the current plan. Merged adapters are in `params` already, and
`disable_adapter()` gives an empty plan.

The whole generation is one `jax.jit` program. Its traced arguments are the params, the adapter
params, `input_ids` and every array keyword (`attention_mask`, `prng_key`, `decoder_input_ids`,
...); the plan and the other keywords (`max_new_tokens`, `do_sample`, `num_beams`, ...) are static.
Programs are keyed on the model's configuration as it is now (`programs.model_key`), the plan, the
static keywords, the generation config in effect (transformers' rule: `model.generation_config`, or one
rebuilt from an edited `model.config`, `effective_generation_config`) and the input shapes; each model
holds its most recent ones (`programs.ProgramCache`), freed with it, so a second call with the same
shapes and options does not trace again.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import linen, programs
from .adapters import Plan

PyTree = Any
Statics = tuple[tuple[str, Any], ...]

_PROGRAMS = programs.ProgramCache(16)  # per base model; the least recently used program is dropped first


def generate(
    peft_model: Any,
    input_ids: Any,
    attention_mask: Optional[Any] = None,
    *,
    params: Optional[Mapping] = None,
    adapter_params: Optional[Mapping] = None,
    trace: bool = True,
    **kwargs: Any,
) -> Any:
    """Generates from `input_ids` with the active adapters; transformers' Flax `generate` options apply.

    Args:
      peft_model: a `MissModel` whose base model can generate (a causal LM or an encoder-decoder).
      input_ids: `(batch, prompt_len)` int token ids (the encoder input of an encoder-decoder).
      attention_mask: `(batch, prompt_len)` 0/1 mask (left padding for decoder-only models), or None.
      params / adapter_params: override `peft_model.params` / `peft_model.adapter_params`.
      trace: False runs the decoding loop eagerly, step by step (transformers' debug mode); no jit.
      **kwargs: generation options (`max_new_tokens`, `max_length`, `do_sample`, `temperature`,
        `top_k`, `top_p`, `num_beams`, `prng_key`, `generation_config`, `logits_processor`, ...) and
        model inputs (`decoder_input_ids`, ...), as for the base model's `generate`.

    Returns:
      The base model's output: `.sequences` `(batch, max_length)` int32, prompt included (for an
      encoder-decoder, the decoder sequence); beam search gives `(batch, max_length)` best beams and
      `.scores`. Finished rows are filled with `pad_token_id`.

    Raises:
      ValueError: the base model cannot generate, `adapter_names=` is passed, the prompt does not fit
        `max_length` or the model's positions, a keyword is neither an array nor hashable, or an active
        adapter has no weights yet. Nothing is changed on the model.
    """
    model = peft_model.base_model
    _check_can_generate(model)
    _check_kwargs(kwargs)
    input_ids = _as_ids(input_ids)
    kwargs["generation_config"] = effective_generation_config(model, kwargs.get("generation_config"))
    _check_lengths(model, input_ids, kwargs)
    plan = peft_model.plan
    peft_model.require_weights(plan.applied)
    if attention_mask is not None:
        kwargs["attention_mask"] = jnp.asarray(attention_mask)
    arrays, statics = _split(kwargs)
    params = peft_model.params if params is None else params
    adapter_params = peft_model.adapter_params if adapter_params is None else adapter_params
    if not trace:
        return _run(model, plan, statics + (("trace", False),), params, adapter_params, input_ids, arrays)
    key = (programs.model_key(model), plan, _key(statics), programs.shapes((input_ids, arrays)))

    def build(current: Callable[[], Any]) -> Callable:
        return jax.jit(lambda *args: _run(current(), plan, statics, *args))

    return _PROGRAMS.get(model, key, build)(params, adapter_params, input_ids, arrays)


# --------------------------------------------------------------------------- the program


def _run(model: Any, plan: Plan, statics: Statics, params: Mapping, adapter_params: Mapping,
         input_ids: jax.Array, arrays: dict[str, PyTree]) -> Any:
    """`model.generate(input_ids, params=..., **arrays, **statics)` with `plan`'s adapters applied."""
    call = lambda p, *a, **k: model.generate(*a, params=p, **k)  # noqa: E731
    kwargs = {**arrays, **{k: _thaw(v) for k, v in statics}}
    return linen.apply(plan, call, params, adapter_params, input_ids, **kwargs)


def effective_generation_config(model: Any, generation_config: Optional[Any] = None) -> Any:
    """The generation config transformers' Flax `generate` uses (4.x): `generation_config` if given, else
    `model.generation_config`, or, when that one was made from the model config and never edited, one made
    again from `model.config` as it is now (transformers' legacy rule, with its warning: an edit of
    `model.config.eos_token_id` or `max_length` takes effect; as transformers does, that one then becomes
    `model.generation_config`). A copy is returned."""
    if generation_config is not None:
        return copy.deepcopy(generation_config)
    current = model.generation_config
    # transformers' own attributes for this rule (`FlaxGenerationMixin.generate`)
    untouched = getattr(current, "_original_object_hash", None) == hash(current)
    if getattr(current, "_from_model_config", False) and untouched:
        rebuilt = type(current).from_model_config(model.config)
        if rebuilt != current:
            warnings.warn(
                "You have modified the pretrained model configuration to control generation. This is a deprecated "
                "strategy to control generation and will be removed soon, in a future version. Please use and modify "
                "the model generation configuration (see "
                "https://huggingface.co/docs/transformers/generation_strategies#default-text-generation-configuration )"
            )
            model.generation_config = rebuilt
            return copy.deepcopy(rebuilt)
    return copy.deepcopy(current)


def _split(kwargs: Mapping[str, Any]) -> tuple[dict[str, PyTree], Statics]:
    """Array keywords (pytrees of arrays: traced) and the rest, frozen and sorted (static, hashable)."""
    arrays, statics = {}, []
    for k, v in kwargs.items():
        leaves = jax.tree_util.tree_leaves(v)
        if leaves and all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves):
            arrays[k] = v
            continue
        frozen = _freeze(v)
        try:
            hash(frozen)
        except TypeError:
            raise ValueError(
                f"generate({k}=...) got a {type(v).__name__}, which is neither an array (traced) nor hashable "
                "(static): pass arrays, or plain Python values (numbers, strings, lists, tuples)."
            ) from None
        statics.append((k, frozen))
    return arrays, tuple(sorted(statics, key=lambda kv: kv[0]))


def _freeze(value: Any) -> Any:
    """A hashable stand-in: lists become tuples (recursively), a GenerationConfig a private copy."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if type(value).__name__ == "GenerationConfig":  # by value; copied so later edits cannot alias (no import:
        # miss_jax imports without transformers, which only transformers' own models bring)
        return copy.deepcopy(value)
    return value


def _key(statics: Statics) -> Statics:
    """`statics` with each GenerationConfig as its JSON (hashed once here, not at every look-up of the key)."""
    return tuple((k, v.to_json_string(ignore_metadata=True) if type(v).__name__ == "GenerationConfig" else v)
                 for k, v in statics)


def _thaw(value: Any) -> Any:
    """Undoes `_freeze` for transformers: tuples back to lists (it tests `isinstance(x, list)`)."""
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


# --------------------------------------------------------------------------- checks (before any work)


def _check_can_generate(model: Any) -> None:
    can = getattr(model, "can_generate", None)
    if not callable(getattr(model, "generate", None)) or not callable(can) or not can():
        raise ValueError(
            f"{type(model).__name__} cannot generate: it has no language-model head. Load the adapter into a "
            "generation class of the same architecture (a Flax ...ForCausalLM or ...ForConditionalGeneration), "
            "or call the model, peft_model(...), for this class's own outputs."
        )


def _check_kwargs(kwargs: Mapping[str, Any]) -> None:
    if "adapter_names" in kwargs:
        raise ValueError(
            "adapter_names= (PEFT's mixed-adapter batches) is not supported for MiSS, in PyTorch PEFT either (its "
            "MissModel ignores it). Generate each group of rows separately: peft_model.set_adapter(name), then "
            "peft_model.generate(rows, ...)."
        )


def _as_ids(input_ids: Any) -> jax.Array:
    """`input_ids` as a `(batch, prompt_len)` integer array."""
    if input_ids is None:
        raise ValueError("generate() needs input_ids, a (batch, prompt_len) array of token ids.")
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"input_ids must be a (batch, prompt_len) integer array with prompt_len >= 1, got shape {ids.shape} "
            f"{ids.dtype}; add a batch axis with input_ids[None] for a single prompt."
        )
    return ids


def _check_lengths(model: Any, input_ids: jax.Array, kwargs: Mapping[str, Any]) -> None:
    """The decoded sequence must be longer than its prompt and fit the model's positions
    (`programs.max_positions`, the rule the forward checks too).

    transformers only logs a warning for a prompt as long as `max_length`, then decodes garbage or never
    stops; a position past the model's position table is read silently (garbage, not an error).
    """
    if model.config.is_encoder_decoder:
        decoder_ids = kwargs.get("decoder_input_ids")
        prompt, what = (1, "the decoder start token") if decoder_ids is None else (
            np.shape(decoder_ids)[-1], "decoder_input_ids")
    else:
        prompt, what = input_ids.shape[1], "input_ids"
    max_length = _max_length(model, prompt, kwargs)
    if max_length <= prompt:
        raise ValueError(
            f"{what} has {prompt} tokens but max_length is {max_length}, which leaves no token to generate: pass "
            f"max_new_tokens=N (the number of tokens to add), or a max_length larger than {prompt}."
        )
    limit = programs.max_positions(model)
    longest = max(max_length, input_ids.shape[1])
    if limit is not None and longest > limit:
        encoder = f"; the encoder's input_ids have {input_ids.shape[1]} tokens" if what != "input_ids" else ""
        raise ValueError(
            f"Generation needs {longest} positions but this {type(model).__name__} has {limit}: {what} has "
            f"{prompt} tokens and max_length is {max_length} (max_new_tokens={max_length - prompt}){encoder}. Lower "
            f"max_new_tokens/max_length, or shorten the prompt, so that at most {limit} positions are used."
        )


def _max_length(model: Any, prompt: int, kwargs: Mapping[str, Any]) -> int:
    """The `max_length` transformers' Flax `generate` will use (its own rules, transformers 4.x)."""
    config = copy.deepcopy(kwargs["generation_config"])
    config.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
    if config.max_new_tokens is not None:  # `update` validated it (> 0)
        return prompt + config.max_new_tokens
    default = type(config)().max_length  # transformers' default GenerationConfig
    if kwargs.get("max_length") is None or config.max_length != default:
        return config.max_length
    # an explicit max_length equal to the default (20) is widened by the prompt, as transformers does (capped by
    # the config's max_position_embeddings, its own rule; `_check_lengths` then checks `programs.max_positions`)
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(default + prompt, limit) if limit is not None else default + prompt
