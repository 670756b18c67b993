"""Writes the benchmark's weights once, for both frameworks: `<workdir>/<model>/flax` (msgpack) and
`<workdir>/<model>/torch` (safetensors), the same random weights: torch init (seed 0), converted by
transformers' own `from_pt=True` (its `from_flax=True` leaves the weights on the meta device in 4.57).
Run as its own process so that neither timed side imports the other framework.

    python benchmarks/prepare.py SETTINGS_JSON
"""

from __future__ import annotations

import os
import sys

import specs


def prepare(settings: specs.Settings) -> None:
    import torch
    import transformers

    for spec in settings.models:
        torch_dir = os.path.join(settings.workdir, spec.name, "torch")
        flax_dir = os.path.join(settings.workdir, spec.name, "flax")
        torch.manual_seed(0)
        config = getattr(transformers, spec.config_class)(**spec.config)
        getattr(transformers, spec.model_class)(config).save_pretrained(torch_dir, safe_serialization=True)
        flax_model = getattr(transformers, "Flax" + spec.model_class).from_pretrained(torch_dir, from_pt=True)
        flax_model.save_pretrained(flax_dir)


if __name__ == "__main__":
    prepare(specs.Settings.from_json(open(sys.argv[1]).read()))
