"""Which layers an adapter goes on: module discovery and PEFT's matching rules.

A module's *key* is its Linen scope path joined with `.`, e.g. `model.layers.0.self_attn.q_proj`;
for transformers' Flax models it equals the torch module path of the same architecture.
Matching follows PEFT 0.21 (`check_target_module_exists`): a list entry matches the key exactly or
as a suffix at a `.` boundary; a string is a full-match regex; `layers_to_transform` picks layer
indices (found through `layers_pattern`, or the first numbered segment); `exclude_modules` and
`modules_to_save` are never adapted.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax

from .config import ALL_LINEAR, MissConfig
from .layer_rules import KernelRule, dense_general_rule

# PEFT 0.21's TRANSFORMERS_MODELS_TO_MISS_TARGET_MODULES_MAPPING (a copy of its LoRA table), for the
# architectures transformers 4.x ships in Flax, plus the ones PEFT lists.
DEFAULT_TARGETS: dict[str, Any] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
}

SEQ_CLS_HEAD_NAMES = ("score", "classifier")  # PEFT: heads all-linear leaves alone for SEQ_CLS
OUTPUT_LAYER_NAMES = ("lm_head",)  # the output embedding all-linear leaves alone
# PEFT's task wrappers (PeftModelForSequenceClassification, ...) add these heads to modules_to_save.
TASK_MODULES_TO_SAVE = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                        "QUESTION_ANS": ("qa_outputs",)}


def _conv1d_class() -> Optional[type]:
    try:
        from transformers.models.gpt2.modeling_flax_gpt2 import FlaxConv1D
    except ImportError:  # transformers without Flax
        return None
    return FlaxConv1D


def kernel_layout(module_type: type) -> Optional[str]:
    """'flax' for `nn.Dense` (kernel `(in, out)`) and `nn.DenseGeneral` (kernel `(*in_dims, *out_dims)`, whose
    `layer_rules.KernelRule` flattens it to `(in, out)`), 'torch' for GPT-2's `FlaxConv1D` (`(out, in)`), else None."""
    if issubclass(module_type, (nn.Dense, nn.DenseGeneral)):
        return "flax"
    conv1d = _conv1d_class()
    if conv1d is not None and issubclass(module_type, conv1d):
        return "torch"
    return None


@dataclasses.dataclass(frozen=True)
class Layer:
    """A module seen in the model. For linear layers `layout`, `in_features`, `out_features` are set.

    A layer whose kernel is not a 2-D matrix (`nn.DenseGeneral`, e.g. `(d_model, heads, head_dim)`) has its
    `rule` (`layer_rules.KernelRule`) and `kernel_shape`: `in_features` / `out_features` are the rule's
    flattened sizes, and the maths runs on the rule's `(in, out)` matrix (`matrix` / `kernel`), which is
    also the transpose of its torch weight. `refusal` says why a layer that looks linear cannot carry MiSS
    (e.g. a DenseGeneral with `batch_dims`); such a layer is not linear.
    """

    path: tuple[str, ...]
    type_name: str
    layout: Optional[str] = None
    in_features: int = 0
    out_features: int = 0
    has_bias: bool = False
    rule: Optional[KernelRule] = None
    kernel_shape: tuple[int, ...] = ()
    refusal: Optional[str] = None

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def is_linear(self) -> bool:
        return self.layout is not None

    def matrix(self, kernel: jax.Array) -> jax.Array:
        """The kernel as the 2-D matrix `ops` works on, in `layout`: `(in, out)` for a rule's kernel
        `kernel_shape` (flattened row-major over its in and out axes), the kernel itself otherwise."""
        return kernel if self.rule is None else self.rule.to_matrix(kernel)

    def kernel(self, matrix: jax.Array) -> jax.Array:
        """`matrix`'s inverse: a 2-D `(in, out)` matrix back to the layer's kernel (`kernel_shape`)."""
        return matrix if self.rule is None else self.rule.from_matrix(matrix, self.kernel_shape)

    def flatten_input(self, x: jax.Array) -> jax.Array:
        """The layer's input `(..., *in_dims)` as `(..., in_features)`."""
        return x if self.rule is None else self.rule.flatten_input(x, self.kernel_shape)

    def unflatten_output(self, y: jax.Array) -> jax.Array:
        """An `(..., out_features)` output as the layer's `(..., *out_dims)`."""
        return y if self.rule is None else self.rule.unflatten_output(y, self.kernel_shape)


def _linear_layer(module: nn.Module, args: tuple) -> Layer:
    """The `Layer` of a module of a class `kernel_layout` knows, called on `args` (its params are set)."""
    layout = kernel_layout(type(module))
    params = module.variables.get("params", {})
    shape = tuple(params["kernel"].shape)
    has_bias = "bias" in params
    if isinstance(module, nn.DenseGeneral):
        try:
            rule = dense_general_rule(module, args[0].ndim if args else None)
        except ValueError as e:
            return Layer(module.path, type(module).__name__, refusal=str(e))
        in_f, out_f = rule.sizes(shape)
        return Layer(module.path, type(module).__name__, layout, in_f, out_f, has_bias, rule, shape)
    in_f, out_f = (shape[0], shape[1]) if layout == "flax" else (shape[1], shape[0])
    return Layer(module.path, type(module).__name__, layout, in_f, out_f, has_bias)


def discover(init_fn: Callable[[], Any]) -> dict[str, Layer]:
    """Traces `init_fn` (a Linen `init`, run abstractly) and records every module it calls, by key.

    Nothing is computed or allocated: `init_fn` runs under `jax.eval_shape`.
    """
    seen: dict[str, Layer] = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not module.path:
            return out
        key = ".".join(module.path)
        if key in seen:
            return out
        if kernel_layout(type(module)) is None:
            seen[key] = Layer(module.path, type(module).__name__)
        else:
            seen[key] = _linear_layer(module, args)
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(init_fn)
    return seen


def _layer_index(key: str, layers_pattern: Any) -> Optional[int]:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def _in_names(key: str, names: Sequence[str]) -> bool:
    return key in names or any(key.endswith(f".{n}") for n in names)


def is_excluded(config: MissConfig, key: str) -> bool:
    """True for modules that `exclude_modules` or `modules_to_save` keep out of adaptation."""
    ex = config.exclude_modules
    if ex:
        if isinstance(ex, str) and re.fullmatch(ex, key):
            return True
        if not isinstance(ex, str) and _in_names(key, ex):
            return True
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in config.modules_to_save or ())


def matches(config: MissConfig, key: str) -> bool:
    """PEFT's rule: does `key` match `config.target_modules` (an explicit list or regex)?"""
    targets = config.target_modules
    if is_excluded(config, key):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if not _in_names(key, targets):
        return False
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, tuple) and not wanted):
        return True
    idx = _layer_index(key, config.layers_pattern)
    if idx is None:
        return False
    return idx == wanted if isinstance(wanted, int) else idx in wanted


def _shown(names: Any) -> Any:
    """A names field as the user wrote it: a list (or a regex string, or None)."""
    return list(names) if isinstance(names, tuple) else names


def _without_exclusions(config: MissConfig) -> MissConfig:
    return dataclasses.replace(config, exclude_modules=None, modules_to_save=None)


def resolve_targets(config: MissConfig, layers: dict[str, Layer], model_type: Optional[str]) -> MissConfig:
    """Fills in `target_modules` (PEFT's default table, or `"all-linear"` expanded to layer names), and adds
    the task's head to `modules_to_save` as PEFT's task wrappers do (e.g. SEQ_CLS: "classifier", "score")."""
    saved = tuple(config.modules_to_save or ())
    extra = tuple(n for n in TASK_MODULES_TO_SAVE.get(config.task_type, ()) if n not in saved)
    if extra:
        config = dataclasses.replace(config, modules_to_save=saved + extra)
    targets = config.target_modules
    if targets is None:
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"No default MiSS target modules for model_type {model_type!r}: pass `target_modules`, e.g. "
                f"MissConfig(target_modules=['q_proj', 'v_proj']) or target_modules='all-linear'."
            )
        targets = DEFAULT_TARGETS[model_type]
    elif targets == ALL_LINEAR:
        heads = SEQ_CLS_HEAD_NAMES if config.task_type == "SEQ_CLS" else ()
        targets = sorted(
            k
            for k, layer in layers.items()
            if layer.is_linear and layer.path[-1] not in OUTPUT_LAYER_NAMES and k not in heads
        )
    return dataclasses.replace(config, target_modules=targets)


def select(config: MissConfig, layers: dict[str, Layer]) -> tuple[Layer, ...]:
    """The layers `config` adapts, in model order. Raises if a target matches nothing or a non-linear layer."""
    chosen = [layer for key, layer in layers.items() if matches(config, key)]
    refused = [layer for layer in chosen if layer.refusal]
    if refused:
        raise ValueError(
            f"Cannot adapt {refused[0].key} ({refused[0].type_name}), which target_modules "
            f"{_shown(config.target_modules)!r} matches: {refused[0].refusal}"
        )
    wrong = [layer for layer in chosen if not layer.is_linear]
    if wrong:
        listed = ", ".join(f"{w.key} ({w.type_name})" for w in wrong[:5])
        raise ValueError(
            "Target modules must be linear layers (flax.linen.Dense / DenseGeneral, flax.nnx.Linear or GPT-2's "
            f"FlaxConv1D), but these matched: {listed}. Name the Dense layers inside them instead."
        )
    if not chosen:
        excluded = sorted(k for k in layers if is_excluded(config, k) and matches(_without_exclusions(config), k))
        if excluded:
            raise ValueError(
                f"Every module that target_modules {_shown(config.target_modules)!r} matches is excluded (by "
                f"exclude_modules {_shown(config.exclude_modules)!r} or modules_to_save "
                f"{_shown(config.modules_to_save)!r}): "
                f"{excluded[:10]}{' ...' if len(excluded) > 10 else ''}. Narrow the exclusions or add targets."
            )
        linear = sorted({k.rsplit(".", 1)[-1] for k, layer in layers.items() if layer.is_linear})
        asked = _shown(config.target_modules)
        hints = sorted(
            {h for t in ([asked] if isinstance(asked, str) else asked) for h in difflib.get_close_matches(t, linear, 3)}
        )
        raise ValueError(
            f"Target modules {asked!r} not found in the base model"
            + (f" (with layers_to_transform={config.layers_to_transform!r})" if config.layers_to_transform else "")
            + f". Did you mean: {hints or linear[:10]}? Linear layer names in this model: {linear}."
        )
    return tuple(chosen)
