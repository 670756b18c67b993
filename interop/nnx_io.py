"""PEFT folders for NNX models (`miss_jax.nnx.MissNnxModel`, whose `save_pretrained` / `from_pretrained` /
`load_adapter` call these), through a name map.

An NNX model's layer keys (graph paths, `layers.0.attn.q_proj`) are not its PyTorch twin's module paths
(`model.layers.0.self_attn.q_proj`). A `NameMap` says how one becomes the other: `(pattern, replacement)`
pairs, the first whose pattern full-matches a key wins (`re.fullmatch(...).expand(replacement)`).
Tensors are the same as the Linen path's (docs/DESIGN.md §5): a layer's kernel, viewed through its layer
rule as `(in, out)`, is the transpose of the torch weight, so blocks are stored as they are and biases
flattened over the rule's `out` axes.

`modules_to_save` copies are stored as PEFT stores them, whole, under their torch parameter names
(`base_model.model.lm_head.weight`): a module's torch path comes from the map, a variable's torch name from
its layer rule (kernel -> `weight`, in torch's `(out, in)` layout; bias -> `bias`, flattened) or else from
the map's `leaves` (`scale` -> `weight`, `embedding` -> `weight`, ...), in `interop.names`' layouts as
the Linen path stores them (another `kernel` `(..., in, out)`, a Conv's, as torch's `(out, in, ...)`;
the rest as they are). The folder's `modules_to_save` names torch modules; in the NNX model's config
they are the NNX keys.

Ready maps for tunix's LLMs: `TUNIX_QWEN3`, `TUNIX_LLAMA3` (`tunix_rules()` registers the layer rule of
their `Einsum` attention projections); they map the projections, `lm_head`, the embedding and the norms.
`name_map_for(model)` picks the map of a model's class (identity, `IDENTITY`, for models that are not
tunix's: their NNX keys are their torch twin's module paths).

This module sits below the model classes: it reads and writes an NNX model's layers (`miss_jax.nnx_layers`)
and takes the `MissNnxModel` it fills as an argument, never importing it.

>>> TUNIX_QWEN3.torch_name("layers.3.attn.q_proj")
'model.layers.3.self_attn.q_proj'
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from miss_jax import ops
from miss_jax.adapters import match_modules_to_save
from miss_jax.config import MissConfig
from miss_jax.layer_rules import KernelRule, einsum_rule, has_rule, register, rule_for
from miss_jax.nnx_layers import GraphPath, ModulesToSave, bias_leaf, discover, miss_layers, saved_modules
from miss_jax.targeting import Layer, select

from . import folder_write, peft_io
from . import names as peft_names
from . import safetensors_io as files
from .names import BLOCK, PREFIX

MissNnxModel = Any  # a `miss_jax.nnx.MissNnxModel`, duck-typed: this module sits below the model classes


LEAVES = (("kernel", "weight"), ("w", "weight"), ("scale", "weight"), ("embedding", "weight"),
          ("input_embedding", "weight"), ("bias", "bias"))


@dataclasses.dataclass(frozen=True)
class NameMap:
    """NNX module key <-> torch module path: `(pattern, replacement)` regex pairs, the first full match wins.

    `leaves` names the torch parameter of an NNX variable (`(nnx name, torch name)` pairs) in saved module
    copies, for variables that are not a layer rule's kernel or bias.
    """

    rules: tuple[tuple[str, str], ...]
    leaves: tuple[tuple[str, str], ...] = LEAVES

    def torch_name(self, key: str) -> Optional[str]:
        """The torch module path of NNX key `key`, or None if no rule matches."""
        for pattern, replacement in self.rules:
            m = re.fullmatch(pattern, key)
            if m:
                return m.expand(replacement)
        return None


_TUNIX_LLM = (
    (r"layers\.(\d+)\.attn\.(q|k|v|o)_proj", r"model.layers.\1.self_attn.\2_proj"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)_proj", r"model.layers.\1.mlp.\2_proj"),
    (r"lm_head", "lm_head"),
    (r"embedder", "model.embed_tokens"),
    (r"final_norm", "model.norm"),
    (r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)", r"model.layers.\1.\2"),
    (r"layers\.(\d+)\.attn\.(q|k)_norm", r"model.layers.\1.self_attn.\2_norm"),
)
TUNIX_QWEN3 = NameMap(_TUNIX_LLM)  # tunix.models.qwen3 <-> transformers' Qwen3ForCausalLM
TUNIX_LLAMA3 = NameMap(_TUNIX_LLM)  # tunix.models.llama3 <-> transformers' LlamaForCausalLM
IDENTITY = NameMap(((r"(.*)", r"\1"),))  # NNX keys that are the torch twin's module paths already
CLASS_MAPS = (("tunix.models.qwen3.", TUNIX_QWEN3), ("tunix.models.llama3.", TUNIX_LLAMA3))  # module prefix -> map


def name_map_for(model: nnx.Module) -> NameMap:
    """The name map of `model`'s class: tunix's Qwen 3 / Llama 3 maps (their `Einsum` layer rule registered),
    `IDENTITY` for models that are not tunix's; ValueError naming the fix for another tunix family.

    >>> name_map_for(nnx.Linear(2, 3, rngs=nnx.Rngs(0))) is IDENTITY
    True
    """
    module = type(model).__module__ + "."
    for prefix, name_map in CLASS_MAPS:
        if module.startswith(prefix):
            tunix_rules()
            return name_map
    if module.startswith("tunix."):
        raise ValueError(
            f"{type(model).__module__}.{type(model).__name__} has no ready name map (miss-jax has tunix's Qwen 3 and "
            "Llama 3): pass name_map=interop.nnx_io.NameMap(((nnx key pattern, torch module path), ...)) to "
            "get_peft_model / from_pretrained, and register the layer rule of its projections "
            "(miss_jax.layer_rules.register)."
        )
    return IDENTITY


def tunix_rules() -> None:
    """Registers the layer rule of tunix's `Einsum` modules (kernel `w`, no bias; in/out from `einsum_str`)."""
    from tunix.models.llama3 import model as llama3
    from tunix.models.qwen3 import model as qwen3

    for cls in (qwen3.Einsum, llama3.Einsum):
        register(cls, lambda module: einsum_rule(module.einsum_str, kernel="w", bias=None))


def torch_names(model: nnx.Module, keys: Sequence[str], name_map: NameMap) -> dict[str, str]:
    """`{nnx key: torch module path}` for `keys`; ValueError naming the keys the map misses or merges."""
    names = {k: name_map.torch_name(k) for k in keys}
    missing = [k for k, n in names.items() if n is None]
    if missing:
        raise ValueError(
            f"The name map gives no torch module path for {missing[:5]}{' ...' if len(missing) > 5 else ''}: add a "
            "(pattern, replacement) pair for them to the NameMap, or do not target them."
        )
    seen: dict[str, str] = {}
    for k, n in names.items():
        if n in seen:
            raise ValueError(
                f"The name map sends both {seen[n]} and {k} to {n!r}: each layer needs its own torch module path. "
                "Fix the NameMap's patterns."
            )
        seen[n] = k
    return names


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    """One variable of a `modules_to_save` module and its PEFT tensor.

    `path`: the variable's graph path below the module (its last entry is the variable's name); `name`: its
    torch parameter name (the PEFT key without `base_model.model.`); `rule`: the owner's layer rule, if it has
    one. Layouts are `interop.names`' (`to_torch`): a rule's kernel is stored as the torch weight
    `(out, in)`, its bias flattened `(out,)`; any other `kernel` `(..., in, out)` as torch's `(out, in, ...)`
    (a Conv's); other variables as they are.
    """

    name: str
    path: GraphPath
    rule: Optional[KernelRule] = None

    @property
    def leaf(self) -> str:
        """The variable's name."""
        return str(self.path[-1])

    def torch_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The torch tensor's shape for a variable of `shape`."""
        return peft_names.torch_shape(self.leaf, tuple(shape), self.rule)

    def to_torch(self, value: jax.Array) -> jax.Array:
        """The variable's value in torch's layout (`torch_shape(value.shape)`)."""
        return peft_names.to_torch(self.leaf, value, self.rule)

    def from_torch(self, tensor: Any, shape: tuple[int, ...]) -> jax.Array:
        """A torch-layout tensor (`torch_shape(shape)`) as the variable's value of `shape`."""
        return peft_names.from_torch(self.leaf, jnp.asarray(tensor), self.rule, tuple(shape))


def saved_tensors(module: nnx.Module, key: str, name_map: NameMap) -> list[SavedTensor]:
    """The PEFT tensors of `module` (at NNX key `key`) saved whole as a `modules_to_save` copy, one per
    `nnx.Param`; ValueError naming the module or variable the map has no torch name for."""
    nodes = dict(nnx.iter_graph(module))
    leaves = dict(name_map.leaves)
    found: dict[str, SavedTensor] = {}
    for path, variable in nodes.items():
        if not isinstance(variable, nnx.Param):
            continue
        owner, leaf = nodes[path[:-1]], str(path[-1])
        owner_key = ".".join([key, *map(str, path[:-1])])
        torch_module = name_map.torch_name(owner_key)
        if torch_module is None:
            raise ValueError(
                f"The name map gives no torch module path for {owner_key} (saved whole with modules_to_save): add a "
                "(pattern, replacement) pair for it to the NameMap."
            )
        rule = rule_for(owner, owner_key) if has_rule(owner) else None
        if rule is not None and leaf in (rule.kernel, rule.bias):
            torch_leaf = "weight" if leaf == rule.kernel else "bias"
        elif leaf in leaves:
            torch_leaf = leaves[leaf]
        else:
            raise ValueError(
                f"The name map has no torch parameter name for {owner_key}.{leaf} (saved whole with modules_to_save): "
                f"add ({leaf!r}, '<torch name>') to the NameMap's leaves."
            )
        tensor = SavedTensor(f"{torch_module}.{torch_leaf}", path, rule)
        if tensor.name in found:
            raise ValueError(f"The name map sends two variables of {key} to {tensor.name!r}. Fix the NameMap.")
        found[tensor.name] = tensor
    return list(found.values())


def _torch_saved(config: MissConfig, model: nnx.Module, saved: Sequence[str], name_map: NameMap) -> Any:
    """`modules_to_save` for the torch twin: the config's own names if PEFT's rule
    (`adapters.match_modules_to_save`) picks the same modules among the mapped ones, else the saved modules'
    torch paths."""
    mapped = [n for k in discover(model) for n in [name_map.torch_name(k)] if n is not None]
    wanted = sorted(torch_names(model, saved, name_map).values())
    picked = sorted(match_modules_to_save(config.modules_to_save, mapped))
    return config.modules_to_save if picked == wanted else tuple(wanted)


def _torch_layers(model: nnx.Module, name_map: NameMap) -> dict[str, tuple[str, Layer]]:
    """The model's mapped linear layers as its torch twin names them: `{torch path: (nnx key, Layer with the
    torch path)}`, for matching a config's torch-side targets (PEFT's rules) on them."""
    return {n: (k, dataclasses.replace(layer, path=tuple(n.split("."))))
            for k, layer in discover(model).items() if layer.is_linear
            for n in [name_map.torch_name(k)] if n is not None}


def _torch_targets(config: MissConfig, model: nnx.Module, layer_keys: Sequence[str], name_map: NameMap) -> Any:
    """`target_modules` for the torch twin: the config's own if it selects the same layers there, else the
    list of their torch paths."""
    torch_layers = {n: layer for n, (_, layer) in _torch_layers(model, name_map).items()}
    wanted = sorted(torch_names(model, layer_keys, name_map).values())
    try:
        same = sorted(layer.key for layer in select(config, torch_layers)) == wanted
    except ValueError:
        same = False
    return config.target_modules if same else tuple(wanted)


def _check_coverage(model: nnx.Module, config: MissConfig, blocks: Mapping[str, Any], biases: Mapping[str, Any],
                    saved: Sequence[str], name_map: NameMap, folder: str) -> None:
    """ValueError unless the folder's blocks are exactly those of the layers its config targets (PEFT's rules on
    the torch paths) and its biases exactly those its `bias` mode trains, as the Linen loader requires
    (`interop.state_dict.set_peft_model_state_dict`): a folder missing blocks, or holding a bias its config
    does not train (`bias="none"`), is refused, never loaded on fewer layers or over the base bias."""
    view = _torch_layers(model, name_map)
    try:
        targeted = {view[layer.key][0] for layer in select(config, {n: layer for n, (_, layer) in view.items()})}
    except ValueError as e:
        raise ValueError(f"{folder}: its config's targets do not fit this model through the name map: {e}") from None
    layers = discover(model)
    if config.bias == "none":
        trained: set[str] = set()
    elif config.bias == "MiSS_only":
        trained = {k for k in targeted if layers[k].has_bias}
    else:
        nodes = {".".join(map(str, p)): n for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Module)}
        trained = {k for k in layers if name_map.torch_name(k) is not None and k in nodes
                   and not any(k == s or k.startswith(s + ".") for s in saved) and bias_leaf(nodes[k], k) is not None}
    problems = []
    for what, want, have in (("miss_block", targeted, set(blocks)), ("bias", trained, set(biases))):
        missing, extra = sorted(want - have), sorted(have - want)
        if missing:
            problems.append(f"no {what} for {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if extra:
            problems.append(f"a {what} for {extra[:6]}{' ...' if len(extra) > 6 else ''}, which its config "
                            f"(target_modules, bias={config.bias!r}) does not cover")
    if problems:
        raise ValueError(
            f"{folder} does not match its own adapter config on this model: " + "; ".join(problems) + ". Check the "
            "name map and that the folder was saved from this architecture with this adapter config."
        )


def adapter_files(peft_model: MissNnxModel, adapter_name: str, name_map: NameMap,
                  dtype: Any = jnp.float32) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(adapter_config.json object, tensors by PEFT key)` of one adapter."""
    state = peft_model.adapters[adapter_name]
    model = peft_model.base_model
    names = torch_names(model, state.layers + state.biases + state.saved, name_map)
    layers = miss_layers(model)
    modules = dict(nnx.iter_graph(model))
    tensors = {f"{PREFIX}{names[k]}.{BLOCK}": layers[k].miss_block[adapter_name].get_value() for k in state.layers}
    by_key = {".".join(map(str, p)): node for p, node in modules.items() if isinstance(node, nnx.Module)}
    for key in state.biases:
        node = by_key[key]
        leaf = bias_leaf(node, key)
        value = node
        for part in leaf:
            value = getattr(value, part)
        inner = ".base_layer" if leaf[0] == "base_layer" else ""
        tensors[f"{PREFIX}{names[key]}{inner}.bias"] = value.get_value().reshape(-1)
    wrappers = saved_modules(model)
    for key in state.saved:
        copy = wrappers[key].modules_to_save[adapter_name]
        variables = dict(nnx.iter_graph(copy))
        for tensor in saved_tensors(copy, key, name_map):
            tensors[PREFIX + tensor.name] = tensor.to_torch(variables[tensor.path].get_value())
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    config = dataclasses.replace(state.config, target_modules=_torch_targets(state.config, model, state.layers, name_map),
                                 modules_to_save=_torch_saved(state.config, model, state.saved, name_map))
    d = config.to_dict()
    d["inference_mode"] = True
    return d, tensors


def save_pretrained(peft_model: MissNnxModel, save_directory: str, name_map: NameMap,
                    selected_adapters: Optional[Sequence[str]] = None, dtype: Any = jnp.float32) -> None:
    """Writes adapters as PEFT folders (`default` at the root, the others in sub-folders named after them),
    keyed by the torch module paths `name_map` gives; PyTorch PEFT loads them on the torch twin."""
    folder_write.check_dtype(dtype)
    selected = list(peft_model.adapters) if selected_adapters is None else list(selected_adapters)
    bad = [n for n in selected if n not in peft_model.adapters]
    if bad or not selected:
        raise ValueError(f"Unknown adapters {bad or selected}; this model has {list(peft_model.adapters)}.")
    folders = {"" if n == "default" else n: adapter_files(peft_model, n, name_map, dtype) for n in selected}
    folder_write.write_adapter_folders(save_directory, folders, card=peft_io.model_card(peft_model))


def _read(folder: str, is_trainable: bool, config: Optional[MissConfig] = None) -> tuple[MissConfig, dict[str, Any]]:
    legacy = False
    if config is None:
        config, legacy = peft_io.config_from_json(files.read_config(folder))
    tensors = files.read_tensors(folder)
    if legacy:
        tensors = {k.replace(".bone_", ".miss_"): v for k, v in tensors.items()}
    return dataclasses.replace(config, inference_mode=not is_trainable), tensors


SavedCopy = list[tuple[SavedTensor, Any]]  # a modules_to_save copy's tensors: (where it goes, its torch tensor)


def _plan_saved(model: nnx.Module, config: MissConfig, tensors: dict[str, Any], name_map: NameMap,
                folder: str) -> dict[str, SavedCopy]:
    """The `modules_to_save` copies of a folder, `{nnx key: tensors}`, found as PEFT finds them (PEFT's rule,
    `adapters.match_modules_to_save`, on the mapped modules' torch paths); their tensors are popped from
    `tensors`. ValueError naming the module for a tensor missing from the folder or of a wrong shape."""
    names = config.modules_to_save or ()
    torch = {k: n for k in discover(model) for n in [name_map.torch_name(k)] if n is not None}
    chosen = set(match_modules_to_save(names, torch.values()))
    picked = [k for k, n in torch.items() if n in chosen]
    nodes = {".".join(map(str, p)): n for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Module)}
    copies: dict[str, SavedCopy] = {}
    for key in picked:
        node = nodes[key]
        module = node.original_module if isinstance(node, ModulesToSave) else node
        variables = dict(nnx.iter_graph(module))
        copy: SavedCopy = []
        for tensor in saved_tensors(module, key, name_map):
            name = PREFIX + tensor.name
            want = tensor.torch_shape(variables[tensor.path].shape)
            if name not in tensors:
                raise ValueError(
                    f"{folder}: modules_to_save {list(names)} covers {key} (torch {torch[key]}), but the folder has "
                    f"no {name}. Check the name map (and its leaves) and that the folder was saved from this "
                    "architecture."
                )
            if tuple(tensors[name].shape) != want:
                raise ValueError(
                    f"{folder}: {name} (modules_to_save copy of {key}) is {tuple(tensors[name].shape)}, but {key} "
                    f"needs {want}. Check the name map and that the folder was trained on this architecture and size."
                )
            copy.append((tensor, tensors.pop(name)))
        copies[key] = copy
    return copies


@dataclasses.dataclass(frozen=True)
class FolderAdapter:
    """A PEFT folder's adapter, read for an NNX model: its config for the model (`modules_to_save` as NNX keys),
    the layers it adapts, the keys of the modules it saves, and its tensors: blocks and biases `{nnx key:
    array}`, module copies `{nnx key: SavedCopy}`."""

    config: MissConfig
    layers: tuple[Layer, ...]
    blocks: Mapping[str, Any]
    biases: Mapping[str, Any]
    copies: Mapping[str, SavedCopy]

    @property
    def saved(self) -> tuple[str, ...]:
        """The keys of the modules the adapter saves whole."""
        return tuple(self.copies)


def _plan(model: nnx.Module, config: MissConfig, tensors: Mapping[str, Any], name_map: NameMap,
          folder: str) -> FolderAdapter:
    """What a folder's tensors hold for `model`: its config for the NNX model (`modules_to_save` as NNX
    keys), the layers it adapts, their blocks `{nnx key: block}`, its biases `{nnx key: bias}` and its module copies `{nnx key: tensors}`;
    ValueError naming the module for a tensor no layer maps to or a tensor whose shape does not fit."""
    tensors = dict(tensors)
    copies = _plan_saved(model, config, tensors, name_map, folder)
    layers = {k: layer for k, layer in discover(model).items() if layer.is_linear}
    by_torch: dict[str, str] = {}
    for k in layers:
        n = name_map.torch_name(k)
        if n is not None:
            if n in by_torch:
                raise ValueError(f"The name map sends both {by_torch[n]} and {k} to {n!r}. Fix the NameMap's patterns.")
            by_torch[n] = k
    blocks, biases, unknown = {}, {}, []
    for key, value in tensors.items():
        path = key.removeprefix(PREFIX)
        module, leaf = path.rsplit(".", 1)
        module = module.removesuffix(".base_layer")
        target = by_torch.get(module)
        if target is None or leaf not in (BLOCK, "bias"):
            unknown.append(key)
        elif leaf == BLOCK:
            blocks[target] = value
        else:
            biases[target] = value
    if unknown:
        raise ValueError(
            f"{folder}: tensors {unknown[:3]} name modules no NNX layer maps to; the model's mapped modules are "
            f"{sorted(by_torch)[:6]} ... Fix the name map (or load the folder into its own architecture)."
        )
    variant = ops.variant(config.variant)
    for k, block in blocks.items():
        layer = layers[k]
        try:
            want = variant.block_shape(layer.in_features, layer.out_features, config.r, config.mini_r)
        except ValueError as e:
            raise ValueError(f"{folder}: cannot adapt {k} ({layer.type_name}): {e}") from None
        if tuple(block.shape) != tuple(want):
            raise ValueError(
                f"{folder}: the {BLOCK} for {k} (torch {[n for n, v in by_torch.items() if v == k][0]}) is "
                f"{tuple(block.shape)}, but that layer (in={layer.in_features}, out={layer.out_features}) needs "
                f"{tuple(want)} for a {config.variant} adapter with r={config.r}. Check the name map and that the "
                "folder was trained on this architecture and size."
            )
    check_bias_shapes(model, biases, folder)
    _check_coverage(model, config, blocks, biases, tuple(copies), name_map, folder)
    config = dataclasses.replace(config, modules_to_save=tuple(copies) or None)
    return FolderAdapter(config, tuple(layers[k] for k in blocks), blocks, biases, copies)


def fill(peft_model: MissNnxModel, adapter_name: str, found: FolderAdapter) -> None:
    """Writes a folder's adapter (`read_adapter`), added to `peft_model` as `adapter_name` with its layers and
    saved modules, into the model: blocks, biases and module copies."""
    blocks, biases, copies = found.blocks, found.biases, found.copies
    model = peft_model.base_model
    adapted = miss_layers(model)
    by_key = {".".join(map(str, p)): n for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Module)}
    for key, value in blocks.items():
        variable = adapted[key].miss_block[adapter_name]
        variable.set_value(jnp.asarray(value, variable.get_value().dtype))
    for key, value in biases.items():
        node = by_key[key]
        variable = node
        for part in bias_leaf(node, key) or ():
            variable = getattr(variable, part)
        variable.set_value(jnp.asarray(value, variable.get_value().dtype).reshape(variable.shape))
    wrappers = saved_modules(model)
    for key, copy in copies.items():
        variables = dict(nnx.iter_graph(wrappers[key].modules_to_save[adapter_name]))
        for tensor, value in copy:
            variable = variables[tensor.path]
            variable.set_value(tensor.from_torch(value, variable.shape).astype(variable.get_value().dtype))


def check_bias_shapes(model: nnx.Module, biases: Mapping[str, Any], folder: str) -> None:
    """ValueError naming the layer for a bias tensor that does not fit it (or a layer with no bias)."""
    by_key = {".".join(map(str, p)): n for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Module)}
    for key, value in biases.items():
        leaf = bias_leaf(by_key[key], key)
        variable = by_key[key]
        for part in leaf or ():
            variable = getattr(variable, part)
        if leaf is None or int(jnp.size(value)) != int(variable.get_value().size):
            raise ValueError(f"{folder}: the bias for {key} does not fit that layer (its bias: "
                             f"{None if leaf is None else variable.shape}, the file's: {tuple(value.shape)}).")


def read_adapter(model: nnx.Module, folder: str, name_map: NameMap, is_trainable: bool = False,
                 config: Optional[MissConfig] = None) -> FolderAdapter:
    """The adapter of PEFT folder `folder` for `model` (through `name_map`), frozen (inference mode) unless
    `is_trainable`; `config` replaces the folder's `adapter_config.json`. ValueError naming the module for
    anything that does not fit; nothing is changed."""
    config, tensors = _read(folder, is_trainable, config)
    return _plan(model, config, tensors, name_map, folder)


def load_adapter(peft_model: MissNnxModel, model_id: str, adapter_name: str, name_map: NameMap,
                 is_trainable: bool = False, config: Optional[MissConfig] = None) -> None:
    """Loads the PEFT folder `model_id` as adapter `adapter_name` of `peft_model` (not activated, as in PEFT),
    frozen (`frozen_adapters`) unless `is_trainable`. ValueError, leaving the model unchanged, for anything
    that does not fit. (`peft_model.load_adapter(model_id, adapter_name)` calls this with the model's map.)"""
    found = read_adapter(peft_model.base_model, model_id, name_map, is_trainable, config)
    peft_model.add_adapter(adapter_name, found.config, layers=found.layers, saved=found.saved)
    fill(peft_model, adapter_name, found)
