"""One lifecycle, one entry point: `MissModel` (transformers Flax) and `MissNnxModel` (Flax NNX) share
`miss_jax.lifecycle.Lifecycle`, have the same PEFT methods with the same signatures, warn with PEFT's texts,
and `miss_jax.get_peft_model` / `MissModel.from_pretrained` take either kind of model; the NNX model's own
`save_pretrained` / `from_pretrained` / `load_adapter` round-trip PEFT folders against real PyTorch PEFT."""

from __future__ import annotations

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

import tiny_models as tm
from interop import nnx_io
from interop import safetensors_io as files
from miss_jax import MissConfig, MissModel, get_peft_model, lifecycle
from miss_jax.nnx import MissLinear, MissNnxModel, miss_layers

# PEFT's API: what both models have, with the same signatures (NNX may add keyword-only knobs after them)
PEFT_METHODS = (
    "add_adapter", "set_adapter", "delete_adapter", "disable_adapter", "merge_adapter", "unmerge_adapter",
    "merge_and_unload", "unload", "get_nb_trainable_parameters", "print_trainable_parameters", "requires_grad",
    "set_requires_grad", "disable_adapter_layers", "enable_adapter_layers", "get_layer_status", "get_model_status",
    "generate", "save_pretrained", "load_adapter", "from_pretrained", "get_base_model",
)
PEFT_PROPERTIES = ("peft_config", "active_adapter", "active_adapters", "merged_adapters", "frozen_adapters")
X = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)


class MLP(nnx.Module):
    """PEFT's test MLP (`tests/test_custom_models.py`'s `MLP`, without dropout) as NNX: 10 -> 20 -> 2."""

    def __init__(self, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.lin0 = nnx.Linear(10, 20, rngs=rngs)
        self.lin1 = nnx.Linear(20, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin1(nnx.relu(self.lin0(x)))


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def torch_twin(seed: int = 0) -> TorchMLP:
    """`MLP(seed)`'s weights in PyTorch (same module names: the identity name map)."""
    twin, model = TorchMLP(), MLP(seed)
    with torch.no_grad():
        for name in ("lin0", "lin1"):
            layer = getattr(model, name)
            getattr(twin, name).weight.copy_(torch.tensor(np.asarray(layer.kernel[...]).T))
            getattr(twin, name).bias.copy_(torch.tensor(np.asarray(layer.bias[...])))
    return twin.eval()


def torch_out(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(X)).numpy()


# ----------------------------------------------------------------------------- one lifecycle


def test_both_models_are_the_one_lifecycle_with_the_same_signatures():
    assert issubclass(MissModel, lifecycle.Lifecycle) and issubclass(MissNnxModel, lifecycle.Lifecycle)
    for name in PEFT_METHODS:
        linen, nnx_method = inspect.signature(getattr(MissModel, name)), inspect.signature(getattr(MissNnxModel, name))
        ours = list(nnx_method.parameters.values())
        theirs = list(linen.parameters.values())
        assert ours[: len(theirs)] == theirs, (name, linen, nnx_method)
        assert all(p.kind == p.KEYWORD_ONLY and p.default is not p.empty for p in ours[len(theirs):]), name
    for name in PEFT_PROPERTIES:
        assert isinstance(inspect.getattr_static(MissNnxModel, name), property), name
    shared = [n for n in PEFT_METHODS + PEFT_PROPERTIES if n in vars(lifecycle.Lifecycle)]
    assert len(shared) >= 18  # written once: the same function object on both classes
    assert all(inspect.getattr_static(MissModel, n) is inspect.getattr_static(MissNnxModel, n) for n in shared)


def test_active_adapters_is_a_list_on_both_paths():
    for pm in (get_peft_model(MLP(), MissConfig(r=2, target_modules=["lin0"])),
               get_peft_model(tm.flax_model("llama"), MissConfig(r=4))):
        pm.add_adapter("other", MissConfig(r=2, target_modules=["lin0"]) if isinstance(pm, MissNnxModel)
                       else MissConfig(r=4))
        pm.set_adapter(["other", "default"])
        assert pm.active_adapters == ["other", "default"] and pm.active_adapter == "other"
        assert pm.get_model_status().active_adapters == ["other", "default"]


def peft_merge_warnings(merges: int) -> list[str]:
    """The distinct warning texts real PEFT gives for `merges` calls of `merge_adapter()` on its MLP."""
    pm = peft.get_peft_model(TorchMLP(), peft.MissConfig(r=2, target_modules=["lin0"], init_weights=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(merges):
            pm.merge_adapter()
    return sorted({str(w.message) for w in caught})


@pytest.mark.parametrize("path", ["nnx", "linen"])
def test_a_second_merge_warns_peft_text(path):
    want = peft_merge_warnings(2)
    assert want == [lifecycle.MERGED_ALL] == ["All adapters are already merged, nothing to do."]
    pm = (get_peft_model(MLP(), MissConfig(r=2, target_modules=["lin0"], init_weights=False)) if path == "nnx"
          else get_peft_model(tm.flax_model("llama"), MissConfig(r=4, init_weights=False)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm.merge_adapter()
    assert [str(w.message) for w in caught] == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm.merge_adapter()
    assert [str(w.message) for w in caught] == want
    assert pm.merged_adapters == ["default"]
    pm.unmerge_adapter()
    with pytest.warns(UserWarning, match="^Already unmerged. Nothing to do.$"):
        pm.unmerge_adapter()


# ----------------------------------------------------------------------------- one entry point


def test_get_peft_model_dispatches_on_the_kind_of_model():
    nnx_pm = get_peft_model(MLP(), MissConfig(r=2, target_modules=["lin0"]), "a", seed=3)
    assert type(nnx_pm) is MissNnxModel and nnx_pm.name_map is nnx_io.IDENTITY
    assert isinstance(nnx_pm.base_model.lin0, MissLinear) and nnx_pm.active_adapters == ["a"]
    linen_pm = get_peft_model(tm.flax_model("llama"), MissConfig(r=4), "b")
    assert type(linen_pm) is MissModel and linen_pm.active_adapters == ["b"]


def test_get_peft_model_refuses_other_models_and_changes_nothing(tmp_path):
    twin = torch_twin()
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    for bad in (twin, object(), "lin0"):
        with pytest.raises(TypeError, match=r"transformers Flax model .* or a Flax NNX module"):
            get_peft_model(bad, MissConfig(r=2, target_modules=["lin0"]))
        with pytest.raises(TypeError, match=r"transformers Flax model .* or a Flax NNX module"):
            MissModel.from_pretrained(bad, str(tmp_path))
    assert all(torch.equal(before[k], v) for k, v in twin.state_dict().items())
    assert not isinstance(twin.lin0, peft.tuners.tuners_utils.BaseTunerLayer)
    with pytest.raises(ValueError, match="name_map= is for Flax NNX models"):
        get_peft_model(tm.flax_model("llama"), MissConfig(r=4), name_map=nnx_io.IDENTITY)
    mlp = MLP()
    with pytest.raises(ValueError, match="params=.* transformers"):
        get_peft_model(mlp, MissConfig(r=2, target_modules=["lin0"]), params={})
    assert type(mlp.lin0) is nnx.Linear


def test_a_tunix_family_without_a_name_map_is_refused_naming_the_fix():
    Foreign = type("Transformer", (MLP,), {"__module__": "tunix.models.gemma3.model"})
    model = Foreign()
    with pytest.raises(ValueError, match=r"no ready name map .* pass name_map="):
        get_peft_model(model, MissConfig(r=2, target_modules=["lin0"]))
    assert type(model.lin0) is nnx.Linear  # unchanged
    pm = get_peft_model(model, MissConfig(r=2, target_modules=["lin0"]), name_map=nnx_io.IDENTITY)
    assert isinstance(model.lin0, MissLinear) and pm.name_map is nnx_io.IDENTITY


# ----------------------------------------------------------------------------- NNX folders, against real PEFT


def test_nnx_save_pretrained_loads_in_pytorch_peft_and_back(tmp_path):
    pm = get_peft_model(MLP(), MissConfig(r=2, target_modules=["lin0", "lin1"], init_weights=False, bias="MiSS_only"))
    pm.add_adapter("second", MissConfig(r=4, target_modules=["lin0"]))  # balance: PEFT keeps one miss_fn per layer
    blocks = nnx.state(pm, pm.trainable)
    nnx.update(pm, jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), blocks))
    pm.set_adapter("second")
    nnx.update(pm, jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape),
                                nnx.state(pm, pm.trainable)))
    pm.set_adapter("default")
    want = np.asarray(pm(X))
    assert np.abs(want - np.asarray(MLP()(X))).max() > 1e-3  # the adapter changes the output
    pm.save_pretrained(str(tmp_path))  # default at the root, "second" in its sub-folder, identity map
    assert files.read_config(str(tmp_path))["target_modules"] == ["lin0", "lin1"]
    assert "base_model.model.lin0.base_layer.bias" in files.read_tensors(str(tmp_path))

    torch_pm = peft.PeftModel.from_pretrained(torch_twin(), str(tmp_path)).eval()
    np.testing.assert_allclose(torch_out(torch_pm), want, atol=1e-5)
    torch_pm.load_adapter(str(tmp_path / "second"), "second")
    torch_pm.set_adapter("second")
    pm.set_adapter("second")
    np.testing.assert_allclose(torch_out(torch_pm), pm(X), atol=1e-5)

    loaded = MissModel.from_pretrained(MLP(), str(tmp_path))  # the one entry point: an NNX model back
    assert type(loaded) is MissNnxModel and loaded.frozen_adapters == ("default",)
    np.testing.assert_allclose(loaded(X), want, atol=1e-6)
    loaded.load_adapter(str(tmp_path), "second", subfolder="second", is_trainable=True)
    assert loaded.active_adapters == ["default"] and loaded.frozen_adapters == ("default",)
    loaded.set_adapter("second")
    np.testing.assert_allclose(loaded(X), pm(X), atol=1e-6)
    assert loaded.get_nb_trainable_parameters()[0] == 4 * 20  # its block (r, out) on lin0


def test_pytorch_peft_folder_into_the_nnx_model_and_saved_again(tmp_path):
    torch_pm = peft.get_peft_model(torch_twin(1), peft.MissConfig(r=2, target_modules=["lin0", "lin1"],
                                                                  init_weights=False))
    torch_pm.save_pretrained(str(tmp_path / "torch"))
    want = torch_out(torch_pm.eval())
    pm = MissNnxModel.from_pretrained(MLP(1), str(tmp_path / "torch"), is_trainable=True, config=None)
    np.testing.assert_allclose(pm(X), want, atol=1e-5)
    assert pm.frozen_adapters == () and pm.get_model_status().requires_grad == {"default": True}
    status = {s.name: s for s in pm.get_layer_status()}
    assert sorted(status) == ["model.lin0", "model.lin1"] and status["model.lin0"].module_type == "miss.MissLinear"
    pm.save_pretrained(str(tmp_path / "jax"), selected_adapters=["default"])
    again = peft.PeftModel.from_pretrained(torch_twin(1), str(tmp_path / "jax")).eval()
    np.testing.assert_allclose(torch_out(again), want, atol=1e-5)
    with pytest.raises(ValueError, match="autocast_adapter_dtype=False"):
        pm.load_adapter(str(tmp_path / "torch"), "x", autocast_adapter_dtype=False)
    with pytest.raises(ValueError, match="invalid `selected_adapters`"):
        pm.save_pretrained(str(tmp_path / "none"), selected_adapters=["nope"])
    with pytest.raises(ValueError, match="as_lora=True is for transformers"):
        pm.save_pretrained(str(tmp_path / "lora"), as_lora=True)
    assert list(pm.peft_config) == ["default"]


# ----------------------------------------------------------------------------- NNX switches, merge, generate


def test_nnx_disable_enable_adapter_layers_and_merge_and_unload_adapter_names():
    pm = get_peft_model(MLP(), MissConfig(r=2, target_modules=["lin0"], init_weights=False))
    pm.add_adapter("b", MissConfig(r=2, target_modules=["lin1"], init_weights=False))
    base, adapted = np.asarray(MLP()(X)), np.asarray(pm(X))
    pm.disable_adapter_layers()
    np.testing.assert_allclose(pm(X), base, atol=1e-6)
    assert pm.get_model_status().enabled is False and pm.get_nb_trainable_parameters()[0] == 0
    pm.enable_adapter_layers()
    np.testing.assert_allclose(pm(X), adapted, atol=1e-6)
    pm.set_adapter(["default", "b"])
    both = np.asarray(pm(X))
    pm.set_adapter("default")
    plain = pm.merge_and_unload(adapter_names=["b"])  # PEFT: merge "b" only, drop the rest
    assert type(plain.lin0) is nnx.Linear and type(plain.lin1) is nnx.Linear
    only_b = get_peft_model(MLP(), MissConfig(r=2, target_modules=["lin0"], init_weights=False))
    only_b.add_adapter("b", MissConfig(r=2, target_modules=["lin1"], init_weights=False))
    only_b.set_adapter("b")
    np.testing.assert_allclose(plain(X), only_b(X), atol=1e-5)
    assert np.abs(np.asarray(plain(X)) - both).max() > 1e-4
    with pytest.raises(ValueError, match="return_params=True"):
        only_b.merge_and_unload(return_params=True)


class TinyLM(nnx.Module):
    """Token ids `(batch, seq)` -> logits `(batch, seq, 16)`: an embedding, a projection and a head."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.embed = nnx.Embed(16, 8, rngs=rngs)
        self.proj = nnx.Linear(8, 8, rngs=rngs)
        self.lm_head = nnx.Linear(8, 16, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        h = self.embed(ids)
        return self.lm_head(jnp.tanh(self.proj(jnp.cumsum(h, axis=1))))


def test_nnx_generate_greedy_and_sampled():
    pm = get_peft_model(TinyLM(), MissConfig(r=2, target_modules=["proj", "lm_head"], init_weights=False))
    prompt = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    ids = prompt
    for _ in range(4):  # the greedy loop, by hand
        ids = np.concatenate([ids, np.argmax(np.asarray(pm(jnp.asarray(ids)))[:, -1], -1)[:, None]], 1)
    out = pm.generate(prompt, max_new_tokens=4)
    np.testing.assert_array_equal(out.sequences, ids)
    np.testing.assert_array_equal(pm.generate(prompt, max_length=7).sequences, ids)
    top1 = pm.generate(prompt, max_new_tokens=4, do_sample=True, top_k=1, prng_key=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(top1.sequences, ids)
    sampled = pm.generate(prompt, max_new_tokens=4, do_sample=True, prng_key=jax.random.PRNGKey(3))
    assert sampled.sequences.shape == (2, 7) and bool(jnp.all(sampled.sequences[:, :3] == prompt))
    eos = int(ids[0, 3])
    stopped = pm.generate(prompt, max_new_tokens=4, eos_token_id=eos, pad_token_id=0).sequences
    assert int(stopped[0, 3]) == eos and bool(jnp.all(stopped[0, 4:] == 0))
    with pm.disable_adapter():
        base = pm.generate(prompt, max_new_tokens=4).sequences
    plain = TinyLM()
    np.testing.assert_array_equal(base[:, 3], np.argmax(np.asarray(plain(jnp.asarray(prompt)))[:, -1], -1))
    for bad, match in ((dict(), "exactly one"), (dict(max_length=3), "Nothing to generate"),
                       (dict(max_new_tokens=2, attention_mask=np.array([[0, 1, 1], [1, 1, 1]])), "padded prompt")):
        with pytest.raises(ValueError, match=match):
            pm.generate(prompt, **bad)
    assert len(miss_layers(pm.base_model)) == 2
