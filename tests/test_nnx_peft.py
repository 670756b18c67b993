"""PEFT folders for NNX models through a name map (`interop.nnx_io`): round trip, and the errors for a map
that misses or merges layers and for a folder that does not fit (model unchanged)."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from interop import nnx_io
from interop import safetensors_io as files
from miss_jax import MissConfig
from miss_jax.nnx import get_peft_model, miss_layers
from test_nnx import X, base_model, randomize

MAP = nnx_io.NameMap(((r"layers\.(\d+)\.(q|k|v|o)_proj", r"model.layers.\1.self_attn.\2_proj"),
                      (r"(up|down)_proj", r"model.mlp.\1_proj")))


@pytest.mark.parametrize("init", [True, "mini", "bat"])
def test_round_trip_keys_and_logits(tmp_path, init):
    pm = get_peft_model(base_model(), MissConfig(r=4, mini_r=2, init_weights=init, target_modules=["q_proj", "v_proj"],
                                                 bias="MiSS_only"))
    randomize(pm.base_model)
    y = pm(X)
    nnx_io.save_pretrained(pm, str(tmp_path), MAP)
    keys = set(files.read_tensors(str(tmp_path)))
    assert "base_model.model.model.layers.1.self_attn.v_proj.miss_block" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys
    assert files.read_config(str(tmp_path))["target_modules"] == ["q_proj", "v_proj"]
    loaded = nnx_io.from_pretrained(base_model(), str(tmp_path), MAP)
    np.testing.assert_allclose(loaded(X), y, atol=1e-6)
    loaded.base_model.layers[0].q_proj.base_layer.bias[...] = 0.0
    nnx_io.load_adapter(loaded, str(tmp_path), "again", MAP)
    assert list(loaded.adapters) == ["default", "again"]


def test_a_regex_target_is_written_as_torch_paths(tmp_path):
    pm = get_peft_model(base_model(), MissConfig(r=4, target_modules=r"layers\.0\.q_proj"))
    nnx_io.save_pretrained(pm, str(tmp_path), MAP)
    assert files.read_config(str(tmp_path))["target_modules"] == ["model.layers.0.self_attn.q_proj"]


def test_bad_maps_and_folders_raise_and_change_nothing(tmp_path):
    pm = get_peft_model(base_model(), MissConfig(r=4, target_modules=["q_proj", "up_proj"]))
    with pytest.raises(ValueError, match=r"no torch module path for \['up_proj'\].*add a"):
        nnx_io.save_pretrained(pm, str(tmp_path / "a"), nnx_io.NameMap(MAP.rules[:1]))
    merged = nnx_io.NameMap(((r"layers\.\d+\.(q|k|v|o)_proj", r"model.\1_proj"),) + MAP.rules[1:])
    with pytest.raises(ValueError, match=r"sends both layers\.0\.q_proj and layers\.1\.q_proj to 'model\.q_proj'"):
        nnx_io.save_pretrained(pm, str(tmp_path / "b"), merged)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")

    folder = str(tmp_path / "ok")
    nnx_io.save_pretrained(pm, folder, MAP)
    model = base_model()
    wrong = nnx_io.NameMap(((r"layers\.(\d+)\.(q|k|v|o)_proj", r"model.layers.\1.self_attn.\2_proj"),
                            (r"up_proj", r"model.mlp.down_proj"), (r"down_proj", r"model.mlp.up_proj")))
    with pytest.raises(ValueError, match=r"miss_block for down_proj .* is \(4, 18\), but that layer .* needs \(4, 16\)"):
        nnx_io.from_pretrained(model, folder, wrong)
    with pytest.raises(ValueError, match=r"name modules no NNX layer maps to.*Fix the name map"):
        nnx_io.from_pretrained(model, folder, nnx_io.NameMap(MAP.rules[:1]))
    assert miss_layers(model) == {}
    np.testing.assert_allclose(model(X), base_model()(X), atol=0)
    before = len(jax.tree.leaves(nnx.state(pm, nnx.Param)))
    with pytest.raises(ValueError, match="no NNX layer maps to"):
        nnx_io.load_adapter(pm, folder, "other", nnx_io.NameMap(MAP.rules[:1]))
    assert list(pm.adapters) == ["default"] and len(jax.tree.leaves(nnx.state(pm, nnx.Param))) == before
