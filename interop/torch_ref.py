"""The PyTorch reference: run a transformers folder + adapter folder in both frameworks, compare.

The base model folder (a transformers `save_pretrained` folder) is loaded in Flax (`from_pt=True`
when it holds only torch weights) and in torch (converted from the Flax params when it holds only
Flax weights).
The adapter goes on the JAX side through `MissModel.from_pretrained` and on the torch side through
`peft.PeftModel.from_pretrained`. PEFT's MiSS supports only `nn.Linear`; for GPT-2-style `Conv1D`
layers the torch side loads the exact LoRA export of the JAX adapter instead (`interop.lora`).

torch and peft are imported lazily: the JAX side of miss-jax does not need them.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, Optional

import numpy as np

from miss_jax import MissModel

TORCH_WEIGHTS = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
FLAX_WEIGHTS = ("flax_model.msgpack", "flax_model.msgpack.index.json")
DEFAULT_ATOL = 1e-4  # the checks' default largest allowed |jax - torch|


def _torch_modules() -> tuple[Any, Any]:
    try:
        import peft
        import torch
    except ImportError as e:
        raise ValueError(
            f"The PyTorch reference needs torch and peft ({e}); install them with `pip install 'miss-jax[torch]'`."
        ) from None
    return torch, peft


def weight_formats(model_dir: str) -> tuple[bool, bool]:
    """(has torch weights, has Flax weights) of a transformers folder; raises if it is not one."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"Base model folder {model_dir!r} does not exist.")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(
            f"{model_dir!r} is not a transformers model folder (no config.json); pass the folder that "
            "`model.save_pretrained(...)` wrote."
        )
    has_torch = any(os.path.isfile(os.path.join(model_dir, f)) for f in TORCH_WEIGHTS)
    has_flax = any(os.path.isfile(os.path.join(model_dir, f)) for f in FLAX_WEIGHTS)
    if not (has_torch or has_flax):
        raise ValueError(f"{model_dir!r} holds no model weights (looked for {TORCH_WEIGHTS + FLAX_WEIGHTS}).")
    return has_torch, has_flax


def architecture(model_dir: str) -> tuple[Any, str]:
    """The folder's config and its architecture name (e.g. 'LlamaForCausalLM'), checked to exist in both
    frameworks."""
    import transformers

    weight_formats(model_dir)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    names = getattr(config, "architectures", None) or []
    if not names:
        raise ValueError(f"{model_dir}/config.json names no `architectures`; re-save the model with save_pretrained.")
    name = names[0]
    missing = [n for n in (name, "Flax" + name) if not hasattr(transformers, n)]
    if missing:
        raise ValueError(f"transformers {transformers.__version__} has no {missing} for {model_dir!r}.")
    return config, name


def load_flax_model(model_dir: str) -> tuple[Any, dict]:
    """The folder's model as a transformers Flax model and its params (converted from torch weights if needed).

    Flax weights load with `_do_init=False` (no random init to compile and throw away), so the model
    holds no params: pass them on, e.g. `MissModel.from_pretrained(model, adapter_dir, params=params)`.
    (transformers' `from_pt=True` needs an initialised model, so torch weights load with the init.)
    """
    import transformers

    config, name = architecture(model_dir)
    has_torch, has_flax = weight_formats(model_dir)
    cls = getattr(transformers, "Flax" + name)
    if has_flax:
        model, params = cls.from_pretrained(model_dir, _do_init=False)
    else:
        model = cls.from_pretrained(model_dir, from_pt=True)
        params = model.params
    model.config.name_or_path = model.config.name_or_path or model_dir  # as torch's from_pretrained records it
    return model, params


def load_torch_model(model_dir: str, flax_params: Optional[Mapping] = None) -> Any:
    """The folder's model as a torch model in eval mode.

    A folder with only Flax weights is converted through the Flax params (`flax_params`, or loaded
    from the folder): transformers 4.57's `from_pretrained(from_flax=True)` leaves the weights on the
    meta device, so the model is built from its config and filled with
    `load_flax_weights_in_pytorch_model`.
    """
    import transformers
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    _torch_modules()
    config, name = architecture(model_dir)
    has_torch, _ = weight_formats(model_dir)
    cls = getattr(transformers, name)
    if has_torch:
        return cls.from_pretrained(model_dir).eval()
    params = flax_params if flax_params is not None else load_flax_model(model_dir)[1]
    model = load_flax_weights_in_pytorch_model(cls(config), params)
    model.tie_weights()
    return model.eval()


def random_inputs(
    config: Any, main_input_name: str, batch: int = 2, seq_len: int = 8, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random model inputs built from the config (numpy; the same arrays feed both frameworks).

    Vision models get `pixel_values` `(batch, channels, size, size)` float32; text models `input_ids`
    `(batch, seq_len)` int32 (ids >= 3, clear of the usual special tokens) and an all-ones
    `attention_mask`; encoder-decoder models also get `decoder_input_ids` `(batch, seq_len)`.
    """
    if batch <= 0 or seq_len <= 0:
        raise ValueError(f"--batch and --seq-len must be positive, got {batch} and {seq_len}.")
    if main_input_name not in ("input_ids", "pixel_values"):
        raise ValueError(
            f"check builds `input_ids` (text) or `pixel_values` (vision) inputs; this model's main input is "
            f"{main_input_name!r}, which it does not support."
        )
    rng = np.random.default_rng(seed)
    if main_input_name == "pixel_values":
        size = config.image_size
        shape = (batch, config.num_channels) + ((size, size) if isinstance(size, int) else tuple(size))
        return {"pixel_values": rng.standard_normal(shape).astype(np.float32)}
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's {limit} positions; pass a smaller --seq-len.")
    vocab = config.vocab_size
    low = 3 if vocab > 3 else 0
    ids = rng.integers(low, vocab, (batch, seq_len)).astype(np.int32)
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = rng.integers(low, vocab, (batch, seq_len)).astype(np.int32)
    return out


def torch_outputs(model: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs a torch model (or PeftModel) on numpy `inputs`; returns its tensor outputs as float32 numpy."""
    torch, _ = _torch_modules()
    feed = {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind in "iu" else v) for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**feed)
    return {k: v.detach().float().numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


def flax_outputs(model: Callable[..., Any], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs a Flax model or `MissModel` on numpy `inputs`; returns its array outputs as float32 numpy."""
    import jax.numpy as jnp

    out = model(**{k: jnp.asarray(v) for k, v in inputs.items()})
    return {k: np.asarray(v, np.float32) for k, v in out.items() if hasattr(v, "shape") and hasattr(v, "dtype")}


def max_abs_diffs(reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Largest absolute difference per output both sides produced with the same shape."""
    common = [k for k in reference if k in other and reference[k].shape == other[k].shape]
    if not common:
        raise ValueError(
            f"The two frameworks share no output to compare (torch: {sorted(reference)}, Flax: {sorted(other)})."
        )
    return {k: float(np.max(np.abs(reference[k] - other[k]))) if reference[k].size else 0.0 for k in common}


def needs_lora_route(jax_model: MissModel) -> bool:
    """True when an adapted layer is a GPT-2-style Conv1D, which PEFT's MiSS cannot load."""
    return any(layer.layout == "torch" for spec in jax_model.plan.adapters for layer in spec.layers)


def torch_adapter_model(torch_model: Any, adapter_dir: str, jax_model: MissModel) -> tuple[Any, str]:
    """The torch model with the adapter loaded by PEFT, and the route taken to get it there.

    * 'peft-miss': PEFT loads the MiSS folder itself;
    * 'peft-miss (BONE re-saved as MISS)': PEFT 0.21 no longer reads Bone folders, so it loads the
      MiSS folder the JAX model writes (PEFT's own Bone -> MiSS conversion rule);
    * 'peft-lora' (Conv1D layers, which PEFT's MiSS cannot wrap): PEFT's LoRA loads the JAX
      adapter's exact LoRA export (full rank for bat).
    """
    from .lora import save_lora
    from .safetensors_io import read_config

    _, peft = _torch_modules()
    if needs_lora_route(jax_model):
        route, write = "peft-lora", lambda folder: save_lora(jax_model, folder, jax_model.active_adapter)
    elif read_config(adapter_dir)["peft_type"] != "MISS":
        route, write = "peft-miss (BONE re-saved as MISS)", jax_model.save_pretrained
    else:
        return peft.PeftModel.from_pretrained(torch_model, adapter_dir).eval(), "peft-miss"
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "adapter")
        write(folder)
        return peft.PeftModel.from_pretrained(torch_model, folder).eval(), route


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """Largest absolute difference per output between the JAX and the torch adapted models."""

    diffs: dict[str, float]
    atol: float
    route: str
    adapter_is_zero: bool

    @property
    def max_diff(self) -> float:
        return float(np.max(list(self.diffs.values())))  # NaN propagates: a NaN output never passes

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_diff)) and self.max_diff <= self.atol

    def lines(self) -> list[str]:
        """Human-readable report, one output per line, then the verdict."""
        out = [f"torch side: {self.route}"]
        if self.adapter_is_zero:
            out.append("note: every adapter block is zero, so the adapter does not change the model")
        out += [f"{k:<28s} max |jax - torch| = {v:.3e}" for k, v in self.diffs.items()]
        verdict = "OK" if self.ok else "MISMATCH"
        out.append(f"{verdict}: largest difference {self.max_diff:.3e} (atol {self.atol:g})")
        return out


def adapter_is_zero(jax_model: MissModel) -> bool:
    """True when every miss_block of the active adapters is all zeros."""
    import jax

    blocks = [jax_model.adapter_params["miss"][n] for n in jax_model.active_adapters]
    return all(not np.any(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(blocks))


def check(
    base_dir: str,
    adapter_dir: str,
    atol: float = DEFAULT_ATOL,
    seq_len: int = 8,
    batch: int = 2,
    seed: int = 0,
    progress: bool = False,
) -> CheckResult:
    """Loads `base_dir` + `adapter_dir` in JAX and in torch, runs the same random inputs, compares."""
    from tqdm.auto import tqdm

    from miss_jax import MissModel

    from .safetensors_io import read_config

    read_config(adapter_dir)  # a clear error for a wrong folder before any model is loaded
    bar = tqdm(total=4, desc="check", disable=not progress, leave=False)

    def stage(label: str, done: int = 1) -> None:
        bar.update(done)
        bar.set_postfix_str(label)

    stage("loading the JAX model + adapter", 0)
    flax_model, params = load_flax_model(base_dir)
    jax_model = MissModel.from_pretrained(flax_model, adapter_dir, params=params)
    stage("loading the torch model + adapter")
    torch_model, route = torch_adapter_model(load_torch_model(base_dir, params), adapter_dir, jax_model)
    inputs = random_inputs(flax_model.config, type(flax_model).main_input_name, batch, seq_len, seed)
    stage("JAX forward (compiling)")
    jax_out = flax_outputs(jax_model, inputs)
    stage("torch forward")
    diffs = max_abs_diffs(torch_outputs(torch_model, inputs), jax_out)
    stage("done")
    bar.close()
    return CheckResult(diffs, atol, route, adapter_is_zero(jax_model))

