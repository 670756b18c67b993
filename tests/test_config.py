"""`MissConfig` against PEFT 0.21's own `peft.MissConfig`: fields, defaults, JSON shape, validation, default targets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import peft
import pytest
from peft.utils.constants import TRANSFORMERS_MODELS_TO_MISS_TARGET_MODULES_MAPPING as PEFT_TARGETS

import tiny_models as tm
from miss_jax import MissConfig, get_peft_model
from miss_jax.targeting import DEFAULT_TARGETS

# Configs exercising every field (the round trips run in both directions).
CONFIGS: list[dict[str, Any]] = [
    {},
    dict(r=8, target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"], init_weights="bat",
         layers_to_transform=[0, 1]),
    dict(r=16, mini_r=4, init_weights="mini", target_modules=r".*\.(q|v)_proj", exclude_modules=r".*\.0\..*"),
    dict(r=4, init_weights=False, miss_dropout=0.1, target_modules=["query"], layers_to_transform=1,
         layers_pattern="layer", bias="MiSS_only", modules_to_save=["classifier"], task_type="SEQ_CLS"),
    dict(target_modules="all-linear", bias="all", inference_mode=True,
         base_model_name_or_path="tiny/llama", revision="main", task_type="CAUSAL_LM"),
]


def normalised(d: dict[str, Any]) -> dict[str, Any]:
    """An adapter_config.json object with name collections as sorted lists (PEFT stores them as sets)."""
    out = dict(d)
    for k in ("target_modules", "exclude_modules"):
        if isinstance(out[k], (list, set, tuple)):
            out[k] = sorted(out[k])
    return out


def peft_json(kwargs: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The adapter_config.json PEFT writes for `peft.MissConfig(**kwargs)`."""
    peft.MissConfig(**kwargs).save_pretrained(str(folder))
    return json.loads((folder / "adapter_config.json").read_text())


def test_field_names_and_defaults_equal_peft(tmp_path: Path) -> None:
    ours = MissConfig().to_dict()
    theirs = peft_json({}, tmp_path)
    assert set(ours) == set(theirs) == {f.name for f in dataclasses.fields(peft.MissConfig)}
    assert ours == theirs
    peft_fields = {f.name: f.default for f in dataclasses.fields(peft.MissConfig) if f.name in
                   {g.name for g in dataclasses.fields(MissConfig)}}
    assert {f.name: f.default for f in dataclasses.fields(MissConfig)} == peft_fields


@pytest.mark.parametrize("kwargs", CONFIGS, ids=range(len(CONFIGS)))
def test_json_round_trips_with_peft(kwargs: dict[str, Any], tmp_path: Path) -> None:
    ours = MissConfig(**kwargs)
    theirs = peft_json(kwargs, tmp_path / "peft")
    assert normalised(ours.to_dict()) == normalised(theirs)
    # PEFT's file read by miss-jax ...
    assert normalised(MissConfig.from_dict(theirs).to_dict()) == normalised(ours.to_dict())
    # ... and miss-jax's JSON read by PEFT.
    folder = tmp_path / "ours"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(ours.to_dict()))
    loaded = peft.PeftConfig.from_pretrained(str(folder))
    assert isinstance(loaded, peft.MissConfig)
    assert normalised(json.loads(json.dumps(loaded.to_dict(), default=sorted))) == normalised(ours.to_dict())


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(target_modules=".*q", layers_to_transform=[0]), "layers_to_transform"),
        (dict(target_modules=".*q", layers_pattern="layers"), "layers_pattern"),
        (dict(target_modules="all-linear", layers_to_transform=1), "layers_to_transform"),
    ],
)
def test_regex_with_layer_selection_is_rejected_like_peft(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        peft.MissConfig(**kwargs)
    with pytest.raises(ValueError, match=f"`{field}`.*regex"):
        MissConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(r=0), r"`r`.*\b0\b"),
        (dict(r=-3), r"`r`.*-3"),
        (dict(r=2.5), r"`r`.*2\.5"),
        (dict(mini_r=0), r"`mini_r`.*\b0\b"),
        (dict(init_weights="pissa"), r"init_weights.*'pissa'"),
        (dict(bias="lora_only"), r"bias.*'lora_only'"),
        (dict(miss_dropout=1.5), r"miss_dropout.*1\.5"),
        (dict(target_modules=["q", 3]), r"target_modules.*3"),
        (dict(layers_to_transform=["0"]), r"layers_to_transform.*'0'"),
        (dict(task_type="TRANSLATE"), r"task_type.*'TRANSLATE'"),
    ],
)
def test_bad_values_raise_naming_them(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MissConfig(**kwargs)


def test_unknown_json_fields_warn_and_are_ignored() -> None:
    d = {**MissConfig(r=8).to_dict(), "use_some_future_option": True}
    with pytest.warns(UserWarning, match="use_some_future_option"):
        assert MissConfig.from_dict(d) == MissConfig(r=8)


def test_other_peft_types_are_rejected() -> None:
    with pytest.raises(ValueError, match="'LORA'"):
        MissConfig.from_dict({"peft_type": "LORA", "r": 8})


@pytest.mark.parametrize("init_weights,variant", [(True, "balance"), (False, "balance"), ("mini", "mini"),
                                                  ("bat", "bat")])
def test_variant_follows_init_weights(init_weights: Any, variant: str) -> None:
    assert MissConfig(init_weights=init_weights).variant == variant
    assert MissConfig(init_weights=init_weights).peft_type == "MISS"


def test_config_is_frozen_and_replaceable() -> None:
    c = MissConfig(r=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.r = 4  # type: ignore[misc]
    assert dataclasses.replace(c, r=4).r == 4
    with pytest.raises(ValueError, match=r"`r`.*\b0\b"):
        dataclasses.replace(c, r=0)


def test_default_targets_equal_peft_table() -> None:
    for model_type, names in DEFAULT_TARGETS.items():
        assert model_type in PEFT_TARGETS, model_type
        assert list(names) == list(PEFT_TARGETS[model_type]), model_type
    for arch in tm.ARCHS:
        model_type = tm.config(arch).model_type
        assert (model_type in DEFAULT_TARGETS) == (model_type in PEFT_TARGETS), model_type


def test_unknown_architecture_asks_for_target_modules() -> None:
    model = tm.flax_model("vit")
    assert tm.config("vit").model_type not in DEFAULT_TARGETS
    with pytest.raises(ValueError, match=r"model_type 'vit'.*pass `target_modules`"):
        get_peft_model(model, MissConfig(r=4))


def test_to_dict_is_plain_json() -> None:
    d = MissConfig(target_modules=("a", "b"), layers_to_transform=(0, 1), modules_to_save=["c"]).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["target_modules"] == ["a", "b"] and d["layers_to_transform"] == [0, 1]
