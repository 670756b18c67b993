"""Writes the benchmark's weights once, for both frameworks: `<workdir>/<model>/flax` (msgpack) and
`<workdir>/<model>/torch` (safetensors), the same random weights: torch init (seed 0), converted by
transformers' own `from_pt=True` (its `from_flax=True` leaves the weights on the meta device in 4.57).
Run as its own process so that neither timed side imports the other framework.

    python benchmarks/prepare.py SETTINGS_JSON [MODEL ...]
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import specs


def prepare(settings: specs.Settings, names: Optional[list[str]] = None) -> None:
    """Writes the weights of the models named in `names` (default: all). On a GPU run only the torch folder
    is written, on the GPU (the JAX side converts it itself); a model whose class and config equal one
    already written shares its folder."""
    import torch
    import transformers

    gpu = settings.device == "gpu" and torch.cuda.is_available()
    for spec in settings.models:
        if names and spec.name not in names:
            continue
        torch_dir = os.path.join(settings.workdir, spec.name, "torch")
        flax_dir = os.path.join(settings.workdir, spec.name, "flax")
        twin = next((s for s in settings.models if s.name != spec.name and (s.model_class, s.config) ==
                     (spec.model_class, spec.config) and os.path.isdir(os.path.join(settings.workdir, s.name, "torch"))),
                    None)
        if twin is not None:
            os.makedirs(os.path.dirname(torch_dir), exist_ok=True)
            for kind in ("torch", "flax"):
                if os.path.isdir(os.path.join(settings.workdir, twin.name, kind)):
                    os.symlink(os.path.join(settings.workdir, twin.name, kind), os.path.join(settings.workdir, spec.name, kind))
            continue
        torch.manual_seed(0)
        config = getattr(transformers, spec.config_class)(**spec.config)
        with torch.device("cuda" if gpu else "cpu"):
            model = getattr(transformers, spec.model_class)(config)
        model.save_pretrained(torch_dir, safe_serialization=True)
        del model
        if settings.device == "cpu":
            flax_model = getattr(transformers, "Flax" + spec.model_class).from_pretrained(torch_dir, from_pt=True)
            flax_model.save_pretrained(flax_dir)


if __name__ == "__main__":
    prepare(specs.Settings.from_json(open(sys.argv[1]).read()), sys.argv[2:])
