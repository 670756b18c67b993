"""`MissModel`'s adapter lifecycle (PEFT's API): add / set / disable / delete / merge / unload, counts against
PEFT on the same torch architecture, modules_to_save, bias modes, low_cpu_mem_usage, and bad input."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from flax import traverse_util

import tiny_models as tm
from helpers import assert_trees_close, fill_blocks, logits, snapshot
from miss_jax import MissConfig, MissModel, get_peft_model, linen
from reference import ref_merge, to_layout

QV = ["q_proj", "v_proj"]


# ----------------------------------------------------------------------------- helpers


def with_kernels(model: MissModel, name: str, fn: Callable[[jax.Array, Any, jax.Array], jax.Array],
                 params: Any = None) -> dict:
    """`params` (default: the model's) with `fn(kernel, layer, block)` applied on every layer of adapter `name`."""
    flat = traverse_util.flatten_dict(params if params is not None else model.params)
    blocks = traverse_util.flatten_dict(model.adapter_params["miss"][name])
    for layer in model.plan.spec(name).layers:
        k = layer.path + ("kernel",)
        flat[k] = fn(flat[k], layer, blocks[layer.path + ("miss_block",)])
    return traverse_util.unflatten_dict(flat)


def plain_forward(model: MissModel, params: Any, x: dict) -> np.ndarray:
    """The wrapped model run on `params` with every adapter off."""
    with model.disable_adapter():
        return logits(model(**x, params=params))


def reference_update(variant: str) -> Callable[[jax.Array, Any, jax.Array], np.ndarray]:
    """The kernel with a `variant` block merged in, by the NumPy reference maths (in the layer's layout)."""
    def fn(kernel: jax.Array, layer: Any, block: jax.Array) -> np.ndarray:
        weight = to_layout(np.asarray(kernel, np.float64), layer.layout)  # the transpose is its own inverse
        merged = ref_merge(weight, np.asarray(block, np.float64), variant)
        return to_layout(merged, layer.layout).astype(np.asarray(kernel).dtype)
    return fn


# ----------------------------------------------------------------------------- fixtures


X = tm.inputs("llama")


def llama_model(fresh: bool = False) -> MissModel:
    """Llama with adapters a (balance, random), b (mini), c and d (bat); b, c, d filled by hand. a is active.

    `fresh` builds a new base model (for merge_and_unload / unload, which hand back the base model itself).
    """
    base = tm.flax_model.__wrapped__("llama") if fresh else tm.flax_model("llama")
    model = get_peft_model(base, MissConfig(r=4, init_weights=False, target_modules=QV), "a")
    model.add_adapter("b", MissConfig(r=4, init_weights="mini", mini_r=4, target_modules=QV))
    model.add_adapter("c", MissConfig(r=4, init_weights="bat", target_modules=QV))
    model.add_adapter("d", MissConfig(r=8, init_weights="bat", target_modules=["q_proj"]))
    for seed, name in enumerate("bcd"):
        fill_blocks(model, name, 0.1, seed)
    return model


@pytest.fixture(scope="module")
def llama() -> MissModel:
    return llama_model()


@pytest.fixture()
def model(llama: MissModel) -> Iterator[MissModel]:
    """The shared llama model, handed back as it was made (adapter a active, nothing merged)."""
    yield llama
    if llama.merged_adapters:
        llama.unmerge_adapter()
    llama.set_adapter("a")


@pytest.fixture(scope="module")
def base_logits() -> np.ndarray:
    return logits(tm.flax_model("llama")(**X))


# ----------------------------------------------------------------------------- adding and activating


def test_add_adapter_is_inactive_until_set(model: MissModel) -> None:
    assert model.active_adapters == ["a"] and model.active_adapter == "a"
    assert list(model.peft_config) == ["a", "b", "c", "d"]
    assert model.peft_config["d"].target_modules == ("q_proj",)
    shapes = {n: jax.tree_util.tree_leaves(model.adapter_params["miss"][n])[0].shape for n in "abcd"}
    assert shapes == {"a": (4, 32), "b": (4, 4), "c": (8, 4, 4), "d": (4, 8, 8)}
    assert len(model.plan.spec("d").layers) == 2 and len(model.plan.spec("a").layers) == 4
    model.set_adapter(["b", "a"])
    assert model.active_adapters == ["b", "a"] and model.active_adapter == "b"


def test_balance_and_mini_terms_add_up(model: MissModel) -> None:
    model.set_adapter(["a", "b"])
    want = with_kernels(model, "b", reference_update("mini"), with_kernels(model, "a", reference_update("balance")))
    np.testing.assert_allclose(logits(model(**X)), plain_forward(model, want, X), atol=1e-5)


@pytest.mark.parametrize("order", [["c", "d"], ["d", "c"], ["a", "c"]])
def test_bat_transforms_weights_in_activation_order(model: MissModel, order: list[str]) -> None:
    model.set_adapter(order)
    params = model.params
    bat_first = sorted(order, key=lambda n: model.peft_config[n].variant != "bat")  # stable: activation order
    for name in bat_first:  # bat adapters transform the weight in turn; balance terms add on the result
        update = reference_update("bat") if model.peft_config[name].variant == "bat" else reference_update("balance")
        params = with_kernels(model, name, update, params)
    np.testing.assert_allclose(logits(model(**X)), plain_forward(model, params, X), atol=1e-5)
    model.merge_adapter()
    np.testing.assert_allclose(logits(model(**X)), plain_forward(model, params, X), atol=1e-5)


def test_bat_order_matters(model: MissModel) -> None:
    model.set_adapter(["c", "d"])
    cd = logits(model(**X))
    model.set_adapter(["d", "c"])
    assert np.abs(logits(model(**X)) - cd).max() > 1e-5


# ----------------------------------------------------------------------------- disable, merge, delete


def test_disable_adapter_runs_base_and_restores_state(model: MissModel, base_logits: np.ndarray) -> None:
    model.set_adapter(["a", "c"])
    adapted = logits(model(**X))
    assert np.abs(adapted - base_logits).max() > 1e-3
    with model.disable_adapter():
        np.testing.assert_allclose(logits(model(**X)), base_logits, atol=1e-5)
    assert model.active_adapters == ["a", "c"]
    np.testing.assert_allclose(logits(model(**X)), adapted, atol=1e-6)
    model.merge_adapter()
    merged_params = model.params
    with model.disable_adapter():
        assert model.merged_adapters == []
        np.testing.assert_allclose(logits(model(**X)), base_logits, atol=1e-5)
    assert model.merged_adapters == ["c", "a"]  # bat first: the order the forward composes them in
    assert_trees_close(model.params, merged_params, atol=1e-5)
    np.testing.assert_allclose(logits(model(**X)), adapted, atol=1e-5)


def test_merge_unmerge_round_trip(model: MissModel, base_logits: np.ndarray) -> None:
    base = model.params
    model.set_adapter(["a", "b", "c"])
    adapted = logits(model(**X))
    model.merge_adapter(safe_merge=True)
    assert model.merged_adapters == ["c", "a", "b"]
    np.testing.assert_allclose(logits(model(**X)), adapted, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.trainable_params()
    with pytest.warns(UserWarning, match="^All adapters are already merged, nothing to do.$"):
        model.merge_adapter(["a"])
    model.unmerge_adapter()
    assert model.merged_adapters == []
    assert_trees_close(model.params, base, atol=1e-5)
    with pytest.warns(UserWarning, match="Already unmerged"):
        model.unmerge_adapter()


def test_delete_adapter() -> None:
    model = llama_model()
    model.set_adapter(["b", "c"])
    model.merge_adapter(["c"])
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape("Cannot delete adapter(s) ['c'] while they are merged. Please unmerge them first.")):
        model.delete_adapter("c")
    assert snapshot(model) == before
    model.unmerge_adapter()
    model.delete_adapter("c")
    assert "c" not in model.peft_config and "c" not in model.adapter_params["miss"] and "c" not in model.plan.names
    assert model.active_adapters == ["b"]
    with pytest.warns(UserWarning, match="Setting active adapter to a"):
        model.delete_adapter("b")
    assert model.active_adapters == ["a"]  # the first remaining adapter by name, as in PEFT
    with pytest.warns(UserWarning, match="Setting active adapter to d"):
        model.delete_adapter("a")
    model.delete_adapter("d")
    assert model.active_adapters == [] and model.plan.adapters == ()
    with pytest.raises(ValueError, match="add_adapter"):
        model.active_adapter
    model.add_adapter("e", MissConfig(r=4, target_modules=QV))
    model.set_adapter("e")
    assert model.active_adapter == "e"


def test_deleting_the_active_adapter_picks_and_unfreezes_the_next_as_peft() -> None:
    """Against real PEFT: the next active adapter (first by name) and the trainable counts after deletions."""
    from interop_helpers import torch_twin

    kwargs = dict(r=4, target_modules=QV)
    torch_model = peft.get_peft_model(torch_twin("llama"), peft.MissConfig(**kwargs), adapter_name="z")
    model = get_peft_model(tm.flax_model("llama"), MissConfig(**kwargs), "z")
    seen: list[tuple] = []
    for m, config in ((torch_model, peft.MissConfig), (model, MissConfig)):
        for name in ("b", "k"):
            m.add_adapter(name, config(**kwargs))
        m.set_adapter("k", inference_mode=True)
        with pytest.warns(UserWarning, match="Setting active adapter to b"):
            m.delete_adapter("k")
        after_delete = (list(m.active_adapters), m.get_nb_trainable_parameters()[0])
        m.set_adapter("z", inference_mode=True)
        m.delete_adapter("b")  # not active: nothing changes
        seen.append((after_delete, list(m.active_adapters), m.get_nb_trainable_parameters()[0]))
    assert seen[0] == seen[1]
    assert seen[0][0][0] == ["b"] and seen[0][0][1] > 0 and seen[0][1:] == (["z"], 0)


def test_merge_and_unload_returns_plain_flax_model() -> None:
    model = llama_model(fresh=True)
    model.set_adapter(["a", "c"])
    adapted = logits(model(**X))
    model.set_adapter(["a"])
    only_a = logits(model(**X))
    model.set_adapter(["a", "c"])
    merged = model.merge_and_unload(safe_merge=True, adapter_names=["a"])
    assert type(merged) is type(tm.flax_model("llama")) and not isinstance(merged, MissModel)
    np.testing.assert_allclose(logits(merged(**X)), only_a, atol=1e-5)
    assert model.merged_adapters == []  # "a" alone cannot stay merged under the active bat adapter "c"
    merged = model.merge_and_unload()
    np.testing.assert_allclose(logits(merged(**X)), adapted, atol=1e-5)


def test_unload_gives_back_the_base_model(base_logits: np.ndarray) -> None:
    model = llama_model(fresh=True)
    base = model.unload()
    assert type(base) is type(tm.flax_model("llama"))
    np.testing.assert_allclose(logits(base(**X)), base_logits, atol=1e-6)


# ----------------------------------------------------------------------------- counts against PEFT


COUNT_CASES = [
    ("llama", dict(r=4, target_modules=QV)),
    ("llama", dict(r=4, init_weights="mini", mini_r=8, target_modules="all-linear")),
    ("llama", dict(r=8, init_weights="bat", target_modules=["q_proj", "o_proj"], layers_to_transform=[1])),
    ("bert", dict(r=4, target_modules=["query"], bias="all", modules_to_save=["classifier"])),
    ("bert", dict(r=4, target_modules=["query", "value"], bias="MiSS_only", task_type="SEQ_CLS")),
    ("bert", dict(r=4, init_weights=False, task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("arch,kwargs", COUNT_CASES, ids=range(len(COUNT_CASES)))
def test_parameter_counts_equal_peft(arch: str, kwargs: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    ours = get_peft_model(tm.flax_model(arch), MissConfig(**kwargs))
    theirs = peft.get_peft_model(tm.torch_class(arch)(tm.config(arch)), peft.MissConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert set(ours.peft_config["default"].modules_to_save or ()) == set(
        theirs.peft_config["default"].modules_to_save or ())
    ours.print_trainable_parameters()
    mine = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert mine == capsys.readouterr().out and mine.startswith("trainable params: ")


# ----------------------------------------------------------------------------- modules_to_save, bias


def test_modules_to_save_keeps_a_trainable_copy_per_adapter() -> None:
    x = tm.inputs("bert")
    bert = tm.flax_model("bert")
    model = get_peft_model(bert, MissConfig(r=4, modules_to_save=["classifier"]), "one")
    model.add_adapter("two", MissConfig(r=4, target_modules=["value"], modules_to_save=["classifier"]))
    copies = model.adapter_params["modules_to_save"]
    assert set(copies) == {"one", "two"}
    assert_trees_close(copies["one"]["classifier"], bert.params["classifier"], atol=0)
    assert set(model.trainable_params()["modules_to_save"]) == {"one"}
    base = logits(model(**x))
    np.testing.assert_allclose(base, logits(bert(**x)), atol=1e-5)

    trained = model.trainable_params()
    trained["modules_to_save"]["one"]["classifier"]["bias"] = jnp.array([1.0, -1.0, 0.5])
    model.update_params(trained)
    np.testing.assert_allclose(logits(model(**x)), base + np.array([1.0, -1.0, 0.5]), atol=1e-5)
    np.testing.assert_array_equal(model.params["classifier"]["bias"], bert.params["classifier"]["bias"])
    model.set_adapter("two")  # its own, untouched copy
    np.testing.assert_allclose(logits(model(**x)), base, atol=1e-5)
    with pytest.raises(ValueError, match=r"one adapter .* modules_to_save module classifier: adapters 'one' and 'two'"):
        model.set_adapter(["one", "two"])  # both save the classifier: as PEFT, one copy per module


@pytest.mark.parametrize("bias,expected", [("none", 0), ("MiSS_only", 4), ("all", None)])
def test_bias_modes_pick_trained_biases(bias: str, expected: int | None) -> None:
    bert = tm.flax_model("bert")
    model = get_peft_model(bert, MissConfig(r=4, bias=bias))
    paths = set(traverse_util.flatten_dict(model.adapter_params["bias"]))
    every = {p for p in traverse_util.flatten_dict(bert.params) if p[-1] == "bias"}
    assert paths <= every
    assert len(paths) == (len(every) if expected is None else expected)
    if bias == "MiSS_only":
        assert {p[-2] for p in paths} == {"query", "value"}
    if paths:  # a trained bias reaches the forward's params
        path = sorted(paths)[0]
        flat = traverse_util.flatten_dict(model.adapter_params["bias"])
        flat[path] = flat[path] + 1.0
        model.adapter_params["bias"] = traverse_util.unflatten_dict(flat)
        used = traverse_util.flatten_dict(linen.overlay(model.plan, model.params, model.adapter_params))
        np.testing.assert_allclose(used[path], traverse_util.flatten_dict(bert.params)[path] + 1.0)


# ----------------------------------------------------------------------------- low_cpu_mem_usage


def test_low_cpu_mem_usage_creates_abstract_adapters(base_logits: np.ndarray) -> None:
    model = get_peft_model(tm.flax_model("llama"), MissConfig(r=4, target_modules=QV), low_cpu_mem_usage=True)
    leaves = jax.tree_util.tree_leaves(model.adapter_params["miss"]["default"])
    assert len(leaves) == 4 and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert {leaf.shape for leaf in leaves} == {(4, 32), (4, 16)}
    for call in (lambda: model(**X), model.merge_adapter):
        with pytest.raises(ValueError, match=r"'default'.*low_cpu_mem_usage.*load_adapter"):
            call()
    filled = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), model.adapter_params["miss"]["default"])
    model.update_params({"miss": {"default": filled}})
    np.testing.assert_allclose(logits(model(**X)), base_logits, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


BAD_CALLS: list[tuple[str, Callable[[MissModel], Any], str]] = [
    ("r>in", lambda m: m.add_adapter("x", MissConfig(r=64, target_modules=QV)), r"\(64\).*in_features \(32\)"),
    ("r<=0", lambda m: m.add_adapter("x", MissConfig(r=0, target_modules=QV)), r"`r`.*\b0\b"),
    ("bat", lambda m: m.add_adapter("x", MissConfig(r=5, init_weights="bat", target_modules=QV)),
     r"divisible by r \(5\)"),
    ("mini_r", lambda m: m.add_adapter("x", MissConfig(r=4, init_weights="mini", mini_r=3, target_modules=QV)),
     r"mini_r \(3\)"),
    ("regex+layers", lambda m: m.add_adapter("x", MissConfig(target_modules=".*q_proj", layers_to_transform=0)),
     "layers_to_transform"),
    ("init", lambda m: m.add_adapter("x", MissConfig(init_weights="olora")), "'olora'"),
    ("bias", lambda m: m.add_adapter("x", MissConfig(bias="lora_only")), "'lora_only'"),
    ("target", lambda m: m.add_adapter("x", MissConfig(target_modules=["qq_proj"])), "'qq_proj'"),
    ("used", lambda m: m.add_adapter("b", MissConfig(r=4, target_modules=QV)), "'b' already exists"),
    ("set", lambda m: m.set_adapter("zzz"), "'zzz'"),
    ("set-list", lambda m: m.set_adapter(["a", "zzz"]), "'zzz'"),
    ("delete", lambda m: m.delete_adapter("zzz"), "'zzz'"),
    ("merge", lambda m: m.merge_adapter(["a", "zzz"]), "'zzz'"),
]


@pytest.mark.parametrize("call,message", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_and_leaves_model_as_it_was(model: MissModel, call: Callable, message: str) -> None:
    model.set_adapter(["a", "c"])
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing half-done either
        with pytest.raises(ValueError, match=message):
            call(model)
    assert snapshot(model) == before


def test_merge_and_unload_of_a_do_init_false_model_returns_params():
    """A `_do_init=False` model keeps its params outside: `return_params=True` gives (model, params); the
    plain form raises a clear error before merging anything."""
    import transformers

    model = transformers.FlaxLlamaForCausalLM(tm.config("llama"), _do_init=False)
    params = model.init_weights(jax.random.PRNGKey(0), (1, 8))
    pm = get_peft_model(model, MissConfig(r=4, init_weights=False, target_modules=["q_proj"]), params=params)
    adapted = np.asarray(pm(**tm.inputs("llama")).logits)
    with pytest.raises(ValueError, match="return_params=True"):
        pm.merge_and_unload()
    assert pm.merged_adapters == []
    plain, merged = pm.merge_and_unload(return_params=True)
    assert plain is model
    np.testing.assert_allclose(np.asarray(plain(**tm.inputs("llama"), params=merged).logits), adapted, atol=1e-5)


def test_bat_merged_after_balance_on_the_same_layer_still_equals_the_unmerged_forward():
    """Merging balance, then (in a later call) bat on the same layers redoes the merge in merge order,
    so merged == unmerged; disable_adapter restores exactly that state. (Balance alone cannot be merged while
    bat is active and unmerged on its layers: see tests/test_hostile_review.py.)"""
    pm = get_peft_model(tm.flax_model("llama"), MissConfig(r=4, init_weights=False, target_modules=["q_proj"]), "bal")
    pm.add_adapter("bat", MissConfig(r=4, init_weights="bat", target_modules=["q_proj"]))
    pm.adapter_params["miss"]["bat"] = jax.tree_util.tree_map(lambda b: b + 0.05, pm.adapter_params["miss"]["bat"])
    pm.set_adapter(["bal", "bat"])
    unmerged = np.asarray(pm(**tm.inputs("llama")).logits)
    pm.set_adapter(["bal"])
    pm.merge_adapter(["bal"])
    pm.merge_adapter(["bat"])
    pm.set_adapter(["bal", "bat"])
    assert pm.merged_adapters == ["bat", "bal"]
    np.testing.assert_allclose(np.asarray(pm(**tm.inputs("llama")).logits), unmerged, atol=1e-5)
    before = jax.tree_util.tree_map(np.asarray, pm.params)
    with pm.disable_adapter():
        pass
    assert pm.merged_adapters == ["bat", "bal"]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), before, pm.params)


@pytest.mark.parametrize("name", ["a/b", "../up", ".hidden"])
def test_adapter_names_that_would_escape_the_save_folder_are_refused(name):
    pm = get_peft_model(tm.flax_model("llama"), MissConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="path separator"):
        pm.add_adapter(name, MissConfig(r=4, target_modules=["q_proj"]))
    assert list(pm.peft_config) == ["default"]


def test_merge_passes_only_adapted_kernels_and_shares_the_rest() -> None:
    model = llama_model()
    before = model.params
    model.merge_adapter(["a"])
    after = model.params
    flat_before, flat_after = traverse_util.flatten_dict(before), traverse_util.flatten_dict(after)
    adapted = {layer.path + ("kernel",) for layer in model.plan.spec("a").layers}
    assert set(flat_after) == set(flat_before)
    for path, leaf in flat_after.items():
        if path in adapted:
            assert leaf is not flat_before[path] and not np.allclose(leaf, flat_before[path])
        else:
            assert leaf is flat_before[path], path  # shared, not copied
    model.unmerge_adapter()
    assert_trees_close(model.params, before, atol=1e-6)


def test_layers_are_traced_once_per_model_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    from miss_jax import programs as programs_module

    traced: list[int] = []
    real = programs_module.discover

    def counting(init_fn: Callable[[], Any]) -> Any:
        traced.append(1)
        return real(init_fn)

    monkeypatch.setattr(programs_module, "discover", counting)
    config = MissConfig(r=4, target_modules=QV)
    fresh = tm.config("llama")
    fresh.vocab_size += 7  # a configuration no other test built: nothing cached for it yet
    cls = type(tm.flax_model("llama"))
    first = get_peft_model(cls(fresh, seed=0), config)
    second = get_peft_model(cls(fresh, seed=1), config)
    assert len(traced) == 1 and first.layers == second.layers
    deeper_config = tm.config("llama")
    deeper_config.vocab_size += 7
    deeper_config.num_hidden_layers += 1
    deeper = get_peft_model(cls(deeper_config, seed=0), config)
    assert len(traced) == 2
    assert len(deeper.plan.spec("default").layers) == len(first.plan.spec("default").layers) + 2
    odd_config = tm.config("llama")
    odd_config.note = np.float32(1.0)  # not JSON: the snapshot keys it by its repr, still shared
    odd = get_peft_model(cls(odd_config, seed=0), config)
    odd_again = get_peft_model(cls(odd_config, seed=1), config)
    assert len(traced) == 3 and odd.layers == odd_again.layers


def test_identical_models_share_the_compiled_forward_and_merge() -> None:
    """Two models of one configuration (different weights) trace the forward once; others trace their own."""
    from miss_jax.programs import trace_count

    config = MissConfig(r=4, target_modules=QV)
    fresh = tm.config("llama")
    fresh.vocab_size += 11
    cls = type(tm.flax_model("llama"))
    first, second = (get_peft_model(cls(fresh, seed=s), config) for s in (0, 1))
    ids = tm.inputs("llama")["input_ids"]
    before = trace_count(first.plan)  # other tests may have run a model with this plan (another configuration)
    out = [logits(m(input_ids=ids)) for m in (first, second)]
    assert first.plan == second.plan and trace_count(first.plan) == before + 1
    assert np.abs(out[0] - out[1]).max() > 1e-3  # the shared program ran each model's own weights
    np.testing.assert_allclose(out[1], logits(cls(fresh, seed=1)(input_ids=ids)), atol=1e-5)
    wider = tm.config("llama")
    wider.vocab_size += 13
    other = get_peft_model(cls(wider, seed=0), config)
    assert other.plan == first.plan  # same layers: only the model configuration differs
    other(input_ids=ids)
    assert trace_count(first.plan) == before + 2  # a program of its own
