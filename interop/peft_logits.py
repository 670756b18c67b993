"""The PyTorch side of `miss-jax check --nnx`: a PEFT adapter on a transformers causal LM, its logits.

    python peft_logits.py MODEL_DIR ADAPTER_DIR IDS.npy OUT.npy

loads `MODEL_DIR` with `AutoModelForCausalLM` (float32), the adapter with `peft.PeftModel.from_pretrained`,
runs the token ids `IDS.npy` `(batch, seq)` and writes the logits `(batch, seq, vocab)` to `OUT.npy`.
It imports only numpy, torch, transformers and peft (not miss-jax), so it runs in any Python that has
them: `miss-jax check --nnx` runs it as a script with `--torch-python` (default `$MISS_JAX_TORCH_PYTHON`,
else the interpreter running miss-jax). Exit codes: 0 done, 2 an error, reported in one line on stderr.
"""

from __future__ import annotations

import sys
import warnings


def adapter_logits(model_dir: str, adapter_dir: str, ids_path: str, out_path: str) -> None:
    """Writes the logits `(batch, seq, vocab)` of `model_dir` + `adapter_dir` on the ids of `ids_path`."""
    import numpy as np

    try:
        import peft
        import torch
        import transformers
    except ImportError as e:
        raise ValueError(f"{sys.executable} cannot run the PyTorch side ({e}): it needs torch, transformers and "
                         "peft; pass --torch-python with an interpreter that has them.") from None
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor(np.load(ids_path))).logits.float().numpy()
    np.save(out_path, logits)


def main(argv: list[str]) -> int:
    """Runs `adapter_logits` on `argv` (MODEL_DIR ADAPTER_DIR IDS.npy OUT.npy); returns the exit code."""
    if len(argv) != 4:
        print("usage: peft_logits.py MODEL_DIR ADAPTER_DIR IDS.npy OUT.npy", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter_logits(*argv)
    except Exception as e:  # one line for the caller to relay
        print(f"{type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
