"""MiSS on Linen `nn.DenseGeneral` layers (Linen transform): a model with DenseGeneral projections against its
twin with `nn.Dense` layers holding the same kernels flattened (`layer_rules.KernelRule`'s row-major contract):
same forward, merge, train step and PEFT folder, for every variant; and the layers MiSS refuses."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from miss_jax import MissConfig, MissModel, get_peft_model, tree
from miss_jax.train import create_train_state, make_train_step
from miss_jax.tree import Path

D, H, HD = 16, 2, 4  # d_model, heads, head_dim: q_proj is (in 16, out 8), o_proj (in 8, out 16)
X = jax.random.normal(jax.random.key(0), (2, 3, D))
TARGETS = ["q_proj", "o_proj"]
CONFIGS = {
    "balance": dict(r=4, init_weights=False, bias="MiSS_only", modules_to_save=["v_proj"]),
    "mini": dict(r=4, mini_r=4, init_weights="mini"),
    "bat": dict(r=4, init_weights="bat"),
}


class GeneralAttention(nn.Module):
    """q/v: `DenseGeneral((H, HD))`, kernel `(D, H, HD)`; o: `DenseGeneral(D, axis=(-2, -1))`, kernel `(H, HD, D)`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        q = nn.DenseGeneral((H, HD), name="q_proj")(x)
        v = nn.DenseGeneral((H, HD), name="v_proj")(x)
        return nn.DenseGeneral(D, axis=(-2, -1), name="o_proj")(jnp.tanh(q) * v)


class DenseAttention(nn.Module):
    """The same map with `nn.Dense` layers on the flattened `H * HD` axis."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        q = nn.Dense(H * HD, name="q_proj")(x)
        v = nn.Dense(H * HD, name="v_proj")(x)
        return nn.Dense(D, name="o_proj")(jnp.tanh(q) * v)


class Net(nn.Module):
    attention: type

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.attention(name="attn")(x)


class LinenModel:
    """What `MissModel` uses of a transformers Flax model, around a Linen module of `x` `(B, T, D)`."""

    config = None

    def __init__(self, module: nn.Module, params: Mapping) -> None:
        self.module, self.params, self.input_shape = module, params, X.shape

    def init_weights(self, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
        return self.module.init(rng, jnp.zeros(input_shape))["params"]

    def __call__(self, x: jax.Array, params: Optional[Mapping] = None, train: bool = False,
                 dropout_rng: Optional[jax.Array] = None) -> jax.Array:
        rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
        return self.module.apply({"params": self.params if params is None else params}, x, rngs=rngs)


def flattened(path: Path, leaf: Any) -> Any:
    """A leaf of the DenseGeneral model's trees as the Dense twin holds it (kernels and biases flattened)."""
    if path[-1] == "bias" and leaf.ndim == 2:
        return leaf.reshape(-1)
    if path[-1] == "kernel":
        return leaf.reshape(-1, D) if "o_proj" in path else leaf.reshape(D, -1)
    return leaf


def to_dense(general_tree: Mapping) -> dict:
    return tree.unflatten({p: flattened(p, v) for p, v in tree.flatten(general_tree).items()})


GENERAL_PARAMS = Net(GeneralAttention).init(jax.random.key(1), X)["params"]


def base_models() -> tuple[LinenModel, LinenModel]:
    return (LinenModel(Net(GeneralAttention), GENERAL_PARAMS),
            LinenModel(Net(DenseAttention), to_dense(GENERAL_PARAMS)))


def random_like(trainable: Mapping, seed: int) -> dict:
    """Small random values in place of every leaf (so the adapter, its bias and copies all matter)."""
    flat = tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    return tree.unflatten({p: 0.1 * jax.random.normal(k, v.shape, v.dtype) for (p, v), k in zip(flat.items(), keys)})


def adapted_pair(variant: str) -> tuple[MissModel, MissModel]:
    """The DenseGeneral model and its Dense twin, with the same (random) adapter."""
    general, dense = (get_peft_model(m, MissConfig(target_modules=TARGETS, **CONFIGS[variant])) for m in base_models())
    values = random_like(general.trainable_params(), seed=2)
    general.update_params(values)
    dense.update_params(to_dense(values))
    return general, dense


def close(a: Any, b: Any, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


def test_discovery_records_the_flattened_sizes() -> None:
    pm, _ = adapted_pair("balance")
    q, o = pm.layers["attn.q_proj"], pm.layers["attn.o_proj"]
    assert (q.in_features, q.out_features, q.kernel_shape) == (D, H * HD, (D, H, HD))
    assert (o.in_features, o.out_features, o.kernel_shape) == (H * HD, D, (H, HD, D))
    assert tree.get(pm.adapter_params, ("miss", "default", "attn", "o_proj", "miss_block")).shape == (4, D)


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_forward_and_merge_equal_the_dense_twin(variant: str) -> None:
    general, dense = adapted_pair(variant)
    out = general(X)
    close(out, dense(X))
    assert float(jnp.abs(out - LinenModel(Net(GeneralAttention), GENERAL_PARAMS)(X)).max()) > 1e-3  # adapted

    general.merge_adapter()
    dense.merge_adapter()
    close(general(X), out)
    close(to_dense(general.params)["attn"]["q_proj"]["kernel"], dense.params["attn"]["q_proj"]["kernel"])
    close(to_dense(general.params)["attn"]["o_proj"]["kernel"], dense.params["attn"]["o_proj"]["kernel"])
    general.unmerge_adapter()
    close(general.params["attn"]["o_proj"]["kernel"], GENERAL_PARAMS["attn"]["o_proj"]["kernel"])

    model, params = general.merge_and_unload(return_params=True)
    assert params["attn"]["q_proj"]["kernel"].shape == (D, H, HD)
    close(model(X, params=params), out)


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_peft_folder_equals_the_dense_twins_and_loads_back(variant: str, tmp_path) -> None:
    general, dense = adapted_pair(variant)
    for suffix, as_lora in (("", False), ("_lora", True)):  # MiSS folders, and their LoRA export
        general.save_pretrained(str(tmp_path / f"general{suffix}"), as_lora=as_lora)
        dense.save_pretrained(str(tmp_path / f"dense{suffix}"), as_lora=as_lora)
    files = {}
    for name in ("general", "dense", "general_lora", "dense_lora"):
        with open(tmp_path / name / "adapter_config.json", encoding="utf-8") as f:
            files[name] = (json.load(f), load_file(str(tmp_path / name / "adapter_model.safetensors")))
    (config_g, tensors_g), (config_d, tensors_d) = files["general"], files["dense"]
    assert config_g["target_modules"] == config_d["target_modules"] and config_g == config_d
    assert sorted(tensors_g) == sorted(tensors_d)
    for key in tensors_d:
        assert tensors_g[key].shape == tensors_d[key].shape, key
        np.testing.assert_array_equal(tensors_g[key], tensors_d[key], err_msg=key)
    lora_g, lora_d = files["general_lora"][1], files["dense_lora"][1]
    assert sorted(lora_g) == sorted(lora_d)
    for key in lora_d:
        close(lora_g[key], lora_d[key])
    if variant == "balance":  # the saved DenseGeneral copy is torch's Linear weight (out, in), its bias (out,)
        assert tensors_g["base_model.model.attn.v_proj.weight"].shape == (H * HD, D)
        assert tensors_g["base_model.model.attn.q_proj.base_layer.bias"].shape == (H * HD,)

    loaded = MissModel.from_pretrained(base_models()[0], str(tmp_path / "general"), is_trainable=True)
    close(loaded(X), general(X))
    for path, value in tree.flatten(general.trainable_params()).items():
        np.testing.assert_array_equal(tree.get(loaded.trainable_params(), path), value, err_msg=str(path))
    # the twin's folder loads into the DenseGeneral model, beside another adapter
    other = get_peft_model(base_models()[0], MissConfig(r=4, target_modules=["q_proj"]), "first")
    other.load_adapter(str(tmp_path / "dense"), "from_dense")
    other.set_adapter("from_dense")
    close(other(X), general(X))


def mse(outputs: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    return jnp.mean((outputs - batch["y"]) ** 2)


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_train_step_changes_only_the_adapter_as_on_the_dense_twin(variant: str) -> None:
    batch = {"x": X, "y": jnp.ones((2, 3, D))}
    trained = {}
    for name, pm in zip(("general", "dense"), adapted_pair(variant)):
        tx = optax.sgd(0.1)
        base, before = pm.params, pm.trainable_params()
        state, loss = make_train_step(pm, tx, mse)(pm.params, create_train_state(pm, tx), batch, jax.random.key(3))
        assert np.isfinite(float(loss))
        assert pm.params is base
        for path, value in tree.flatten(before).items():
            assert not np.allclose(tree.get(pm.trainable_params(), path), value), path
        trained[name] = pm.trainable_params()
    for path, value in tree.flatten(trained["dense"]).items():
        close(tree.flatten(to_dense(trained["general"]))[path], value)


class Unadaptable(nn.Module):
    """A DenseGeneral `odd` (built from `odd_args`) that MiSS cannot adapt, beside a Dense."""

    odd_args: tuple[tuple[str, Any], ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(4, name="dense")(x).sum() + nn.DenseGeneral(**dict(self.odd_args), name="odd")(x).sum()


REFUSED = {  # DenseGeneral arguments, what the error names
    "batch_dims": ((("features", 4), ("batch_dims", (0,))), r"batch_dims=\(0,\)"),
    "axes out of order": ((("features", 4), ("axis", (-1, -2))), r"axis=\(-1, -2\)"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unadaptable_dense_general_is_refused_by_name_and_skipped_by_all_linear(case: str) -> None:
    args, message = REFUSED[case]
    module = Unadaptable(args)
    base = LinenModel(module, module.init(jax.random.key(0), X)["params"])
    with pytest.raises(ValueError, match=rf"Cannot adapt odd \(DenseGeneral\).*{message}.*target_modules"):
        get_peft_model(base, MissConfig(r=4, target_modules=["odd"]))
    pm = get_peft_model(base, MissConfig(r=4, target_modules="all-linear"))
    assert [layer.key for layer in pm.plan.spec("default").layers] == ["dense"]


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_positive_axes_count_from_the_input(variant: str) -> None:
    class Positive(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            return nn.DenseGeneral((H, HD), axis=2, name="q_proj")(x)

    module = Positive()
    params = module.init(jax.random.key(0), X)["params"]
    config = {k: v for k, v in CONFIGS[variant].items() if k not in ("bias", "modules_to_save")}
    pm = get_peft_model(LinenModel(module, params), MissConfig(target_modules=["q_proj"], **config))
    assert (pm.layers["q_proj"].in_features, pm.layers["q_proj"].out_features) == (D, H * HD)
    pm.update_params(random_like(pm.trainable_params(), seed=4))
    out = pm(X)
    pm.merge_adapter()
    close(pm(X), out)
