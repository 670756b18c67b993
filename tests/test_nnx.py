"""MiSS for Flax NNX (`miss_jax.nnx`): init, forward against independent references, merge/unmerge,
training with `nnx.Optimizer`, `nnx.jit`, and errors, on a tiny attention + MLP model."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import miss_jax.nnx as miss_nnx
from miss_jax import MissConfig, ops
from miss_jax.nnx import MissLinear, MissParam, apply_miss, merge_and_unload, miss_layers
from reference import ref_merge

D = 16
MLP_HIDDEN = 18  # down_proj has in=18, not a multiple of r=4


class Attention(nnx.Module):
    """Single-head self-attention with a residual and a LayerNorm."""

    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = nnx.Linear(D, D, rngs=rngs)
        self.k_proj = nnx.Linear(D, D, rngs=rngs)
        self.v_proj = nnx.Linear(D, D, rngs=rngs)
        self.o_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.norm = nnx.LayerNorm(D, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / D**0.5)
        return self.norm(x + self.o_proj(att @ v))


class TinyModel(nnx.Module):
    """`(batch, seq, 16)` -> `(batch, seq, 16)`: two attention blocks, then a 16 -> 18 -> 16 MLP."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([Attention(rngs) for _ in range(2)])
        self.up_proj = nnx.Linear(D, MLP_HIDDEN, rngs=rngs)
        self.down_proj = nnx.Linear(MLP_HIDDEN, D, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return self.down_proj(nnx.gelu(self.up_proj(x)))


CONFIGS = {
    "balance": MissConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "mini": MissConfig(r=4, mini_r=2, init_weights="mini", target_modules=["q_proj", "v_proj", "down_proj"]),
    "bat": MissConfig(r=4, init_weights="bat", target_modules=["q_proj", "v_proj", "o_proj"]),
}
X = jax.random.normal(jax.random.key(0), (2, 5, D))


def base_model() -> TinyModel:
    return TinyModel(nnx.Rngs(0))


def adapted(variant: str) -> TinyModel:
    """The base model with `variant` applied and random (non-zero) blocks."""
    model = apply_miss(base_model(), CONFIGS[variant], nnx.Rngs(1))
    randomize(model)
    return model


def mixed() -> TinyModel:
    """Balance on q_proj, bat on v_proj and o_proj, mini (with dropout) on down_proj; random blocks."""
    model = base_model()
    apply_miss(model, MissConfig(r=4, target_modules=["q_proj"]), nnx.Rngs(1))
    apply_miss(model, MissConfig(r=4, init_weights="bat", target_modules=["v_proj", "o_proj"]), nnx.Rngs(2))
    apply_miss(
        model,
        MissConfig(r=4, mini_r=4, init_weights="mini", miss_dropout=0.1, target_modules=["down_proj"]),
        nnx.Rngs(3),
    )
    randomize(model)
    return model


def randomize(model: nnx.Module, scale: float = 0.1) -> None:
    for i, layer in enumerate(miss_layers(model).values()):
        for block in layer.miss_block.values():
            block[...] = scale * jax.random.normal(jax.random.key(100 + i), block.shape)


def miss_leaves(model: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, MissParam))]


def frozen_leaves(model: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(MissParam))))]


def reference_kernel(kernel: jax.Array, layer: MissLinear) -> np.ndarray:
    """`kernel` `(in, out)` adapted by `layer`'s block, by the NumPy reference maths (not ops)."""
    weight = np.asarray(kernel, np.float64).T  # torch layout (out, in)
    (name,) = layer.variants
    return ref_merge(weight, np.asarray(layer.miss_block[name][...], np.float64), layer.variants[name]).T


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_zero_init_equals_base_and_shapes(variant):
    base = base_model()
    model = apply_miss(base_model(), CONFIGS[variant], nnx.Rngs(1))
    layers = miss_layers(model)
    targets = CONFIGS[variant].target_modules
    expected = sorted(k for k in miss_nnx.discover(base) if k.rsplit(".", 1)[-1] in targets)
    assert sorted(layers) == expected
    for layer in layers.values():
        r, out = 4, layer.out_features
        shape = {"balance": (r, out), "mini": (r, 2), "bat": (out // r, r, r)}[variant]
        assert layer.miss_block["default"].shape == shape
        assert isinstance(layer.miss_block["default"], MissParam) and not layer.merged
    np.testing.assert_allclose(model(X), base(X), atol=1e-6)


def test_random_init_changes_output():
    base = base_model()
    config = MissConfig(r=4, init_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])
    model = apply_miss(base_model(), config, nnx.Rngs(1))
    blocks = miss_leaves(model)
    assert len(blocks) == 5 and all(b.shape == (4, D) for b in blocks)
    assert all(np.abs(b).max() <= 1 / D**0.5 and np.abs(b).min() > 0 for b in blocks)  # U(-1/sqrt(out), ..)
    assert np.abs(np.asarray(model(X) - base(X))).max() > 1e-3


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_forward_matches_references(variant):
    model = adapted(variant)
    for key, layer in miss_layers(model).items():
        x = jax.random.normal(jax.random.key(1), (3, layer.in_features))
        base = layer.base_layer
        bias = np.asarray(base.bias[...]) if base.bias is not None else 0.0
        want = np.asarray(x, np.float64) @ reference_kernel(base.kernel[...], layer) + bias
        np.testing.assert_allclose(layer(x), want, atol=1e-5, err_msg=key)
        if variant == "bat":
            direct = x @ ops.bat_kernel(base.kernel[...], layer.miss_block["default"][...]) + bias
        else:
            block = layer.miss_block["default"][...]
            block = ops.expand_mini(block, layer.out_features) if variant == "mini" else block
            direct = base(x) + ops.balance_output(x, block)
        np.testing.assert_allclose(layer(x), direct, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_merge_equals_unmerged_and_unmerge_restores(variant):
    model = adapted(variant)
    layers = miss_layers(model)
    kernels = {k: np.asarray(m.base_layer.kernel[...]) for k, m in layers.items()}
    y = model(X)
    for m in layers.values():
        m.merge()
        m.merge()  # a merged layer stays as it is
    assert all(m.merged for m in layers.values())
    for k, m in layers.items():
        np.testing.assert_allclose(m.base_layer.kernel[...], reference_kernel(kernels[k], m), atol=1e-5)
    np.testing.assert_allclose(model(X), y, atol=1e-5)
    for m in layers.values():
        m.unmerge()
    assert not any(m.merged for m in layers.values())
    for k, m in layers.items():
        np.testing.assert_allclose(m.base_layer.kernel[...], kernels[k], atol=1e-5)
    np.testing.assert_allclose(model(X), y, atol=1e-5)


def test_merge_and_unload_gives_plain_linears():
    model = mixed()
    model.eval()  # no adapter dropout, so the output is deterministic
    y = model(X)
    keys = sorted(miss_layers(model))
    assert merge_and_unload(model) is model
    assert miss_layers(model) == {} and miss_leaves(model) == []
    linears = miss_nnx.discover(model)
    assert all(linears[k].type_name == "Linear" for k in keys)
    assert type(model.layers[1].v_proj) is nnx.Linear and type(model.down_proj) is nnx.Linear
    np.testing.assert_allclose(model(X), y, atol=1e-5)


def test_jit_matches_eager_forward_and_merge():
    model = mixed()
    model.eval()
    eager = model(X)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, X), eager, atol=1e-5)

    @nnx.jit
    def merge_all(m):
        for layer in miss_layers(m).values():
            layer.merge()

    merge_all(model)
    assert all(layer.merged for layer in miss_layers(model).values())
    np.testing.assert_allclose(model(X), eager, atol=1e-5)


def test_dropout_follows_train_and_eval():
    base = nnx.Linear(D, D, rngs=nnx.Rngs(0))
    layer = MissLinear(base, MissConfig(r=4, miss_dropout=0.5, init_weights=False), rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (4, D))
    clean = base(x) + ops.balance_output(x, layer.miss_block["default"][...])
    first, second = layer(x), layer(x)
    assert np.abs(np.asarray(first - second)).max() > 1e-4  # a fresh mask each call
    assert np.abs(np.asarray(first - clean)).max() > 1e-4
    layer.eval()
    np.testing.assert_allclose(layer(x), clean, atol=1e-6)


def test_adamw_trains_only_miss_params():
    model = mixed()
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=MissParam)
    target = jax.random.normal(jax.random.key(3), X.shape)

    def loss_fn(m):
        return jnp.mean((m(X) - target) ** 2)

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, MissParam))(m)
        opt.update(m, grads)
        return loss, grads

    frozen, blocks = frozen_leaves(model), miss_leaves(model)
    losses = []
    for _ in range(8):
        loss, grads = step(model, optimizer)
        losses.append(float(loss))
    grad_types = {type(v) for v in jax.tree.leaves(grads, is_leaf=lambda v: isinstance(v, nnx.Variable))}
    assert grad_types == {MissParam}
    assert losses[-1] < losses[0]
    for before, after in zip(frozen, frozen_leaves(model)):
        np.testing.assert_array_equal(before, after)
    assert all(np.abs(b - a).max() > 0 for b, a in zip(blocks, miss_leaves(model)))


@pytest.mark.parametrize(
    "config, expected",
    [
        (
            MissConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers"),
            ["layers.1.q_proj"],
        ),
        (MissConfig(r=4, target_modules=r"layers\.0\.(k|v)_proj"), ["layers.0.k_proj", "layers.0.v_proj"]),
        (MissConfig(r=4, target_modules=["layers.0.q_proj", "up_proj"]), ["layers.0.q_proj", "up_proj"]),
        (MissConfig(r=4, target_modules="all-linear", exclude_modules=["o_proj"]),
         [f"layers.{i}.{n}" for i in (0, 1) for n in ("k_proj", "q_proj", "v_proj")] + ["down_proj", "up_proj"]),
    ],
    ids=["layers_to_transform", "regex", "path", "all-linear"],
)
def test_peft_matching_rules_on_graph_paths(config, expected):
    assert sorted(miss_layers(apply_miss(base_model(), config, nnx.Rngs(1)))) == sorted(expected)


def test_layers_inside_nnx_containers():
    rngs = nnx.Rngs(0)
    seq = nnx.Sequential(nnx.Linear(8, 8, rngs=rngs), nnx.relu)
    model = nnx.Dict({"seq": seq, "items": nnx.Linear(8, 4, rngs=rngs)})  # "items": a key that is a dict method
    x = jnp.ones((2, 8))
    y = model["items"](model["seq"](x))
    apply_miss(model, MissConfig(r=4, init_weights=False, target_modules="all-linear"), nnx.Rngs(1))
    assert sorted(miss_layers(model)) == ["items", "seq.layers.0"]
    assert isinstance(model["seq"].layers[0], MissLinear) and isinstance(model["items"], MissLinear)
    assert np.abs(np.asarray(model["items"](model["seq"](x)) - y)).max() > 1e-4
    merge_and_unload(model)
    assert type(model["items"]) is nnx.Linear and type(model["seq"].layers[0]) is nnx.Linear


@pytest.mark.parametrize(
    "config, message",
    [
        (MissConfig(r=32, target_modules=["down_proj"]), r"down_proj.*less than or equal to in_features \(18\)"),
        (MissConfig(r=4, init_weights="bat", target_modules=["q_proj", "down_proj"]), r"down_proj.*divisible by r"),
        (MissConfig(r=4, init_weights="mini", mini_r=5, target_modules=["q_proj"]), r"q_proj.*mini_r \(5\)"),
        (MissConfig(r=4, target_modules=["qproj"]), r"not found in the base model.*q_proj"),
        (MissConfig(r=4, target_modules=["norm"]), r"layers\.0\.norm is a LayerNorm, which has no layer rule.*register"),
        (MissConfig(r=4, target_modules=None), r"pass `target_modules`"),
        (MissConfig(r=4, bias="all", target_modules=["q_proj"]), r"bias='all'.*get_peft_model"),
    ],
    ids=["r>in", "bat-indivisible", "mini-indivisible", "no-match", "wrong-type", "no-default", "bias"],
)
def test_bad_inputs_raise_and_change_nothing(config, message):
    model = base_model()
    with pytest.raises(ValueError, match=message):
        apply_miss(model, config, nnx.Rngs(1))
    assert miss_layers(model) == {}


def test_adapting_twice_raises():
    model = apply_miss(base_model(), CONFIGS["balance"], nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"Already has an adapter 'default'.*another adapter name"):
        apply_miss(model, MissConfig(r=4, target_modules=["v_proj"]), nnx.Rngs(2))
    assert list(miss_layers(model)["layers.0.v_proj"].variants) == ["default"]
    with pytest.raises(ValueError, match="LayerNorm, which has no layer rule"):
        MissLinear(model.layers[0].norm, CONFIGS["balance"], rngs=nnx.Rngs(2))


# ----------------------------------------------------------------------------- PEFT's model for NNX (parity)


def peft_model(**extra) -> miss_nnx.MissNnxModel:
    return miss_nnx.get_peft_model(base_model(), MissConfig(r=4, init_weights=False, target_modules=["q_proj", "v_proj"],
                                                            **extra))


def test_several_adapters_compose_like_linen_and_merge():
    pm = peft_model()
    pm.add_adapter("bat", MissConfig(r=4, init_weights="bat", target_modules=["q_proj", "o_proj"]))
    pm.add_adapter("mini", MissConfig(r=4, mini_r=4, init_weights="mini", target_modules=["q_proj"]))
    randomize(pm.base_model)
    y_default = pm(X)
    pm.set_adapter(["mini", "default", "bat"])
    y = pm(X)
    layer = miss_layers(pm.base_model)["layers.0.q_proj"]
    assert layer.forward_adapters() == ("bat", "mini", "default")  # bat first, then the additive terms
    x = jax.random.normal(jax.random.key(1), (3, D))
    base = layer.base_layer
    kernel = ops.bat_kernel(base.kernel[...], layer.miss_block["bat"][...])
    want = x @ kernel + base.bias[...] + sum(
        ops.balance_output(x, ops.variant(layer.variants[n]).effective_block(layer.miss_block[n][...], D))
        for n in ("mini", "default"))
    np.testing.assert_allclose(layer(x), want, atol=1e-5)
    pm.merge_adapter()
    assert pm.merged_adapters == ["default", "bat", "mini"]
    np.testing.assert_allclose(pm(X), y, atol=1e-5)
    with pm.disable_adapter():
        np.testing.assert_allclose(pm(X), base_model()(X), atol=1e-5)
    np.testing.assert_allclose(pm(X), y, atol=1e-5)  # merged back after the context
    pm.unmerge_adapter()
    np.testing.assert_allclose(frozen_leaves(pm.base_model)[0], frozen_leaves(base_model())[0], atol=1e-6)
    with pytest.raises(ValueError, match="Unknown adapter"):
        pm.set_adapter("nope")
    pm.set_adapter("default")
    np.testing.assert_allclose(pm(X), y_default, atol=1e-6)
    pm.delete_adapter("bat")
    assert "bat" not in miss_layers(pm.base_model)["layers.0.q_proj"].variants
    assert type(pm.base_model.layers[0].o_proj) is nnx.Linear  # no adapter left there: the plain layer is back


def test_bias_modules_to_save_counts_and_training():
    pm = peft_model(bias="MiSS_only", modules_to_save=["up_proj"])
    assert isinstance(pm.base_model.up_proj, miss_nnx.ModulesToSave)
    blocks = 4 * (4 * D)  # q_proj, v_proj in two layers, (r, out) each
    biases = 4 * D
    copy = D * MLP_HIDDEN + MLP_HIDDEN
    total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(base_model(), nnx.Param)))
    assert pm.get_nb_trainable_parameters() == (blocks + biases + copy, total + blocks + copy)
    target = jax.random.normal(jax.random.key(3), X.shape)
    optimizer = nnx.Optimizer(pm, optax.adamw(1e-2), wrt=pm.trainable)
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(pm, nnx.Param))}

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(X) - target) ** 2),
                                         argnums=nnx.DiffState(0, pm.trainable))(m)
        opt.update(m, grads)
        return loss

    for _ in range(3):
        step(pm, optimizer)
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(pm, nnx.Param))}
    changed = {".".join(map(str, k)) for k in before if np.abs(before[k] - after[k]).max() > 0}
    assert changed == {".".join(map(str, p)) + s for p in pm.trainable_paths()
                       for s in ([""] if p[-1] != "default" or p[-2] != "modules_to_save" else [".kernel", ".bias"])}
    np.testing.assert_array_equal(after[("base_model", "up_proj", "original_module", "kernel")],
                                  before[("base_model", "up_proj", "original_module", "kernel")])
    with pm.disable_adapter():  # the original module, the base kernels (trained biases stay, as in PEFT)
        assert pm.base_model.up_proj.in_use() is pm.base_model.up_proj.original_module
    plain = pm.merge_and_unload()
    assert type(plain.up_proj) is nnx.Linear and type(plain.layers[0].q_proj) is nnx.Linear


def test_param_dtype_and_sharding_follow_the_kernel():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    kernel = jax.device_put(jnp.ones((16, 32)), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model")))

    class One(nnx.Module):
        def __init__(self):
            self.q_proj = nnx.Linear(16, 32, rngs=nnx.Rngs(0))
            self.q_proj.kernel.set_value(kernel)

        def __call__(self, x):
            return self.q_proj(x)

    for init, axis in ((True, 1), ("bat", 0)):
        pm = miss_nnx.get_peft_model(One(), MissConfig(r=4, init_weights=init, target_modules=["q_proj"]),
                                     param_dtype=jnp.bfloat16)
        block = pm.base_model.q_proj.miss_block["default"]
        assert block.get_value().dtype == jnp.bfloat16
        spec = [None] * block.ndim
        spec[axis] = "model"
        assert block.get_value().sharding.spec == jax.sharding.PartitionSpec(*spec)
        assert block.get_metadata()["out_sharding"] == tuple(spec)


def test_block_sharding_only_where_it_divides():
    """The block's `out` axis is sharded like the kernel's only where it is known to divide over those mesh
    axes (4 `model` shards): on the mesh of the kernel's array, or the current abstract mesh; replicated when
    it does not divide or no mesh is known (an `out_sharding` annotation alone)."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    class One(nnx.Module):
        def __init__(self, out: int):
            init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
            self.q_proj = nnx.Linear(16, out, kernel_init=init, rngs=nnx.Rngs(0))

    # (out, init_weights, block spec on the mesh); blocks: bat (out // 4, 4, 4), mini (4, 2), balance (4, out)
    cases = [
        (8, "bat", (None, None, None)),  # 2 bat blocks do not split 4 ways
        (32, "bat", ("model", None, None)),  # 8 do
        (32, "mini", (None, None)),  # mini_r=2 does not
        (32, True, (None, "model")),
    ]
    for out, init, spec in cases:
        config = MissConfig(r=4, mini_r=2, init_weights=init, target_modules=["q_proj"])
        with jax.set_mesh(mesh):  # eager sharding: the kernel is created sharded on the mesh
            block = apply_miss(One(out), config, nnx.Rngs(1)).q_proj.miss_block["default"]
        assert block.get_value().sharding.spec == jax.sharding.PartitionSpec(*spec), (out, init)
        assert block.get_metadata()["out_sharding"] == spec
        with nnx.use_eager_sharding(False):  # the kernel carries the annotation only
            annotated, unknown = One(out), One(out)
        with jax.set_mesh(mesh):  # the abstract mesh decides
            block = apply_miss(annotated, config, nnx.Rngs(1)).q_proj.miss_block["default"]
        assert block.get_metadata()["out_sharding"] == spec, (out, init)
        block = apply_miss(unknown, config, nnx.Rngs(1)).q_proj.miss_block["default"]  # no mesh: replicated
        assert block.get_metadata()["out_sharding"] == (None,) * len(spec), (out, init)


def test_peft_model_errors_change_nothing():
    pm = peft_model()
    before = [np.asarray(v) for v in jax.tree.leaves(nnx.state(pm, nnx.Param))]
    for config, message in [
        (MissConfig(r=4, target_modules=["q_proj"], modules_to_save=["nothing"]), "modules_to_save.*not found"),
        (MissConfig(r=32, target_modules=["down_proj"]), "less than or equal"),
    ]:
        with pytest.raises(ValueError, match=message):
            pm.add_adapter("other", config)
    with pytest.raises(ValueError, match="already exists"):
        pm.add_adapter("default", MissConfig(r=4, target_modules=["q_proj"]))
    assert list(pm.adapters) == ["default"]
    after = [np.asarray(v) for v in jax.tree.leaves(nnx.state(pm, nnx.Param))]
    assert len(before) == len(after) and all(np.array_equal(a, b) for a, b in zip(before, after))


def test_miss_jax_imports_without_transformers():
    """Issue 14: the core (ops, nnx, train, PEFT I/O) installs and imports without transformers."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None; import miss_jax, miss_jax.nnx, miss_jax.train, "
            "interop, interop.nnx_io")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
