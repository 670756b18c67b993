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
    device = "cuda" if settings.device == "gpu" and torch.cuda.is_available() else "cpu"  # cpu: a dry run
    result: dict[str, Any] = {
        "side": "torch",
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__},
        "device": "cpu" if device == "cpu" else f"cuda:{torch.cuda.get_device_name()}",
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [],
        "threads": torch.get_num_threads(),
        "models": {},
    }
    save = lambda: write_json(out_path, result)  # noqa: E731  (after every group: a killed run keeps what it measured)
    save()
    for spec in settings.models:
        TorchSuite(spec, settings, device).run(result["models"].setdefault(spec.name, {}), save)
    save()


class TorchSuite:
    """Every case for one model. PEFT wraps models in place, so each case starts from a deep copy."""

    def __init__(self, spec: specs.ModelSpec, settings: specs.Settings, device: str = "cpu") -> None:
        import torch
        import transformers

        self.torch = torch
        self.spec, self.settings = spec, settings
        self.device = device
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

    def _peft_model(self, variant: str, bf16: bool = False) -> Any:
        """A fresh PEFT model: the base model copied (in bfloat16 with `bf16`: PEFT then keeps the adapter in
        float32, `autocast_adapter_dtype`), then wrapped."""
        model = copy.deepcopy(self.model)
        return self._wrap(model.to(self.torch.bfloat16) if bf16 else model, variant)

    def _autocast(self, bf16: bool) -> Any:
        """`torch.autocast` to bfloat16 for bf16 cases, else a no-op context."""
        import contextlib

        return self.torch.autocast(self.device, dtype=self.torch.bfloat16) if bf16 else contextlib.nullcontext()

    def _device_mb(self, step: Callable[[], Any], resident: list[Any]) -> dict[str, float]:
        """`{"device_mb": ...}` on CUDA: the device memory one step needs, as XLA's `program_memory_mb` counts
        it: the tensors it starts with (`resident`: the case's parameters, buffers, optimizer state and batch)
        plus its peak allocation above what was allocated before it. `{}` on CPU."""
        torch = self.torch
        if self.device != "cuda":
            return {}
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        seen, held = set(), 0
        for t in resident:
            if isinstance(t, torch.Tensor) and t.is_cuda and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                held += t.numel() * t.element_size()
        return {"device_mb": round((torch.cuda.max_memory_allocated() - before + held) / 2**20, 1)}

    def _forward(self, model: Any) -> Callable[[], Any]:
        def run() -> Any:
            with self.torch.inference_mode():
                return model(**self.model_inputs).logits

        return run

    def run(self, out: dict[str, Any], save: Callable[[], None]) -> None:
        """Fills `out` with every case of this model, calling `save()` after each group."""
        import numpy as np

        spec = self.spec
        with self.torch.inference_mode():
            logits = self.model(**specs.logits_inputs(spec, self.model_inputs)).logits.float().cpu().numpy()
        np.save(os.path.join(self.settings.workdir, spec.name, "torch_logits.npy"), logits, allow_pickle=False)
        out["attn_implementation"] = TORCH_ATTENTION
        self.baseline = self.memory.current()  # the base model, loaded and run once
        if spec.suite == "long":
            out["long"] = {}
            for name in spec.long_cases():
                if name != "balance/plain":  # JAX without long-sequence features: no PyTorch twin
                    out["long"][name] = self._long_case(name)
                    save()
            return
        models: dict[str, Any] = {}
        if any(spec.runs("forward", c) for c in specs.FORWARD_CASES):
            out["forward"] = self._forward_cases(models)
            save()
        for variant in specs.VARIANTS:  # the trained variants no forward case made
            if spec.runs("train", variant) and variant not in models:
                models[variant] = self._peft_model(variant)
        out["train"] = self._train_cases(models)
        out["trainable_params"] = {v: pm.get_nb_trainable_parameters()[0] for v, pm in models.items()}
        save()
        del models
        if spec.generate[0]:
            out["generate"] = self._generate_cases()
            save()
        out["create"], out["merge_and_unload"] = {}, {}
        for variant in specs.VARIANTS:
            if spec.runs("create", variant):
                out["create"][variant] = timing.measure_fresh(
                    lambda: copy.deepcopy(self.model), lambda m: self._wrap(m, variant), self._sync,
                    self.settings.repeats, self.memory, self.baseline)
            if spec.runs("merge_and_unload", variant):
                out["merge_and_unload"][variant] = timing.measure_fresh(
                    lambda: self._peft_model(variant), lambda pm: pm.merge_and_unload(), self._sync,
                    self.settings.repeats, self.memory, self.baseline)
        if out["merge_and_unload"]:
            out["copy_kernels"] = self._copy_kernels()
        save()

    def _forward_cases(self, models: dict[str, Any]) -> dict[str, dict]:
        """Base, each MiSS variant (unmerged; kept in `models`) and the merged balance model, in rounds."""
        forward = self._rounds()
        # The deep copies stand for the one model a user has: made outside the cases' memory.
        variants = [v for v in specs.VARIANTS if self.spec.runs("forward", v)]
        copies = {v: copy.deepcopy(self.model) for v in variants}
        if self.spec.runs("forward", "base"):
            forward.add("base", lambda: self._forward(self.model))
        for variant in variants:
            def build(variant: str = variant) -> Callable[[], Any]:
                models[variant] = self._wrap(copies.pop(variant), variant).eval()
                return self._forward(models[variant])

            forward.add(variant, build)
        if self.spec.runs("forward", "merged"):
            merged = self._wrap(copy.deepcopy(self.model), "balance")
            forward.add("merged", lambda: self._forward(merged.merge_and_unload()))
        return forward.run(self.settings.repeats)

    def _long_case(self, name: str) -> dict[str, Any]:
        """One long-sequence case: in a process of its own on CPU (`timing.isolated`, as on the JAX side),
        in this one on CUDA."""
        if self.device == "cuda":
            return self.long_case(name)["measure"]
        return timing.isolated(__file__, self.settings, self.spec.name, name)["measure"]

    def long_case(self, name: str) -> dict[str, Any]:
        """One case of `_long_case` in this process: a balance train step with sdpa attention, `+remat` with
        PEFT's `gradient_checkpointing_enable` (non-reentrant: the reentrant form passes no gradient to
        adapters inside a checkpointed block unless the inputs require grad), `.../bf16` in bfloat16
        (autocast). Refuses to measure a step whose adapters get no gradient."""
        self.baseline = self.memory.current()
        case, bf16 = name.removesuffix(specs.BF16), name.endswith(specs.BF16)
        box: dict[str, Any] = {}

        def build() -> Callable[[], Any]:
            pm = self._peft_model("balance", bf16=bf16)
            if case == "balance+remat":
                pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            trainable = [p for p in pm.parameters() if p.requires_grad]
            step = self._train_step(pm, trainable, bf16)
            step()
            if not all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainable):
                raise RuntimeError("PEFT's adapters received no gradient: the measured step would not train.")
            box.update(pm=pm, step=step)
            return step

        rounds = self._rounds()
        rounds.add(name, build)
        measure = rounds.run(specs.long_repeats(self.settings))[name]
        measure.update(self._device_mb(box["step"], self._resident(box["pm"], box["step"])))
        return {"measure": measure}

    def _resident(self, model: Any, step: Any) -> list[Any]:
        """The tensors a train step of `model` starts with: parameters, buffers, optimizer state, batch."""
        state = [t for s in step.optimizer.state.values() for t in s.values()]
        return [*model.parameters(), *model.buffers(), *state, *self.train_inputs.values()]

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

        if self.spec.runs("generate", "merged"):
            rounds.add("merged", lambda: run(self._peft_model("balance").merge_and_unload().eval()))
        if self.spec.runs("generate", "balance"):
            rounds.add("balance", lambda: run(self._peft_model("balance").eval()))
        return rounds.run(self.settings.repeats)

    def _train_cases(self, models: dict[str, Any]) -> dict[str, dict]:
        """A train step of each MiSS variant (and the bfloat16 balance one, `.../bf16`) and of full fine-tuning,
        in rounds, with each step's device memory on CUDA."""
        train = self._rounds()
        steps: dict[str, tuple[Any, Any]] = {}

        def add(case: str, make: Callable[[], Any], bf16: bool = False) -> None:
            def build() -> Callable[[], Any]:
                model = make()
                steps[case] = model, self._train_step(model, [p for p in model.parameters() if p.requires_grad], bf16)
                return steps[case][1]

            train.add(case, build)

        for variant, pm in models.items():
            if self.spec.runs("train", variant):
                add(variant, lambda pm=pm: pm)
        if self.spec.runs("train", "balance" + specs.BF16):
            add("balance" + specs.BF16, lambda: self._peft_model("balance", bf16=True), bf16=True)
        if self.spec.runs("train", "full"):
            add("full", lambda: copy.deepcopy(self.model).requires_grad_(True))
        out = train.run(self.settings.repeats)
        for case, (model, step) in steps.items():
            out[case].update(self._device_mb(step, self._resident(model, step)))
        return out

    def _wrap(self, model: Any, variant: str) -> Any:
        import peft

        return peft.get_peft_model(model, self._config(variant))

    def _train_step(self, model: Any, trainable: list[Any], bf16: bool = False) -> Callable[[], Any]:
        """One step: loss, backward through the model, AdamW on `trainable` only (the rest is frozen); with
        `bf16`, the forward and backward under `torch.autocast(bfloat16)`. The returned function carries its
        optimizer (`.optimizer`)."""
        model.train()
        opt = self.torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)

        def run() -> Any:
            opt.zero_grad(set_to_none=True)
            with self._autocast(bf16):
                loss = model(**self.train_inputs).loss
            loss.backward()
            opt.step()
            return loss.detach()

        run.optimizer = opt  # type: ignore[attr-defined]
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
