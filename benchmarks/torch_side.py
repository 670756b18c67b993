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

TORCH_ATTENTION = "sdpa"  # the attention kernel the torch side runs


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
        # sdpa: PyTorch's fused attention, transformers' default where it is available; named so the JSON says it
        self.model = cls.from_pretrained(
            os.path.join(settings.workdir, spec.name, "torch"), attn_implementation=TORCH_ATTENTION
        ).to(self.device).eval()
        batch = {k: torch.as_tensor(v).long().to(self.device) for k, v in specs.inputs(spec).items()}
        self.model_inputs = {k: v for k, v in batch.items() if k != "labels"}
        self.train_inputs = dict(self.model_inputs, labels=batch.get("labels", batch["input_ids"]))
        if self.device == "cuda":
            self.memory = timing.Memory(lambda: torch.cuda.memory_allocated() / 2**20,
                                        lambda: torch.cuda.max_memory_allocated() / 2**20,
                                        torch.cuda.reset_peak_memory_stats)
        else:
            self.memory = timing.Memory()
        self.baseline: dict[str, float] = {}  # memory with the base model only, set by `run`

    def _sync(self, x: Any) -> Any:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return x

    def _rounds(self) -> timing.Rounds:
        return timing.Rounds(self._sync, self.settings.warmup, self.memory, self.baseline)

    def _config(self, variant: str) -> Any:
        import peft

        return peft.MissConfig(**specs.miss_kwargs(variant, self.settings, self.spec))

    def _peft_model(self, variant: str) -> Any:
        """A fresh PEFT model: the base model copied, then wrapped."""
        return self._wrap(copy.deepcopy(self.model), variant)

    def _forward(self, model: Any) -> Callable[[], Any]:
        def run() -> Any:
            with self.torch.inference_mode():
                return model(**self.model_inputs).logits

        return run

    def run(self) -> dict[str, Any]:
        import numpy as np

        out: dict[str, Any] = {}
        with self.torch.inference_mode():
            logits = self.model(**specs.logits_inputs(self.spec, self.model_inputs)).logits.float().cpu().numpy()
        np.save(os.path.join(self.settings.workdir, self.spec.name, "torch_logits.npy"), logits, allow_pickle=False)
        out["attn_implementation"] = TORCH_ATTENTION
        self.baseline = self.memory.current()  # the base model, loaded and run once
        if self.spec.suite == "long":
            out["long"] = self._long_cases()
            return out
        models: dict[str, Any] = {}
        out["forward"] = self._forward_cases(models)
        out["train"] = self._train_cases(models)
        out["trainable_params"] = {v: pm.get_nb_trainable_parameters()[0] for v, pm in models.items()}
        del models
        if self.spec.generate[0]:
            out["generate"] = self._generate_cases()
        out["create"], out["merge_and_unload"] = {}, {}
        for variant in specs.VARIANTS:
            out["create"][variant] = timing.measure_fresh(
                lambda: copy.deepcopy(self.model), lambda m: self._wrap(m, variant), self._sync,
                self.settings.repeats, self.memory, self.baseline)
            out["merge_and_unload"][variant] = timing.measure_fresh(
                lambda: self._peft_model(variant), lambda pm: pm.merge_and_unload(), self._sync,
                self.settings.repeats, self.memory, self.baseline)
        out["copy_kernels"] = self._copy_kernels()
        return out

    def _forward_cases(self, models: dict[str, Any]) -> dict[str, dict]:
        """Base, each MiSS variant (unmerged; kept in `models`) and the merged balance model, in rounds."""
        forward = self._rounds()
        # The deep copies stand for the one model a user has: made outside the cases' memory.
        copies = {v: copy.deepcopy(self.model) for v in (*specs.VARIANTS, "merged")}
        forward.add("base", lambda: self._forward(self.model))
        for variant in specs.VARIANTS:
            def build(variant: str = variant) -> Callable[[], Any]:
                models[variant] = self._wrap(copies.pop(variant), variant).eval()
                return self._forward(models[variant])

            forward.add(variant, build)
        forward.add("merged", lambda: self._forward(self._wrap(copies.pop("merged"), "balance").merge_and_unload()))
        return forward.run(self.settings.repeats)

    def _long_cases(self) -> dict[str, dict]:
        """A balance train step at length (sdpa attention), without and with PEFT's gradient checkpointing,
        each in a process of its own (`timing.isolated`, as on the JAX side)."""
        return {name: timing.isolated(__file__, self.settings, self.spec.name, name)["measure"]
                for name in specs.LONG_CASES if name != "balance/plain"}

    def long_case(self, name: str) -> dict[str, Any]:
        """One case of `_long_cases` in this process. Checkpointing is PEFT's `gradient_checkpointing_enable`,
        non-reentrant: the reentrant form passes no gradient to adapters inside a checkpointed block unless
        the inputs require grad. Refuses to measure a step whose adapters get no gradient."""
        self.baseline = self.memory.current()

        def build() -> Callable[[], Any]:
            pm = self._peft_model("balance")
            if name == "balance+remat":
                pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            trainable = [p for p in pm.parameters() if p.requires_grad]
            step = self._train_step(pm, trainable)
            step()
            if not all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainable):
                raise RuntimeError("PEFT's adapters received no gradient: the measured step would not train.")
            return step

        rounds = self._rounds()
        rounds.add(name, build)
        return {"measure": rounds.run(specs.long_repeats(self.settings))[name]}

    def _generate_cases(self) -> dict[str, dict]:
        """Greedy generate (KV cache, every token produced): the merged balance model, and PEFT's
        `PeftModel.generate` with the adapter unmerged."""
        torch = self.torch
        _, prompt, new = self.spec.generate
        inputs = {k: torch.as_tensor(v).long().to(self.device) for k, v in specs.generate_inputs(self.spec).items()}
        options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        rounds = self._rounds()

        def run(model: Any) -> Callable[[], Any]:
            def generate() -> Any:
                with torch.inference_mode():
                    return model.generate(**inputs, **options)

            return generate

        rounds.add("merged", lambda: run(self._peft_model("balance").merge_and_unload().eval()))
        rounds.add("balance", lambda: run(self._peft_model("balance").eval()))
        return rounds.run(self.settings.repeats)

    def _train_cases(self, models: dict[str, Any]) -> dict[str, dict]:
        """A train step of each MiSS variant and of full fine-tuning, in rounds."""
        train = self._rounds()
        for variant, pm in models.items():
            train.add(variant, lambda pm=pm: self._train_step(pm, [p for p in pm.parameters() if p.requires_grad]))

        def build_full() -> Callable[[], Any]:
            full = copy.deepcopy(self.model).requires_grad_(True)
            return self._train_step(full, list(full.parameters()))

        train.add("full", build_full)
        return train.run(self.settings.repeats)

    def _wrap(self, model: Any, variant: str) -> Any:
        import peft

        return peft.get_peft_model(model, self._config(variant))

    def _train_step(self, model: Any, trainable: list[Any]) -> Callable[[], Any]:
        """One step: loss, backward through the model, AdamW on `trainable` only (the rest is frozen)."""
        model.train()
        opt = self.torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)

        def run() -> Any:
            opt.zero_grad(set_to_none=True)
            loss = model(**self.train_inputs).loss
            loss.backward()
            opt.step()
            return loss.detach()

        return run

    def _copy_kernels(self) -> dict[str, float]:
        """Reference for merge_and_unload: a copy of the same target weights."""
        pm = self._peft_model("balance")
        weights = [m.get_base_layer().weight for m in pm.modules() if hasattr(m, "miss_block")]

        def run() -> Any:
            with self.torch.no_grad():
                return [w.clone() for w in weights]

        return timing.measure_fresh(lambda: None, lambda _: run(), self._sync, self.settings.repeats,
                                    self.memory, self.baseline)


def long_case_main(settings_path: str, out_path: str, model: str, case: str) -> None:
    """One long-sequence case in this process (`timing.isolated` calls this through `--long-case`)."""
    settings = specs.Settings.from_json(open(settings_path).read())
    if settings.device == "cpu":
        timing.pin_threads(settings.threads)
    import torch

    if settings.device == "cpu":
        torch.set_num_threads(settings.threads)
    spec = next(s for s in settings.models if s.name == model)
    suite = TorchSuite(spec, settings)
    with torch.inference_mode():
        suite.model(**specs.logits_inputs(spec, suite.model_inputs))  # run once, as in `run`
    write_json(out_path, suite.long_case(case))


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[3] == "--long-case":
        long_case_main(sys.argv[1], sys.argv[2], sys.argv[4], sys.argv[5])
    else:
        main(sys.argv[1], sys.argv[2])
