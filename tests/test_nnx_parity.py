"""The NNX `MissNnxModel` against PyTorch PEFT, computed in the same run: several active adapters with
disjoint `modules_to_save`, adapters loaded frozen (`is_trainable=False`) and `set_requires_grad`, and
PEFT's `modules_to_save` matching rule (shared with the Linen path)."""

from typing import Any

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from interop import nnx_io
from miss_jax import MissConfig, MissModel, adapters
from miss_jax.nnx import get_peft_model, saved_modules
from test_nnx import X, base_model, randomize
from test_nnx_peft import SAVE_MAP, torch_twin

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

FIRST = dict(r=4, target_modules=["q_proj"], modules_to_save=["up_proj"])


def randomize_peft(pm: Any, seed: int) -> None:
    """Random values for every adapter tensor (blocks and module copies) of a torch PEFT model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "miss_block" in name or "modules_to_save" in name:
                p += 0.2 * torch.randn(p.shape, generator=gen)


def torch_out(pm: Any, x: jax.Array = X) -> np.ndarray:
    """A torch (PEFT) model's output on `x`."""
    with torch.no_grad():
        return pm(torch.tensor(np.asarray(x))).numpy()


def params(model: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]


# --------------------------------------------------------------------------- 1. disjoint modules_to_save


def test_adapters_with_disjoint_modules_to_save_are_active_together(tmp_path):
    """PEFT's `set_adapter([a, b])` with `a` saving up_proj and `b` the norms: each wrapper uses its owner's
    copy. The NNX model loaded from PEFT's folders gives PEFT's output."""
    pm = peft.get_peft_model(torch_twin(base_model()), peft.MissConfig(**FIRST))
    pm.add_adapter("b", peft.MissConfig(r=4, target_modules=["v_proj"], modules_to_save=["norm"]))
    randomize_peft(pm, 0)
    pm.base_model.set_adapter(["default", "b"])
    want = torch_out(pm.eval())
    pm.save_pretrained(str(tmp_path))

    nnx_pm = MissModel.from_pretrained(base_model(), str(tmp_path), name_map=SAVE_MAP)
    nnx_io.load_adapter(nnx_pm, str(tmp_path / "b"), "b", SAVE_MAP)
    alone = np.asarray(nnx_pm(X))
    nnx_pm.set_adapter(["default", "b"])
    wrappers = saved_modules(nnx_pm.base_model)
    assert {k: w.active for k, w in wrappers.items()} == {"up_proj": "default", "layers.0.norm": "b",
                                                          "layers.1.norm": "b"}
    np.testing.assert_allclose(nnx_pm(X), want, atol=1e-5)
    assert np.abs(alone - want).max() > 1e-3  # b's blocks and copies matter
    assert nnx_pm.adapters["b"].saved == ("layers.0.norm", "layers.1.norm")


def test_overlapping_modules_to_save_are_refused_and_change_nothing():
    pm = peft.get_peft_model(torch_twin(base_model()), peft.MissConfig(**FIRST))
    pm.add_adapter("b", peft.MissConfig(r=4, target_modules=["v_proj"], modules_to_save=["up_proj"]))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):  # PEFT refuses too
        pm.base_model.set_adapter(["default", "b"])

    nnx_pm = get_peft_model(base_model(), MissConfig(**FIRST))
    nnx_pm.add_adapter("b", MissConfig(r=4, target_modules=["v_proj"], modules_to_save=["up_proj"]))
    nnx_pm.add_adapter("c", MissConfig(r=4, target_modules=["k_proj"], modules_to_save=["norm"]))
    randomize(nnx_pm.base_model)
    nnx_pm.set_requires_grad("default", False)
    y = np.asarray(nnx_pm(X))
    before = params(nnx_pm)
    with pytest.raises(ValueError, match=r"modules_to_save module up_proj: adapters 'default' and 'b' both save it"):
        nnx_pm.set_adapter(["default", "c", "b"])
    assert nnx_pm.active_adapters == ["default"] and nnx_pm.frozen_adapters == ("default",)
    assert nnx_pm.base_model.up_proj.active == "default" and nnx_pm.base_model.layers[0].norm.active is None
    np.testing.assert_array_equal(nnx_pm(X), y)
    assert all(np.array_equal(a, b) for a, b in zip(before, params(nnx_pm)))
    nnx_pm.set_adapter(["default", "c"])  # disjoint: fine
    assert nnx_pm.base_model.layers[1].norm.active == "c" and nnx_pm.frozen_adapters == ()


# --------------------------------------------------------------------------- 2. frozen (inference mode)


@pytest.mark.parametrize("bias", ["none", "MiSS_only"])
def test_is_trainable_false_loads_frozen_as_peft(tmp_path, bias):
    """`from_pretrained(..., is_trainable=False)` (the default) loads the adapter frozen: nothing trainable,
    as PEFT counts it (PEFT 0.21 leaves a frozen adapter's biases requiring grad; miss-jax freezes them too),
    and `is_trainable=True` counts what PEFT counts."""
    config = peft.MissConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["up_proj"], bias=bias)
    peft.get_peft_model(torch_twin(base_model()), config).save_pretrained(str(tmp_path))
    for trainable in (False, True):
        torch_pm = peft.PeftModel.from_pretrained(torch_twin(base_model()), str(tmp_path), is_trainable=trainable)
        want, total = torch_pm.get_nb_trainable_parameters()
        biases = sum(p.numel() for n, p in torch_pm.named_parameters() if p.requires_grad and n.endswith(".bias")
                     and "modules_to_save" not in n)
        nnx_pm = MissModel.from_pretrained(base_model(), str(tmp_path), name_map=SAVE_MAP, is_trainable=trainable)
        assert nnx_pm.get_nb_trainable_parameters() == ((want, total) if trainable else (want - biases, total))
        assert nnx_pm.frozen_adapters == (() if trainable else ("default",))
    assert want > 0 and (biases > 0) == (bias != "none")


def test_frozen_adapters_do_not_train_and_set_requires_grad():
    pm = get_peft_model(base_model(), MissConfig(r=4, target_modules=["q_proj"], modules_to_save=["up_proj"],
                                                 bias="MiSS_only", inference_mode=True))
    pm.add_adapter("b", MissConfig(r=4, target_modules=["v_proj"]))
    assert pm.frozen_adapters == ("default",) and pm.get_nb_trainable_parameters()[0] == 0
    assert jax.tree.leaves(nnx.state(pm, pm.trainable)) == []
    pm.set_adapter(["default", "b"], inference_mode=True)
    pm.set_requires_grad("b")  # b trains, default stays frozen
    assert pm.frozen_adapters == ("default",)
    assert pm.get_nb_trainable_parameters()[0] == 2 * 4 * 16  # b's (r, out) blocks in two layers
    optimizer = nnx.Optimizer(pm, optax.sgd(0.1), wrt=pm.trainable)
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(pm, nnx.Param))}
    loss, grads = nnx.value_and_grad(lambda m: (m(X) ** 2).mean(), argnums=nnx.DiffState(0, pm.trainable))(pm)
    optimizer.update(pm, grads)
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(pm, nnx.Param))}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k[-2:] == ("miss_block", "b") for k in changed), changed

    pm.add_adapter("c", MissConfig(r=4, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"Adapters \['c'\] are not active.*set_adapter"):
        pm.set_requires_grad(["b", "c"])
    with pytest.raises(ValueError, match="Unknown adapter 'nope'"):
        pm.set_requires_grad("nope", False)
    assert pm.frozen_adapters == ("default",)  # the refused calls changed nothing
    pm.set_requires_grad("default")
    blocks, biases, copy = 2 * 4 * 16, 2 * 16, 16 * 18 + 18
    assert pm.get_nb_trainable_parameters()[0] == blocks + biases + copy + 2 * 4 * 16
    pm.set_requires_grad(["default", "b"], requires_grad=False)
    assert pm.get_nb_trainable_parameters()[0] == 0 and pm.trainable_paths() == frozenset()
    pm.set_adapter("default")  # as PEFT: set_adapter makes the adapter trainable
    assert pm.frozen_adapters == ("b",) and pm.get_nb_trainable_parameters()[0] == blocks + biases + copy
    pm.set_adapter(["default", "b"], inference_mode=True)
    pm.delete_adapter("b")  # as PEFT: the remaining active adapter trains
    assert pm.active_adapters == ["default"] and pm.frozen_adapters == ()


# --------------------------------------------------------------------------- 3. one modules_to_save rule


class TorchHeads(torch.nn.Module):
    """`proj`, then two heads: `lm_head` and `my_lm_head` (which PEFT's `endswith` rule also selects)."""

    def __init__(self):
        super().__init__()
        self.proj, self.lm_head, self.my_lm_head = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        h = self.proj(x)
        return self.lm_head(h) + 2 * self.my_lm_head(h)


class NnxHeads(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj, self.lm_head, self.my_lm_head = (nnx.Linear(8, 8, rngs=rngs) for _ in range(3))

    def __call__(self, x):
        h = self.proj(x)
        return self.lm_head(h) + 2 * self.my_lm_head(h)


IDENTITY = nnx_io.NameMap(((r"(.*)", r"\1"),))
XH = jax.random.normal(jax.random.key(2), (3, 8))
HEADS = dict(r=4, target_modules=["proj"], modules_to_save=["lm_head"])


def heads() -> tuple[Any, NnxHeads]:
    """The torch and NNX heads models, with the same weights."""
    model = NnxHeads(nnx.Rngs(0))
    state = {}
    for name in ("proj", "lm_head", "my_lm_head"):
        layer = getattr(model, name)
        state[f"{name}.weight"] = torch.tensor(np.asarray(layer.kernel[...]).T.copy())
        state[f"{name}.bias"] = torch.tensor(np.asarray(layer.bias[...]))
    twin = TorchHeads()
    twin.load_state_dict(state)
    return twin.eval(), model


def test_modules_to_save_follow_peft_endswith_rule():
    """PEFT wraps `my_lm_head` for `modules_to_save=["lm_head"]`; so do the NNX model and the Linen matcher."""
    twin, model = heads()
    pm = peft.get_peft_model(twin, peft.MissConfig(**HEADS))
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                     if isinstance(m, peft.utils.other.ModulesToSaveWrapper))
    assert wrapped == ["lm_head", "my_lm_head"]
    params = {n: {"kernel": np.zeros((8, 8)), "bias": np.zeros(8)} for n in ("proj", "lm_head", "my_lm_head")}
    assert adapters.find_modules_to_save(MissConfig(**HEADS), params) == tuple((n,) for n in wrapped)
    assert sorted(get_peft_model(model, MissConfig(**HEADS)).adapters["default"].saved) == wrapped
    assert adapters.match_modules_to_save(["norm"], ["norm", "norm.inner", "layers.0.norm", "norms"]) == (
        "norm", "layers.0.norm")  # not inside a selected module; a name is a suffix of the path
    with pytest.raises(ValueError, match=r"modules_to_save \['score'\] not found.*top-level modules are \['lm_head'"):
        get_peft_model(heads()[1], MissConfig(r=4, target_modules=["proj"], modules_to_save=["score"]))


def test_endswith_rule_through_peft_folders(tmp_path):
    """PEFT -> NNX and NNX -> PEFT with `modules_to_save=["lm_head"]`: both heads travel, outputs agree."""
    pm = peft.get_peft_model(heads()[0], peft.MissConfig(**HEADS))
    randomize_peft(pm, 1)
    pm.save_pretrained(str(tmp_path / "torch"))
    loaded = MissModel.from_pretrained(heads()[1], str(tmp_path / "torch"), name_map=IDENTITY)
    assert sorted(saved_modules(loaded.base_model)) == ["lm_head", "my_lm_head"]
    np.testing.assert_allclose(loaded(XH), torch_out(pm.eval(), XH), atol=1e-5)

    nnx_pm = get_peft_model(heads()[1], MissConfig(**HEADS))
    trained = nnx.state(nnx_pm, nnx_pm.trainable)
    nnx.update(nnx_pm, jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.key(3), a.shape), trained))
    nnx_io.save_pretrained(nnx_pm, str(tmp_path / "nnx"), IDENTITY)
    again = peft.PeftModel.from_pretrained(heads()[0], str(tmp_path / "nnx")).eval()
    assert list(again.peft_config["default"].modules_to_save) == ["lm_head"]  # the config's own names
    assert isinstance(again.base_model.model.my_lm_head, peft.utils.other.ModulesToSaveWrapper)
    assert np.abs(torch_out(again, XH) - np.asarray(heads()[1](XH))).max() > 1e-3
    np.testing.assert_allclose(torch_out(again, XH), nnx_pm(XH), atol=1e-5)
