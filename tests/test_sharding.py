"""Sharded MiSS on 8 simulated CPU devices (tests/conftest.py sets XLA_FLAGS), tiny Llama, all 7 projections.

Adapters are created sharded like their kernels; the sharded step (data parallel, FSDP, tensor parallel)
equals the single-device step; merge/unmerge keep every kernel's sharding; orbax checkpoints restore
onto another mesh shape; on tensor-parallel meshes the adapter path adds no all-gather of a kernel.
Compiles dominate the runtime, so every (variant, mesh, strategy) step is compiled once (`_run`).
"""

from __future__ import annotations

import copy
import functools
import re
import types

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import tiny_models as tm
from miss_jax import MissConfig, adapters, get_peft_model, linen
from miss_jax import sharding as S
from miss_jax import train as T

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INIT = {"balance": True, "mini": "mini", "bat": "bat"}
TP, FSDP, DP = "tensor_parallel", "fsdp", "data_parallel"
ATOL = 1e-5


def _config(variant: str, mini_r: int = 8, init=None) -> MissConfig:
    return MissConfig(r=4, mini_r=mini_r, init_weights=INIT[variant] if init is None else init, target_modules=TARGETS)


def _base():
    """The shared tiny Llama, shallow-copied: merge_and_unload sets `params` on the copy only."""
    return copy.copy(tm.flax_model("llama"))


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


def _np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def _same_sharding(a: jax.Array, sharding) -> bool:
    return a.sharding.is_equivalent_to(sharding, a.ndim)


def _assert(ok: bool) -> None:
    assert ok


def _assert_close(a, b, atol: float = ATOL) -> None:
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@functools.lru_cache(maxsize=None)
def _mesh(shape: tuple[int, int]):
    return S.make_mesh(shape)


def _sharded_model(variant: str, shape, strategy: str, **config_kw):
    """A model on `shape` with its adapter created abstractly, then directly sharded."""
    mesh, rules = _mesh(shape), S.llama_rules(strategy)
    base = _base()
    params = jax.device_put(base.params, S.param_shardings(base.params, mesh, rules))
    pm = get_peft_model(base, _config(variant, **config_kw), params=params, low_cpu_mem_usage=True)
    S.shard_peft_model(pm, mesh, rules)
    return pm, mesh, rules


def _batch(n: int = 8, seq: int = 6) -> dict:
    # 8 x 6 tokens: no activation has a kernel's shape (kernels are 16/32/64/96 wide), see kernel_gathers.
    return tm.inputs("llama", batch=n, seq=seq)


TX = optax.adamw(1e-2)
RNGS = (jax.random.PRNGKey(1), jax.random.PRNGKey(2))


@functools.lru_cache(maxsize=None)
def _run(variant: str, shape, strategy: str):
    """Two sharded steps (AOT-compiled once); keeps the compiled HLO, losses, states and model."""
    pm, mesh, rules = _sharded_model(variant, shape, strategy)
    spec = S.llama_batch_spec(strategy)
    batch = S.shard_batch(_batch(), mesh, spec)
    state = S.create_sharded_train_state(pm, TX, mesh, rules)
    init_trainable = _np(state.trainable)
    step = S.make_sharded_train_step(pm, TX, T.causal_lm_loss, mesh, rules, spec)
    compiled = step.lower(pm.params, state, batch, RNGS[0]).compile()
    losses = []
    for rng in RNGS:
        state, loss = compiled(pm.params, state, batch, rng)
        losses.append(float(loss))
    return types.SimpleNamespace(pm=pm, mesh=mesh, rules=rules, state=state, losses=losses,
                                 init_trainable=init_trainable, hlo=compiled.as_text())


@functools.lru_cache(maxsize=None)
def _reference(variant: str):
    """The same two steps on one device with `miss_jax.train.make_train_step`."""
    pm = get_peft_model(tm.flax_model("llama"), _config(variant))
    state = T.create_train_state(pm, TX)
    step = T.make_train_step(pm, TX, T.causal_lm_loss)
    batch = _batch()
    losses = []
    for rng in RNGS:
        state, loss = step(pm.params, state, batch, rng)
        losses.append(float(loss))
    return losses, _np(state.trainable)


# --------------------------------------------------------------------------- meshes, rules, specs


def test_rules_and_meshes_reject_bad_input():
    mesh = _mesh((2, 4))
    with pytest.raises(ValueError, match="No partition rule matches param 'a/kernel'"):
        S.spec_for([(r"bias$", P())], ("a", "kernel"), (4, 4), mesh)
    with pytest.raises(ValueError, match="dimension 6 does not split over mesh axes 'model'"):
        S.spec_for([(".*", P(None, "model"))], ("a", "kernel"), (4, 6), mesh)
    with pytest.raises(ValueError, match="names mesh axes \\['tensor'\\]"):
        S.spec_for([(".*", P("tensor"))], ("a",), (4,), mesh)
    with pytest.raises(ValueError, match="more entries than"):
        S.spec_for([(".*", P(None, None))], ("a",), (4,), mesh)
    with pytest.raises(ValueError, match="needs 6 devices but 8"):
        S.make_mesh((3, 2))
    with pytest.raises(ValueError, match="Unknown sharding strategy"):
        S.llama_rules("pipeline")
    explicit = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with pytest.raises(ValueError, match="not AxisType.Auto"):
        S.check_mesh(explicit)


def test_rules_first_match_wins_and_cover_every_llama_param():
    params = tm.flax_model("llama").params
    specs = {S.path_str(k): v for k, v in _flat(S.param_specs(params, S.llama_rules(TP), _mesh((4, 2)))).items()}
    assert specs["model/layers/0/self_attn/q_proj/kernel"] == P(None, "model")
    assert specs["model/layers/1/mlp/down_proj/kernel"] == P("model", None)
    assert specs["model/embed_tokens/embedding"] == P("model", None)
    assert specs["model/norm/weight"] == P()
    fsdp = S.param_specs(params, S.llama_rules(FSDP), _mesh((8, 1)))
    assert fsdp["lm_head"]["kernel"] == P(None, ("data", "model"))


@pytest.mark.parametrize(
    "variant, shape, strategy, mini_r, layer, expected",
    [
        ("balance", (2, 4), TP, 8, "self_attn/q_proj", P(None, "model")),
        ("balance", (2, 4), TP, 8, "self_attn/o_proj", P(None, None)),  # o_proj's `in` axis is the sharded one
        ("mini", (2, 4), TP, 8, "self_attn/k_proj", P(None, "model")),
        ("mini", (2, 4), TP, 2, "mlp/up_proj", P(None, None)),  # mini_r=2 does not split 4 ways
        ("bat", (2, 4), TP, 8, "self_attn/k_proj", P("model", None, None)),  # out 16 -> 4 blocks over 4
        ("bat", (8, 1), FSDP, 8, "self_attn/k_proj", P(None, None, None)),  # 4 blocks do not split 8 ways
        ("bat", (8, 1), FSDP, 8, "mlp/down_proj", P(("data", "model"), None, None)),
        ("balance", (8, 1), DP, 8, "mlp/gate_proj", P(None, None)),
    ],
)
def test_block_specs_follow_the_kernel_out_axis(variant, shape, strategy, mini_r, layer, expected):
    mesh = _mesh(shape)
    pm = get_peft_model(tm.flax_model("llama"), _config(variant, mini_r=mini_r), low_cpu_mem_usage=True)
    path = ("model", "layers", "0", *layer.split("/"), "miss_block")
    got = _flat(S.adapter_specs(pm, S.llama_rules(strategy), mesh)["miss"]["default"])[path]
    ndim = _flat(pm.adapter_params["miss"]["default"])[path].ndim
    assert NamedSharding(mesh, got).is_equivalent_to(NamedSharding(mesh, expected), ndim), got


# --------------------------------------------------------------------------- 1. created sharded


@pytest.mark.parametrize("variant", ["balance", "mini", "bat"])
def test_adapters_are_created_sharded_like_their_kernels(variant):
    run = _run(variant, (4, 2), TP)
    pm, mesh = run.pm, run.mesh
    blocks = _flat(pm.adapter_params["miss"]["default"])
    assert len(blocks) == 14
    for path, block in blocks.items():
        layer = pm.layers[".".join(path[:-1])]
        c = pm.peft_config["default"]
        expected = NamedSharding(mesh, S.block_spec(c.variant, layer, c.r, c.mini_r, run.rules, mesh))
        assert _same_sharding(block, expected), path
        kernel_spec = _flat(pm.params)[path[:-1] + ("kernel",)].sharding.spec
        out_sharded = len(kernel_spec) > 1 and kernel_spec[1] == "model"
        assert any(e is not None for e in block.sharding.spec) == out_sharded, path


def test_random_balance_init_is_created_sharded_with_the_eager_values():
    pm, mesh, rules = _sharded_model("balance", (4, 2), TP, init=False)
    key = jax.random.fold_in(jax.random.PRNGKey(0), 0)  # shard_peft_model's key for the first adapter
    eager = adapters.init(pm.plan.spec("default"), tm.flax_model("llama").params, key)
    _assert_close(pm.adapter_params["miss"]["default"], eager["miss"], atol=0)
    q = pm.adapter_params["miss"]["default"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["miss_block"]
    assert _same_sharding(q, NamedSharding(mesh, P(None, "model")))
    assert float(np.abs(np.asarray(q)).max()) > 0


def test_init_sharded_params_equal_the_eager_init():
    from transformers import FlaxLlamaForCausalLM

    mesh, rules = _mesh((4, 2)), S.llama_rules(TP)
    shell = FlaxLlamaForCausalLM(tm.config("llama"), _do_init=False)
    params = S.init_sharded_params(shell, mesh, rules, seed=0)
    expected = S.param_shardings(params, mesh, rules)
    for path, leaf in _flat(params).items():
        assert _same_sharding(leaf, _flat(expected)[path]), path
    _assert_close(params, tm.flax_model("llama").params, atol=1e-7)  # jit vs eager: rounding only


# --------------------------------------------------------------------------- 2. the sharded step

RUNS = [
    ("balance", (4, 2), TP),
    ("mini", (4, 2), TP),
    ("bat", (4, 2), TP),
    ("balance", (2, 4), TP),
    ("mini", (2, 4), TP),
    ("balance", (8, 1), FSDP),
    ("balance", (4, 2), DP),
]


@pytest.mark.parametrize("variant, shape, strategy", RUNS)
def test_sharded_step_equals_single_device_step(variant, shape, strategy):
    run = _run(variant, shape, strategy)
    losses, trainable = _reference(variant)
    np.testing.assert_allclose(run.losses, losses, atol=ATOL, rtol=0)
    assert run.losses[1] < run.losses[0]
    _assert_close(run.state.trainable, trainable)
    assert not np.allclose(np.asarray(jax.tree_util.tree_leaves(run.init_trainable)[0]),
                           np.asarray(jax.tree_util.tree_leaves(run.state.trainable)[0]))
    # trainables stay sharded like their kernels; adam's moments like the params they track
    expected = S.adapter_shardings(run.pm, run.mesh, run.rules, run.pm.trainable_params())
    jax.tree_util.tree_map(lambda a, s: _assert(_same_sharding(a, s)), run.state.trainable, expected)
    adam = run.state.opt_state[0]
    for moments in (adam.mu, adam.nu):
        jax.tree_util.tree_map(lambda m, t: _assert(_same_sharding(m, t.sharding)), moments, run.state.trainable)
    assert _same_sharding(adam.count, NamedSharding(run.mesh, P()))


# --------------------------------------------------------------------------- no kernel gather (TP)


def kernel_gathers(hlo: str, kernel_shapes: set[tuple[int, ...]]) -> int:
    """All-gather ops (sync or async) whose result has a kernel's shape (any orientation, unit dims ignored)."""
    wanted = {tuple(sorted(d for d in s if d != 1)) for s in kernel_shapes}
    count = 0
    for match in re.finditer(r"= (.*?) all-gather(?:-start)?\(", hlo):
        shapes = re.findall(r"\[([0-9,]*)\]", match.group(1))
        dims = [tuple(sorted(int(d) for d in s.split(",") if d and int(d) != 1)) for s in shapes]
        count += any(d in wanted for d in dims)
    return count


def _kernel_shapes() -> set[tuple[int, ...]]:
    return {v.shape for k, v in _flat(tm.flax_model("llama").params).items() if k[-1] in ("kernel", "embedding")}


@functools.lru_cache(maxsize=None)
def _base_hlo(shape) -> str:
    """The same sharded step with the adapter disabled (nothing trained: forward + loss only)."""
    pm, mesh, rules = _sharded_model("balance", shape, TP)
    with pm.disable_adapter():
        state = S.create_sharded_train_state(pm, TX, mesh, rules)
        step = S.make_sharded_train_step(pm, TX, T.causal_lm_loss, mesh, rules, S.llama_batch_spec(TP))
        batch = S.shard_batch(_batch(), mesh, S.llama_batch_spec(TP))
        return step.lower(pm.params, state, batch, RNGS[0]).compile().as_text()


def test_kernel_gather_counter_sees_a_gathered_kernel():
    mesh = _mesh((2, 4))
    params = tm.flax_model("llama").params
    q = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    q = jax.device_put(q, NamedSharding(mesh, P(None, "model")))
    hlo = jax.jit(lambda k: k * 2, out_shardings=NamedSharding(mesh, P())).lower(q).compile().as_text()
    assert kernel_gathers(hlo, _kernel_shapes()) >= 1


@pytest.mark.parametrize("variant, shape", [("balance", (2, 4)), ("mini", (2, 4)), ("bat", (4, 2))])
def test_tensor_parallel_adapter_step_adds_no_kernel_gather(variant, shape):
    shapes = _kernel_shapes()
    with_adapter = kernel_gathers(_run(variant, shape, TP).hlo, shapes)
    without = kernel_gathers(_base_hlo(shape), shapes)
    assert with_adapter <= without, f"{variant} adds {with_adapter - without} kernel all-gathers"
    assert "all-reduce" in _run(variant, shape, TP).hlo  # the step really is partitioned


# --------------------------------------------------------------------------- 3. merging keeps shardings


def _random_blocks(pm, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    blocks = pm.adapter_params["miss"]["default"]
    return jax.tree_util.tree_map(lambda b: (0.05 * rng.standard_normal(b.shape)).astype(np.float32), blocks)


@pytest.mark.parametrize(
    "variant, shape, strategy",
    [("balance", (4, 2), TP), ("mini", (4, 2), TP), ("bat", (4, 2), TP),
     ("balance", (2, 4), TP), ("balance", (8, 1), FSDP), ("bat", (8, 1), FSDP)],
)
def test_merge_and_unmerge_keep_every_kernel_sharding(variant, shape, strategy):
    mesh, rules = _mesh(shape), S.llama_rules(strategy)
    base = _base()
    pm = get_peft_model(base, _config(variant))
    pm.update_params({"miss": {"default": _random_blocks(pm)}})
    expected = linen.merge(pm.plan, _np(pm.params), _np(pm.adapter_params), ("default",))
    S.shard_peft_model(pm, mesh, rules)  # concrete adapters and base params moved onto the mesh
    before = _flat(pm.params)
    assert any(len(v.sharding.device_set) == 8 for v in before.values())
    merged_model = pm.merge_and_unload()
    merged = _flat(merged_model.params)
    for path, leaf in before.items():
        assert _same_sharding(merged[path], leaf.sharding), path
    _assert_close(merged_model.params, expected)
    pm.unmerge_adapter()
    for path, leaf in _flat(pm.params).items():
        assert _same_sharding(leaf, before[path].sharding), path
    _assert_close(pm.params, traverse_util.unflatten_dict(before))


# --------------------------------------------------------------------------- 4. checkpoints


@pytest.mark.parametrize("variant", ["balance", "mini", "bat"])
def test_checkpoint_restores_onto_the_same_and_another_mesh(variant, tmp_path):
    run = _run(variant, (4, 2), TP)
    T.save_checkpoint(str(tmp_path / "ckpt"), run.state, run.pm)
    for shape, strategy in [((4, 2), TP), ((2, 4), TP)] + ([((8, 1), FSDP)] if variant == "balance" else []):
        template = S.abstract_train_state(run.pm, TX, _mesh(shape), S.llama_rules(strategy))
        restored = T.restore_checkpoint(str(tmp_path / "ckpt"), template)
        _assert_close(restored, run.state, atol=0)
        jax.tree_util.tree_map(lambda a, t: _assert(_same_sharding(a, t.sharding)), restored, template)
        assert int(restored.step) == 2


def test_peft_folder_export_from_sharded_params(tmp_path):
    from miss_jax import MissModel

    run = _run("balance", (4, 2), TP)
    pm, _, _ = _sharded_model("balance", (4, 2), TP)
    pm.update_params(run.state.trainable)  # trained blocks, still sharded
    pm.save_pretrained(str(tmp_path / "adapter"))
    loaded = MissModel.from_pretrained(_base(), str(tmp_path / "adapter"))
    _assert_close(loaded.adapter_params["miss"]["default"], run.state.trainable["miss"]["default"], atol=0)


# --------------------------------------------------------------------------- 5. the example


@pytest.mark.slow
def test_example_trains_merges_and_exports_on_a_4x2_mesh(tmp_path):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "train_sharded.py")
    spec = importlib.util.spec_from_file_location("train_sharded", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--mesh", "4,2", "--steps", "4", "--hidden", "32", "--seq", "16", "--batch", "8",
                        "--r", "4", "--lr", "2e-2", "--out", str(tmp_path)])
    assert out["shardings_kept"] and out["merge_diff"] < 1e-4
    assert out["losses"][-1] < out["losses"][0]
    assert T.latest_step(str(tmp_path / "checkpoint")) == 4
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")


# --------------------------------------------------------------------------- 6. Linen nn.DenseGeneral layers

# q/v kernels (D, H, HD) = (16, 2, 4): q sharded along its first `out` axis (heads), v along its second (head_dim),
# whose flattened `out` is then no contiguous split; o kernel (H, HD, D): its one `out` axis sharded.
GENERAL_RULES = (
    (r"q_proj/kernel$", P(None, "model")),
    (r"q_proj/bias$", P("model")),
    (r"v_proj/kernel$", P(None, None, "model")),
    (r"o_proj/kernel$", P(None, None, "model")),
    (".*", P()),
)
GENERAL_CONFIGS = {
    "balance": dict(r=4, init_weights=False, bias="MiSS_only"),
    "mini": dict(r=4, mini_r=4, init_weights="mini"),
    "bat": dict(r=4, init_weights="bat"),
}
GENERAL_SPECS = {  # variant -> layer -> block spec on a (4, 2) mesh
    "balance": {"q_proj": P(None, "model"), "v_proj": P(), "o_proj": P(None, "model")},
    "mini": {"q_proj": P(None, "model"), "v_proj": P(), "o_proj": P(None, "model")},
    "bat": {"q_proj": P("model"), "v_proj": P(), "o_proj": P("model")},  # out // r = 2 and 4 blocks over 2
}


@pytest.mark.parametrize("variant", sorted(GENERAL_CONFIGS))
def test_dense_general_blocks_follow_the_first_out_axis_and_the_sharded_step_equals_one_device(variant):
    from test_dense_general import D, GENERAL_PARAMS, GeneralAttention, LinenModel, Net, mse, random_like

    mesh = _mesh((4, 2))
    config = MissConfig(target_modules=["q_proj", "v_proj", "o_proj"], **GENERAL_CONFIGS[variant])
    models = [get_peft_model(LinenModel(Net(GeneralAttention), GENERAL_PARAMS), config) for _ in range(2)]
    values = random_like(models[0].trainable_params(), seed=5)
    for pm in models:
        pm.update_params(values)
    sharded, single = models
    S.shard_peft_model(sharded, mesh, GENERAL_RULES)
    for layer, spec in GENERAL_SPECS[variant].items():
        block = sharded.adapter_params["miss"]["default"]["attn"][layer]["miss_block"]
        assert _same_sharding(block, NamedSharding(mesh, spec)), (layer, block.sharding.spec)
    if variant == "balance":
        bias = sharded.adapter_params["bias"]["attn"]["q_proj"]["bias"]
        assert bias.shape == (2, 4) and _same_sharding(bias, NamedSharding(mesh, P("model")))

    keys = jax.random.split(jax.random.key(6), 2)
    batch = {"x": jax.random.normal(keys[0], (8, 3, D)), "y": jax.random.normal(keys[1], (8, 3, D))}
    step = S.make_sharded_train_step(sharded, TX, mse, mesh, GENERAL_RULES)
    state = S.create_sharded_train_state(sharded, TX, mesh, GENERAL_RULES)
    ref_step, ref_state = T.make_train_step(single, TX, mse), T.create_train_state(single, TX)
    for rng in RNGS:
        state, loss = step(sharded.params, state, S.shard_batch(batch, mesh), rng)
        ref_state, ref_loss = ref_step(single.params, ref_state, batch, rng)
        np.testing.assert_allclose(float(loss), float(ref_loss), atol=ATOL, rtol=0)
    _assert_close(state.trainable, ref_state.trainable)
    assert not np.allclose(np.asarray(state.trainable["miss"]["default"]["attn"]["q_proj"]["miss_block"]),
                           np.asarray(values["miss"]["default"]["attn"]["q_proj"]["miss_block"]))
    expected = S.adapter_shardings(sharded, mesh, GENERAL_RULES, sharded.trainable_params())
    jax.tree_util.tree_map(lambda a, s: _assert(_same_sharding(a, s)), state.trainable, expected)
    np.testing.assert_allclose(np.asarray(sharded(batch["x"])), np.asarray(single(batch["x"])), atol=ATOL, rtol=0)
