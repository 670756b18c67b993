"""Flax path <-> torch key mapping and PEFT folders, on every architecture of `tiny_models.ARCHS`.

Both directions on each: torch PEFT writes an adapter, miss-jax loads it (same logits as torch),
miss-jax writes it back (the same keys and shapes as PEFT's file), PEFT loads that (same logits).
GPT-2 (PEFT's MiSS cannot wrap `Conv1D`) goes through merged weights instead.
"""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest
from flax import traverse_util

import tiny_models as tm
from interop import names
from interop_helpers import (
    ATOL,
    file_keys,
    jax_outputs,
    load_in_torch,
    torch_outputs,
    torch_peft_model,
    torch_twin,
)
from miss_jax import MissConfig, MissModel, get_peft_model
from miss_jax.targeting import discover

PEFT_ARCHS = [a for a in tm.ARCHS if a != "gpt2"]


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_param_paths_map_to_torch_keys_both_ways(arch):
    """Every Flax leaf maps to the torch key transformers' own conversion fills, with equal values, and
    every torch key maps back to a Flax leaf, except tied weights that share another key's storage."""
    flax = {p: np.asarray(v) for p, v in traverse_util.flatten_dict(tm.flax_model(arch).params).items()}
    twin = torch_twin(arch)
    state = twin.state_dict()
    by_key = {names.torch_param_key(p): p for p in flax}
    for key, path in by_key.items():  # Flax -> torch
        np.testing.assert_array_equal(names.to_torch(path[-1], flax[path]), state[key].numpy(), err_msg=key)
    mapped_ptrs = {state[k].data_ptr() for k in by_key}
    for key, tensor in state.items():  # torch -> Flax
        if key in by_key:
            path = by_key[key]
            np.testing.assert_array_equal(names.from_torch(path[-1], tensor.numpy()), flax[path], err_msg=key)
        else:
            assert tensor.data_ptr() in mapped_ptrs, f"{key} has no Flax leaf and is not tied to one"
    model = tm.flax_model(arch)
    layers = discover(lambda: model.init_weights(jax.random.PRNGKey(0), model.input_shape))
    linear = [key for key, layer in layers.items() if layer.is_linear]
    assert linear and all(f"{k}.weight" in state for k in linear)  # module paths are torch module paths


@pytest.mark.parametrize("arch", PEFT_ARCHS)
def test_torch_peft_to_jax_and_back(arch, tmp_path):
    torch_model = torch_peft_model(arch, {"default": peft.MissConfig(r=4, target_modules=tm.targets(arch))})
    expected = torch_outputs(torch_model, arch)
    with torch_model.disable_adapter():
        assert np.abs(expected - torch_outputs(torch_model, arch)).max() > 1e-3  # the adapter matters
    torch_model.save_pretrained(tmp_path / "torch")

    model = MissModel.from_pretrained(tm.flax_model(arch), str(tmp_path / "torch"))  # torch -> JAX
    got = jax_outputs(model, arch)
    np.testing.assert_allclose(got, expected, atol=ATOL)

    model.save_pretrained(str(tmp_path / "jax"))  # JAX -> torch
    assert file_keys(str(tmp_path / "jax")) == file_keys(str(tmp_path / "torch"))
    np.testing.assert_allclose(torch_outputs(load_in_torch(arch, str(tmp_path / "jax")), arch), got, atol=ATOL)


def test_gpt2_through_merged_weights(tmp_path):
    """PEFT cannot put MiSS on GPT-2's Conv1D: the folder round-trips in JAX, and the merged kernels,
    loaded into torch's GPT-2, give the adapted model's logits."""
    flax_model = tm.flax_model("gpt2")
    model = get_peft_model(flax_model, MissConfig(r=4, init_weights=False, target_modules=["c_attn", "c_proj"]))
    adapted = jax_outputs(model, "gpt2")
    with pytest.warns(UserWarning, match="PyTorch PEFT cannot load"):
        model.save_pretrained(str(tmp_path))
    assert set(file_keys(str(tmp_path))) == {
        f"base_model.model.transformer.h.{i}.{m}.miss_block"
        for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")
    }
    reloaded = MissModel.from_pretrained(flax_model, str(tmp_path))
    for a, b in zip(*(traverse_util.flatten_dict(m.adapter_params["miss"]).values() for m in (model, reloaded))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    model.merge_adapter()
    merged = torch_outputs(torch_twin("gpt2", model.params), "gpt2")
    np.testing.assert_allclose(merged, adapted, atol=ATOL)
    assert np.abs(merged - torch_outputs(torch_twin("gpt2"), "gpt2")).max() > 1e-3
