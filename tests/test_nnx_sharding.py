"""Sharded MiSS on the NNX path (`miss_jax.nnx_sharding`): tunix's Llama 3 / Qwen 3 with their own sharding
annotations (`ShardingConfig.get_default_sharding()`, mesh axes `fsdp` and `tp`) on 8 simulated CPU devices
(tests/conftest.py sets XLA_FLAGS): FSDP(8) on a (8, 1) mesh and FSDP(4) x TP(2) on (4, 2).

The blocks are sharded like their kernel's `out` axis (asserted against a table read off tunix's config); the
sharded step gives the single-device losses on the same global batch; remat as tunix configures it
(`ModelConfig.remat_config`) trains the same; merge keeps every kernel's sharding; `save_pretrained` of the
sharded model writes the unsharded model's PEFT folder; a mesh that does not divide is refused, naming the fix.
Runs in the modern environment (`make test-modern`). Compiles dominate: each run is compiled once (`_run`)."""

from __future__ import annotations

import filecmp
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from interop import nnx_io
from interop import safetensors_io as files
from miss_jax import MissConfig
from miss_jax import nnx_sharding as NS
from miss_jax.nnx import get_peft_model, miss_layers
from miss_jax.sharding import make_mesh, shard_batch

tunix_llama3 = pytest.importorskip("tunix.models.llama3.model")
from tunix.models.qwen3 import model as tunix_qwen3  # noqa: E402

nnx_io.tunix_rules()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INIT = {"balance": True, "mini": "mini", "bat": "bat"}
R, MINI_R = 4, 2
DIMS = dict(num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8, num_kv_heads=2,
            rope_theta=10_000, norm_eps=1e-6)
ARCHS = {
    "llama": (tunix_llama3, lambda remat: tunix_llama3.ModelConfig(**DIMS, weight_tying=False, remat_config=remat),
              nnx_io.TUNIX_LLAMA3),
    "qwen3": (tunix_qwen3, lambda remat: tunix_qwen3.ModelConfig(**DIMS, use_tied_embedding=False, remat_config=remat),
              nnx_io.TUNIX_QWEN3),
}
# The mesh axis of each kernel's `out` axis in tunix's default ShardingConfig (q/k/v `(d, heads, head_dim)`:
# heads on tp; o `(heads, head_dim, d)`: d on fsdp; gate/up `(d, f)`: f on tp; down `(f, d)`: d on fsdp).
OUT_AXIS = {"q_proj": "tp", "k_proj": "tp", "v_proj": "tp", "o_proj": "fsdp", "gate_proj": "tp", "up_proj": "tp",
            "down_proj": "fsdp"}
OUT = {"q_proj": 32, "k_proj": 16, "v_proj": 16, "o_proj": 32, "gate_proj": 48, "up_proj": 48, "down_proj": 32}
SEQ, BATCH, STEPS, LR = 8, 8, 3, 0.1
IDS = np.random.default_rng(0).integers(0, DIMS["vocab_size"], (BATCH, SEQ + 1))  # the global batch, every step
FSDP, FSDP_TP = (8, 1), (4, 2)


def tunix_model(arch: str, remat: str = "NONE") -> nnx.Module:
    """A tiny tunix model with random weights (the same for a seed; tunix zero-inits its MLP kernels)."""
    module, make_config, _ = ARCHS[arch]
    model = getattr(module, {"llama": "Llama3", "qwen3": "Qwen3"}[arch])(
        make_config(getattr(module.RematConfig, remat)), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    state = nnx.state(model, nnx.Param)
    for _, var in nnx.to_flat_state(state):
        if len(var.shape) >= 2:
            var.set_value(jnp.asarray(rng.normal(0, 0.3, var.shape), jnp.float32))
    nnx.update(model, state)
    return model


def loss_fn(model: nnx.Module, batch: dict) -> jax.Array:
    ids, labels = batch["ids"][:, :-1], batch["ids"][:, 1:]
    positions = jnp.broadcast_to(jnp.arange(SEQ), ids.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((SEQ, SEQ), bool)), (ids.shape[0], SEQ, SEQ))
    logits, _ = model(ids, positions, None, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def peft(arch: str, variant: str, remat: str = "NONE"):
    return get_peft_model(tunix_model(arch, remat), MissConfig(r=R, mini_r=MINI_R, init_weights=INIT[variant],
                                                               target_modules=TARGETS))


def tx() -> optax.GradientTransformation:
    return optax.sgd(LR, momentum=0.9)  # state sharded like the blocks; no Adam sign flips on tiny gradients


@functools.cache
def _run(arch: str, variant: str, mesh_shape=None, remat: str = "NONE"):
    """`(losses, peft model, optimizer, mesh)` after `STEPS` steps: sharded on a mesh of `mesh_shape`, or one
    device (the plain NNX step)."""
    model = peft(arch, variant, remat)
    if mesh_shape is None:
        optimizer = nnx.Optimizer(model, tx(), wrt=model.trainable)

        @nnx.jit
        def step(m, opt, batch):
            loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable))(m, batch)
            opt.update(m, grads)
            return loss

        return [float(step(model, optimizer, {"ids": jnp.asarray(IDS)})) for _ in range(STEPS)], model, optimizer, None
    mesh = make_mesh(mesh_shape, NS.TUNIX_AXES)
    NS.shard_model(model, mesh)
    optimizer = NS.shard_optimizer(nnx.Optimizer(model, tx(), wrt=model.trainable), mesh)
    step = NS.make_train_step(loss_fn, model.trainable, mesh)
    batch = shard_batch({"ids": IDS}, mesh, NS.BATCH_SPEC)
    losses = [float(step(model, optimizer, batch)) for _ in range(STEPS)]
    return losses, model, optimizer, mesh


def expected_spec(key: str, variant: str, mesh_shape) -> P:
    """The block's spec read off tunix's config: its `out` axis (balance / mini axis 1, bat axis 0) on the
    kernel's `out` mesh axis when its length divides over it, else replicated."""
    name = key.rsplit(".", 1)[-1]
    axis, length, ndim = {"balance": (1, OUT[name], 2), "mini": (1, MINI_R, 2), "bat": (0, OUT[name] // R, 3)}[variant]
    size = dict(zip(NS.TUNIX_AXES, mesh_shape))[OUT_AXIS[name]]
    spec = [None] * ndim
    spec[axis] = OUT_AXIS[name] if length % size == 0 else None
    return P(*spec)


def placed(x: jax.Array, mesh, spec: P) -> bool:
    return x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


def assert_blocks_sharded(model, variant: str, mesh) -> None:
    layers = miss_layers(model.base_model)
    assert len(layers) == 2 * len(TARGETS)
    for key, layer in layers.items():
        block = layer.miss_block["default"]
        want = expected_spec(key, variant, tuple(mesh.shape.values()))
        assert P(*block.get_metadata()["out_sharding"]) == want, key
        assert placed(block.get_value(), mesh, want), (key, block.get_value().sharding, want)


CASES = [("llama", "balance", FSDP), ("llama", "balance", FSDP_TP), ("llama", "mini", FSDP_TP),
         ("qwen3", "bat", FSDP_TP), ("qwen3", "balance", FSDP)]


@pytest.mark.parametrize("arch, variant, mesh_shape", CASES)
def test_sharded_step_equals_one_device(arch, variant, mesh_shape):
    want, single, _, _ = _run(arch, variant)
    losses, model, optimizer, mesh = _run(arch, variant, mesh_shape)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-5)
    assert_blocks_sharded(model, variant, mesh)
    # only the blocks were trained, and they equal the single-device run's
    for key, layer in miss_layers(model.base_model).items():
        block, ref = layer.miss_block["default"].get_value(), miss_layers(single.base_model)[key].miss_block["default"]
        assert np.abs(np.asarray(block)).max() > 0, key
        np.testing.assert_allclose(np.asarray(block), np.asarray(ref.get_value()), atol=2e-5, err_msg=key)
    base = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(tunix_model(arch), nnx.Param))}
    frozen = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model.base_model, nnx.Param)) if "miss_block" not in p]
    assert len(frozen) == len(base)
    for path, var in frozen:
        ref = base[tuple(p for p in path if p != "base_layer")]
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(ref.get_value()), err_msg=str(path))
    # the base weights sit where tunix's annotations say, the momentum like the block it tracks
    assert placed(model.base_model.layers[0].attn.q_proj.kernel.get_value(), mesh, P("fsdp", "tp", None))
    assert placed(model.base_model.layers[0].mlp.down_proj.kernel.get_value(), mesh, P("tp", "fsdp"))
    momenta = [(p, v) for p, v in nnx.to_flat_state(nnx.state(optimizer, nnx.optimizer.OptState)) if "miss_block" in p]
    assert len(momenta) == 2 * len(TARGETS)
    for path, var in momenta:
        assert placed(var.get_value(), mesh, P(*var.get_metadata()["out_sharding"])), path


@pytest.mark.parametrize("remat", ["BLOCK", "DECODER"])
def test_tunix_remat_trains_the_same_sharded(remat):
    want, _, _, _ = _run("llama", "balance")
    losses, model, _, mesh = _run("llama", "balance", FSDP_TP, remat)
    np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-5)
    assert_blocks_sharded(model, "balance", mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = {"ids": jnp.asarray(IDS)}
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch)))(params))
    assert "checkpoint" in jaxpr or "remat" in jaxpr  # tunix's nnx.remat is in the traced step


def kernels(model) -> dict[str, jax.Array]:
    return {k: layer.kernel.get_value() for k, layer in miss_layers(model.base_model).items()}


def logits(model) -> np.ndarray:
    ids = jnp.asarray(IDS[:2, :SEQ])
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((SEQ, SEQ), bool)), (2, SEQ, SEQ))
    return np.asarray(model(ids, jnp.broadcast_to(jnp.arange(SEQ), ids.shape), None, mask)[0])


@pytest.mark.parametrize("arch, variant", [("llama", "balance"), ("qwen3", "bat")])
def test_merge_keeps_every_kernel_sharding(arch, variant):
    model = nnx.clone(_run(arch, variant, FSDP_TP)[1])  # the cached run stays unmerged
    before, want = kernels(model), logits(model)
    model.merge_adapter()
    for key, kernel in kernels(model).items():
        assert kernel.sharding == before[key].sharding, key
        assert np.abs(np.asarray(kernel) - np.asarray(before[key])).max() > 0, key
    np.testing.assert_allclose(logits(model), want, atol=1e-4)
    model.unmerge_adapter()
    for key, kernel in kernels(model).items():
        assert kernel.sharding == before[key].sharding, key
        np.testing.assert_allclose(np.asarray(kernel), np.asarray(before[key]), atol=1e-5, err_msg=key)
    plain = model.merge_and_unload()  # tunix's own layers again, merged kernels where they were
    for key, kernel in before.items():
        layer = functools.reduce(lambda m, k: m[int(k)] if k.isdigit() else getattr(m, k), key.split("."), plain)
        assert type(layer).__name__ in ("Einsum", "Linear"), key
        merged = layer.w if hasattr(layer, "w") else layer.kernel
        assert merged.get_value().sharding == kernel.sharding, key
    np.testing.assert_allclose(logits(plain), want, atol=1e-4)


def test_save_pretrained_of_the_sharded_model_is_the_unsharded_folder(tmp_path):
    _, model, _, _ = _run("llama", "balance", FSDP_TP)
    _, single, _, _ = _run("llama", "balance")
    nnx_io.save_pretrained(model, str(tmp_path / "sharded"), nnx_io.TUNIX_LLAMA3)
    gathered = nnx.clone(model)
    nnx.update(gathered, jax.device_put(nnx.state(gathered), jax.devices()[0]))
    assert len(miss_layers(gathered.base_model)["layers.0.attn.q_proj"].miss_block["default"].get_value()
               .sharding.device_set) == 1
    nnx_io.save_pretrained(gathered, str(tmp_path / "gathered"), nnx_io.TUNIX_LLAMA3)
    nnx_io.save_pretrained(single, str(tmp_path / "single"), nnx_io.TUNIX_LLAMA3)
    names = sorted(os.listdir(tmp_path / "sharded"))
    assert names == sorted(os.listdir(tmp_path / "gathered")) and "adapter_model.safetensors" in names
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "sharded", tmp_path / "gathered", names, shallow=False)
    assert mismatch == [] and errors == []
    assert files.read_config(str(tmp_path / "sharded")) == files.read_config(str(tmp_path / "single"))
    sharded, single_t = files.read_tensors(str(tmp_path / "sharded")), files.read_tensors(str(tmp_path / "single"))
    assert sorted(sharded) == sorted(single_t) and len(sharded) == 2 * len(TARGETS)
    for k in sharded:
        np.testing.assert_allclose(np.asarray(sharded[k]), np.asarray(single_t[k]), atol=2e-5, err_msg=k)


def test_a_mesh_that_does_not_divide_is_refused_naming_the_fix():
    model = peft("llama", "balance")
    before = jax.tree.leaves(nnx.state(model))
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.k_proj\.base_layer\.w.* dimension 2 does not split "
                                         r"over mesh axes 'tp' \(4 shards\); pick a mesh shape whose axes divide "
                                         r"it.*shd_config"):
        NS.shard_model(model, make_mesh((2, 4), NS.TUNIX_AXES))  # 2 kv heads over tp=4
    with pytest.raises(ValueError, match=r"names mesh axes \['tp', 'fsdp'\].*Build the mesh with the axes the "
                                         r"model names .*\('fsdp', 'tp'\)"):
        NS.shard_model(model, make_mesh((4, 2)))  # axes ("data", "model")
    after = jax.tree.leaves(nnx.state(model))
    assert all(a is b for a, b in zip(before, after))  # nothing moved
    assert all(len(x.sharding.device_set) == 1 for x in after if hasattr(x, "sharding"))
