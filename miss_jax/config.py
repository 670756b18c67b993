"""`MissConfig`: PEFT 0.21's MiSS configuration, same field names, defaults and validation.

The config is a frozen dataclass (change it with `dataclasses.replace`). It round-trips through the
JSON shape of PEFT's `adapter_config.json` (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Union

from . import ops

PEFT_TYPE = "MISS"
PEFT_VERSION = "0.21.2"  # the PEFT release whose file format and semantics miss-jax reproduces
ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "MiSS_only")
TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)

InitWeights = Union[bool, str]  # True/False (balance), or another variant's name (`ops.VARIANTS`)
Targets = Union[str, tuple[str, ...], None]


def _names(value: Any, field: str) -> Targets:
    """Normalises a module-name field: None, a regex string, or a tuple of names."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Iterable):
        names = tuple(sorted(set(value))) if isinstance(value, (set, frozenset)) else tuple(value)
        if not all(isinstance(n, str) for n in names):
            raise ValueError(f"`{field}` must be a list of module names or a regex string, got {value!r}.")
        return names
    raise ValueError(f"`{field}` must be a list of module names or a regex string, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class MissConfig:
    """Configuration of one MiSS adapter (PEFT's `MissConfig`, field for field).

    Args:
      r: shard size along `in_features`; the trainable block is `(r, out)`. Must be `<= in_features`.
      miss_dropout: dropout on the adapter input (balance / mini only, training only).
      mini_r: with `init_weights="mini"`, the block is `(r, mini_r)`, tiled over `out_features`.
      target_modules: module names (exact, or suffix at a `.` boundary), a full-match regex, or
        `"all-linear"`. None: PEFT's default for the model's `config.model_type`.
      exclude_modules: names or regex of modules never to adapt.
      init_weights: True (balance, zeros), False (balance, kaiming-uniform), "bat", or "mini".
      layers_to_transform: layer index or indices to adapt (not with a regex `target_modules`).
      layers_pattern: the name of the layer list (e.g. "layers", "h") used with layers_to_transform.
      bias: "none", "all" (every bias trainable) or "MiSS_only" (biases of adapted layers).
      modules_to_save: modules trained in full and saved with the adapter (e.g. "classifier").
      task_type, base_model_name_or_path, revision, inference_mode: as in PEFT.

    >>> MissConfig(r=8, target_modules=["q_proj", "v_proj"]).to_dict()["target_modules"]
    ['q_proj', 'v_proj']
    """

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    target_modules: Targets = None
    exclude_modules: Targets = None
    init_weights: InitWeights = True
    layers_to_transform: Union[int, tuple[int, ...], None] = None
    layers_pattern: Union[str, tuple[str, ...], None] = None
    bias: str = "none"
    modules_to_save: Union[tuple[str, ...], None] = None
    task_type: Union[str, None] = None
    base_model_name_or_path: Union[str, None] = None
    revision: Union[str, None] = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("target_modules", _names(self.target_modules, "target_modules"))
        set_("exclude_modules", _names(self.exclude_modules, "exclude_modules"))
        if isinstance(self.modules_to_save, str):  # one module name (PEFT's list of one)
            set_("modules_to_save", (self.modules_to_save,))
        elif self.modules_to_save is not None:
            set_("modules_to_save", _names(self.modules_to_save, "modules_to_save"))
        for field in ("r", "mini_r"):  # NumPy integers (e.g. from a sweep) are ints too
            value = getattr(self, field)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                set_(field, int(value))
        if isinstance(self.layers_to_transform, (list, tuple)):
            set_("layers_to_transform", tuple(self.layers_to_transform))
        if isinstance(self.layers_pattern, list):
            set_("layers_pattern", tuple(self.layers_pattern))
        if isinstance(self.bias, str) and self.bias.lower() == "miss_only":
            set_("bias", "MiSS_only")
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r!r}.")
        if isinstance(self.mini_r, bool) or not isinstance(self.mini_r, int) or self.mini_r <= 0:
            raise ValueError(f"`mini_r` should be a positive integer value but the value passed is {self.mini_r!r}.")
        if not isinstance(self.miss_dropout, (int, float)) or not 0.0 <= self.miss_dropout < 1.0:
            raise ValueError(f"`miss_dropout` must be a float in [0, 1), got {self.miss_dropout!r}.")
        ops.variant_of(self.init_weights)  # raises for an unknown value
        if self.bias not in BIAS_MODES:
            raise ValueError(f"Unknown `bias` {self.bias!r}; allowed: {', '.join(map(repr, BIAS_MODES))}.")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"Unknown `task_type` {self.task_type!r}; allowed: None or one of {TASK_TYPES}.")
        if isinstance(self.target_modules, str):  # as PEFT: a regex or "all-linear"
            if self.layers_to_transform is not None:
                raise ValueError(
                    "`layers_to_transform` cannot be used when `target_modules` is a str (a regex or 'all-linear'): "
                    "put the layer indices into the regex, or pass `target_modules` as a list of names."
                )
            if self.layers_pattern is not None:
                raise ValueError(
                    "`layers_pattern` cannot be used when `target_modules` is a str (a regex or 'all-linear'): pass "
                    "`target_modules` as a list of names."
                )
        lt = self.layers_to_transform
        if lt is not None and not (
            (isinstance(lt, int) and not isinstance(lt, bool)) or all(isinstance(i, int) for i in lt)
        ):
            raise ValueError(f"`layers_to_transform` must be an int or a list of ints, got {lt!r}.")

    @property
    def peft_type(self) -> str:
        return PEFT_TYPE

    @property
    def variant(self) -> str:
        """The name of the variant `init_weights` selects ('balance', 'mini' or 'bat')."""
        return ops.variant_of(self.init_weights).name

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of PEFT's `adapter_config.json` for this config."""
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        d.update(peft_type=PEFT_TYPE, peft_version=PEFT_VERSION, auto_mapping=None)
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MissConfig":
        """Reads an `adapter_config.json` object; unknown fields (newer PEFT) warn and are ignored."""
        peft_type = d.get("peft_type", PEFT_TYPE)
        if peft_type != PEFT_TYPE:
            raise ValueError(f"This is a {peft_type!r} adapter config, not a MiSS one (peft_type 'MISS').")
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = {"peft_type", "peft_version", "auto_mapping"}
        unknown = sorted(set(d) - known - ignored)
        if unknown:
            warnings.warn(
                f"Ignoring adapter_config fields unknown to miss-jax (from a newer PEFT?): {unknown}.", stacklevel=2
            )
        return cls(**{k: v for k, v in d.items() if k in known})
