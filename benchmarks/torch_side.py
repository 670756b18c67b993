"""The PyTorch side of the benchmark: PEFT's MiSS on transformers' torch models, in its own process.

    python benchmarks/torch_side.py SETTINGS_JSON OUT_JSON

Reads the torch weights `prepare.py` wrote (the same as the Flax ones), times the same cases as
`jax_side.py` with the same r, targets, batch and threads, writes one JSON and the base logits.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable
from typing import Any

import specs
import timing
from report import write_json


def main(settings_path: str, out_path: str) -> None:
    settings = specs.Settings.from_json(open(settings_path).read())
    if settings.device == "cpu":
        timing.pin_threads(settings.threads)
    import peft
    import torch
    import transformers

    if settings.device == "cpu":
        torch.set_num_threads(settings.threads)
    else:
        # Same matmul precision as XLA's default for float32 on GPU (TF32).
        torch.set_float32_matmul_precision("high")
    result: dict[str, Any] = {
        "side": "torch",
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__},
        "device": "cpu" if settings.device == "cpu" else f"cuda:{torch.cuda.get_device_name()}",
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [],
        "threads": torch.get_num_threads(),
        "models": {},
    }
    for spec in settings.models:
        result["models"][spec.name] = TorchSuite(spec, settings).run()
    write_json(out_path, result)


class TorchSuite:
    """Every case for one model. PEFT wraps models in place, so each case starts from a deep copy."""

    def __init__(self, spec: specs.ModelSpec, settings: specs.Settings) -> None:
        import torch
        import transformers

        self.torch = torch
        self.spec, self.settings = spec, settings
        self.device = "cpu" if settings.device == "cpu" else "cuda"
        cls = getattr(transformers, spec.model_class)
        self.model = cls.from_pretrained(os.path.join(settings.workdir, spec.name, "torch")).to(self.device).eval()
        batch = {k: torch.as_tensor(v).long().to(self.device) for k, v in specs.inputs(spec).items()}
        self.model_inputs = {k: v for k, v in batch.items() if k != "labels"}
        self.train_inputs = dict(self.model_inputs, labels=batch.get("labels", batch["input_ids"]))
        cuda = self.device == "cuda"
        self.memory = timing.Memory(torch.cuda.reset_peak_memory_stats if cuda else None,
                                    (lambda: torch.cuda.max_memory_allocated() / 2**20) if cuda else None)

    def _sync(self, x: Any) -> Any:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return x

    def _measure(self, fn: Callable[[], Any]) -> dict[str, float]:
        s = self.settings
        return timing.measure(fn, self._sync, s.warmup, s.repeats, self.memory)

    def _config(self, variant: str) -> Any:
        import peft

        return peft.MissConfig(**specs.miss_kwargs(variant, self.settings, self.spec))

    def _peft_model(self, variant: str) -> Any:
        import peft

        return peft.get_peft_model(copy.deepcopy(self.model), self._config(variant))

    def _forward(self, model: Any) -> Callable[[], Any]:
        def run() -> Any:
            with self.torch.inference_mode():
                return model(**self.model_inputs).logits

        return run

    def run(self) -> dict[str, Any]:
        import numpy as np

        out: dict[str, Any] = {"forward": {}, "train": {}, "create": {}, "merge_and_unload": {}}
        logits = self._forward(self.model)().float().cpu().numpy()
        np.save(os.path.join(self.settings.workdir, self.spec.name, "torch_logits.npy"), logits, allow_pickle=False)
        out["attn_implementation"] = self.model.config._attn_implementation
        out["forward"]["base"] = self._measure(self._forward(self.model))
        for variant in specs.VARIANTS:
            pm = self._peft_model(variant).eval()
            out["forward"][variant] = self._measure(self._forward(pm))
            out["train"][variant] = self._train(pm, [p for p in pm.parameters() if p.requires_grad])
            del pm
        full = copy.deepcopy(self.model)
        full.requires_grad_(True)
        out["train"]["full"] = self._train(full, list(full.parameters()))
        del full
        for variant in specs.VARIANTS:
            out["create"][variant] = timing.measure_fresh(
                lambda: copy.deepcopy(self.model), lambda m: self._wrap(m, variant), self._sync,
                self.settings.repeats, self.memory)
            out["merge_and_unload"][variant] = timing.measure_fresh(
                lambda: self._peft_model(variant), lambda pm: pm.merge_and_unload(), self._sync,
                self.settings.repeats, self.memory)
        merged = self._peft_model("balance").merge_and_unload().eval()
        out["forward"]["merged"] = self._measure(self._forward(merged))
        out["copy_kernels"] = self._copy_kernels()
        out["trainable_params"] = {
            v: self._peft_model(v).get_nb_trainable_parameters()[0] for v in specs.VARIANTS
        }
        return out

    def _wrap(self, model: Any, variant: str) -> Any:
        import peft

        return peft.get_peft_model(model, self._config(variant))

    def _train(self, model: Any, trainable: list[Any]) -> dict[str, float]:
        """Loss, backward through the model, AdamW on `trainable` only (the rest is frozen)."""
        model.train()
        opt = self.torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)

        def run() -> Any:
            opt.zero_grad(set_to_none=True)
            loss = model(**self.train_inputs).loss
            loss.backward()
            opt.step()
            return loss.detach()

        result = self._measure(run)
        model.eval()
        return result

    def _copy_kernels(self) -> dict[str, float]:
        """Reference for merge_and_unload: a copy of the same target weights."""
        pm = self._peft_model("balance")
        weights = [m.get_base_layer().weight for m in pm.modules() if hasattr(m, "miss_block")]

        def run() -> Any:
            with self.torch.no_grad():
                return [w.clone() for w in weights]

        return self._measure(run)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
