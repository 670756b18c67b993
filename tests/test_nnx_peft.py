"""PEFT folders for NNX models through a name map (`interop.nnx_io`): round trip, and the errors for a map
that misses or merges layers and for a folder that does not fit (model unchanged)."""

import os
import shutil
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx

from interop import nnx_io
from interop import safetensors_io as files
from miss_jax import MissConfig, MissModel
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
    loaded = MissModel.from_pretrained(base_model(), str(tmp_path), name_map=MAP)
    np.testing.assert_allclose(loaded(X), y, atol=1e-6)
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):  # PEFT's rule: one bias adapter
        nnx_io.load_adapter(loaded, str(tmp_path), "again", MAP)
    assert list(loaded.adapters) == ["default"]
    np.testing.assert_allclose(loaded(X), y, atol=1e-6)  # the refused load left the model as it was


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
        MissModel.from_pretrained(model, folder, name_map=wrong)
    with pytest.raises(ValueError, match=r"name modules no NNX layer maps to.*Fix the name map"):
        MissModel.from_pretrained(model, folder, name_map=nnx_io.NameMap(MAP.rules[:1]))
    assert miss_layers(model) == {}
    np.testing.assert_allclose(model(X), base_model()(X), atol=0)
    before = len(jax.tree.leaves(nnx.state(pm, nnx.Param)))
    with pytest.raises(ValueError, match="no NNX layer maps to"):
        nnx_io.load_adapter(pm, folder, "other", nnx_io.NameMap(MAP.rules[:1]))
    assert list(pm.adapters) == ["default"] and len(jax.tree.leaves(nnx.state(pm, nnx.Param))) == before


# --------------------------------------------------------------------------- modules_to_save, against PyTorch PEFT

SAVE_MAP = nnx_io.NameMap(MAP.rules + ((r"layers\.(\d+)\.norm", r"model.layers.\1.norm"),))
SAVED = dict(r=4, init_weights="bat", target_modules=["q_proj", "v_proj"], modules_to_save=["norm", "up_proj"])


def torch_twin(model: nnx.Module) -> Any:
    """`TinyModel` in PyTorch under `SAVE_MAP`'s torch paths, with `model`'s weights."""
    import torch

    class SelfAttn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(16, 16) for _ in range(3))
            self.o_proj = torch.nn.Linear(16, 16, bias=False)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn, self.norm = SelfAttn(), torch.nn.LayerNorm(16, eps=1e-6)

        def forward(self, x):
            a = self.self_attn
            q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
            return self.norm(x + a.o_proj(torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v))

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])
            self.mlp = torch.nn.Module()
            self.mlp.up_proj, self.mlp.down_proj = torch.nn.Linear(16, 18), torch.nn.Linear(18, 16)

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

        def forward(self, x):
            for layer in self.model.layers:
                x = layer(x)
            mlp = self.model.mlp
            return mlp.down_proj(torch.nn.functional.gelu(mlp.up_proj(x), approximate="tanh"))

    twin = Twin()
    state = {}
    for key, node in [("up_proj", model.up_proj), ("down_proj", model.down_proj)] + [
        (f"layers.{i}.{n}_proj", getattr(layer, f"{n}_proj")) for i, layer in enumerate(model.layers) for n in "qkvo"
    ]:
        state[f"{SAVE_MAP.torch_name(key)}.weight"] = torch.tensor(np.asarray(node.kernel[...]).T)
        if node.bias is not None:
            state[f"{SAVE_MAP.torch_name(key)}.bias"] = torch.tensor(np.asarray(node.bias[...]))
    for i, layer in enumerate(model.layers):
        state[f"model.layers.{i}.norm.weight"] = torch.tensor(np.asarray(layer.norm.scale[...]))
        state[f"model.layers.{i}.norm.bias"] = torch.tensor(np.asarray(layer.norm.bias[...]))
    twin.load_state_dict(state)
    return twin.eval()


def test_the_torch_twin_agrees_with_the_nnx_model():
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        np.testing.assert_allclose(torch_twin(base_model())(torch.tensor(np.asarray(X))).numpy(), base_model()(X),
                                   atol=1e-5)


def test_modules_to_save_from_pytorch_peft_into_nnx(tmp_path):
    """PEFT's saved copies (`base_model.model.model.layers.0.norm.weight`, ...) come back as the NNX
    model's `ModulesToSave` copies, in the NNX layout (Linear kernel = torch weight transposed)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(torch_twin(base_model()), peft.MissConfig(**SAVED)).eval()
    gen = torch.Generator().manual_seed(0)
    for name, p in pm.named_parameters():
        if p.requires_grad:
            p.data += 0.1 * torch.randn(p.shape, generator=gen)
    pm.save_pretrained(str(tmp_path))
    assert "base_model.model.model.mlp.up_proj.weight" in files.read_tensors(str(tmp_path))
    with torch.no_grad():
        want = pm(torch.tensor(np.asarray(X))).numpy()
    loaded = MissModel.from_pretrained(base_model(), str(tmp_path), name_map=SAVE_MAP)
    assert sorted(loaded.adapters["default"].saved) == ["layers.0.norm", "layers.1.norm", "up_proj"]
    np.testing.assert_allclose(loaded(X), want, atol=1e-5)
    with loaded.disable_adapter():
        np.testing.assert_allclose(loaded(X), base_model()(X), atol=1e-6)


def test_modules_to_save_from_nnx_into_pytorch_peft(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    pm = get_peft_model(base_model(), MissConfig(**SAVED))
    randomize(pm.base_model)
    copies = nnx.state(pm, pm.trainable)
    noisy = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), copies)
    nnx.update(pm, noisy)
    nnx_io.save_pretrained(pm, str(tmp_path), SAVE_MAP)
    config = files.read_config(str(tmp_path))
    assert config["modules_to_save"] == ["norm", "up_proj"]
    keys = set(files.read_tensors(str(tmp_path)))
    assert {"base_model.model.model.layers.1.norm.bias", "base_model.model.model.mlp.up_proj.weight"} <= keys
    torch_pm = peft.PeftModel.from_pretrained(torch_twin(base_model()), str(tmp_path)).eval()
    with torch.no_grad():
        got = torch_pm(torch.tensor(np.asarray(X))).numpy()
    assert np.abs(got - np.asarray(base_model()(X))).max() > 1e-3
    np.testing.assert_allclose(got, pm(X), atol=1e-5)
    again = MissModel.from_pretrained(base_model(), str(tmp_path), name_map=SAVE_MAP)
    np.testing.assert_allclose(again(X), pm(X), atol=1e-6)


def test_bad_modules_to_save_folders_raise_and_change_nothing(tmp_path):
    pm = get_peft_model(base_model(), MissConfig(**SAVED))
    with pytest.raises(ValueError, match=r"no torch module path for \['layers\.0\.norm'.*add a"):
        nnx_io.save_pretrained(pm, str(tmp_path / "a"), MAP)
    with pytest.raises(ValueError, match=r"no torch parameter name for layers\.0\.norm\.scale.*leaves"):
        nnx_io.save_pretrained(pm, str(tmp_path / "a"), nnx_io.NameMap(SAVE_MAP.rules, leaves=(("bias", "bias"),)))
    assert not os.path.exists(tmp_path / "a")
    folder = str(tmp_path / "ok")
    nnx_io.save_pretrained(pm, folder, SAVE_MAP)
    tensors = files.read_tensors(folder)
    model = base_model()
    for damage, message in [
        (lambda t: t.pop("base_model.model.model.mlp.up_proj.bias"), r"covers up_proj .* no base_model\.model\.model\.mlp\.up_proj\.bias"),
        (lambda t: t.update({"base_model.model.model.mlp.up_proj.weight": np.zeros((16, 18), np.float32)}),
         r"up_proj\.weight \(modules_to_save copy of up_proj\) is \(16, 18\), but up_proj needs \(18, 16\)"),
    ]:
        bad = str(tmp_path / "bad")
        shutil.copytree(folder, bad, dirs_exist_ok=True)
        damaged = dict(tensors)
        damage(damaged)
        files.write_tensors(os.path.join(bad, "adapter_model.safetensors"), damaged)
        with pytest.raises(ValueError, match=message):
            MissModel.from_pretrained(model, bad, name_map=SAVE_MAP)
    assert miss_layers(model) == {} and type(model.up_proj).__name__ == "Linear"
    np.testing.assert_allclose(model(X), base_model()(X), atol=0)


class ConvNet(nnx.Module):
    """A Conv (saved whole with modules_to_save) before a Linear (adapted): `(B, L, 4)` -> `(B, L, 8)`."""

    def __init__(self, seed: int) -> None:
        rngs = nnx.Rngs(seed)
        self.conv = nnx.Conv(4, 6, kernel_size=(3,), padding="SAME", rngs=rngs)
        self.proj = nnx.Linear(6, 8, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(self.conv(x))


def test_a_saved_conv_copy_is_stored_as_torchs_conv_weight(tmp_path):
    """A `modules_to_save` Conv kernel `(width, in, out)` goes to the folder as torch's Conv1d weight
    `(out, in, width)` (`interop.names.to_torch`, as the Linen path stores it), and loads back."""
    torch = pytest.importorskip("torch")
    pm = get_peft_model(ConvNet(0), MissConfig(r=2, target_modules=["proj"], modules_to_save=["conv"]))
    trained = nnx.state(pm, pm.trainable)
    nnx.update(pm, jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), trained))
    conv_map = nnx_io.NameMap(((r"(conv|proj)", r"\1"),))
    nnx_io.save_pretrained(pm, str(tmp_path), conv_map)
    tensors = files.read_tensors(str(tmp_path))
    weight, bias = tensors["base_model.model.conv.weight"], tensors["base_model.model.conv.bias"]
    assert weight.shape == (6, 4, 3)
    x = jax.random.normal(jax.random.key(2), (2, 5, 4))
    torch_conv = torch.nn.Conv1d(4, 6, 3, padding="same")
    with torch.no_grad():
        torch_conv.weight.copy_(torch.tensor(np.asarray(weight)))
        torch_conv.bias.copy_(torch.tensor(np.asarray(bias)))
        want = torch_conv(torch.tensor(np.asarray(x)).transpose(1, 2)).transpose(1, 2).numpy()
    np.testing.assert_allclose(want, pm.base_model.conv(x), atol=1e-5)  # the (trained) copy
    loaded = MissModel.from_pretrained(ConvNet(0), str(tmp_path), name_map=conv_map)
    assert np.abs(np.asarray(pm(x)) - np.asarray(ConvNet(0)(x))).max() > 1e-3
    np.testing.assert_allclose(loaded(x), pm(x), atol=1e-6)
