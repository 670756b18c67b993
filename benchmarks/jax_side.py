"""The JAX side of the benchmark: miss_jax on transformers' Flax models, in its own process.

    python benchmarks/jax_side.py SETTINGS_JSON OUT_JSON

Reads the Flax weights `prepare.py` wrote, times every case (see `specs`), writes one JSON and the
base model's logits (`<workdir>/<model>/jax_logits.npy`) for the same-weights check.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, Optional

import hlo
import specs
import timing
from report import write_json


def _setup(settings: specs.Settings) -> None:
    if settings.device == "cpu":
        timing.pin_threads(settings.threads)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(settings_path: str, out_path: str) -> None:
    settings = specs.Settings.from_json(open(settings_path).read())
    _setup(settings)
    import flax
    import jax
    import optax
    import transformers

    import miss_jax

    device = jax.devices()[0]
    result: dict[str, Any] = {
        "side": "jax",
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                     "transformers": transformers.__version__, "miss_jax": getattr(miss_jax, "__version__", "")},
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "device_count": jax.device_count(),
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "models": {},
    }
    save = lambda: write_json(out_path, result)  # noqa: E731  (after every group: a killed run keeps what it measured)
    save()
    for spec in settings.models:
        JaxSuite(spec, settings).run(result["models"].setdefault(spec.name, {}), save)
    save()


def _counted(fn: Callable[..., Any], traces: list[int]) -> Callable[..., Any]:
    """`fn`, counting its Python runs in `traces[0]` (under `jit`: its traces)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        traces[0] += 1
        return fn(*args, **kwargs)

    return wrapper


class JaxSuite:
    """Every case for one model. Base params are kept apart from the model object, which
    `merge_and_unload` overwrites (it is restored after each merge)."""

    def __init__(self, spec: specs.ModelSpec, settings: specs.Settings) -> None:
        import jax
        import jax.numpy as jnp
        import optax
        import transformers
        from flax.core import unfreeze

        from miss_jax.train import causal_lm_loss, classification_loss

        self.jax, self.jnp, self.optax = jax, jnp, optax
        self.spec, self.settings = spec, settings
        self.full_traces = [0]  # traces of the full fine-tuning step
        from miss_jax import tree

        self.tree = tree
        cls = getattr(transformers, "Flax" + spec.model_class)
        folder = os.path.join(settings.workdir, spec.name, "flax")
        if os.path.isdir(folder):
            self.model = cls.from_pretrained(folder)
        else:  # GPU runs: prepare.py wrote only the torch weights; transformers converts them (from_pt)
            self.model = cls.from_pretrained(os.path.join(settings.workdir, spec.name, "torch"), from_pt=True)
        self.base = unfreeze(self.model.params)
        self.cls = cls
        self.batch = {k: jnp.asarray(v) for k, v in specs.inputs(spec).items()}
        self.model_inputs = {k: v for k, v in self.batch.items() if k != "labels"}
        self.loss_fn = classification_loss if spec.task == "classification" else causal_lm_loss
        self.tx = optax.adamw(1e-4, weight_decay=0.01)
        self.memory = timing.Memory(*self._device_memory_hooks())
        self.gpu = jax.devices()[0].platform != "cpu"
        self.baseline: dict[str, float] = {}  # memory with the base model only, set by `run`
        model = self.model

        def forward(params: Any, inputs: dict) -> Any:
            with self.attention():
                return model(**inputs, params=params).logits

        self.forward = jax.jit(forward)

    def _device_memory_hooks(self) -> tuple[Any, Any]:
        """Device memory in use (MiB) on an accelerator. XLA has no reset of its peak, so a case's device
        peak is read off its compiled program instead (`device_mb`, `hlo.program_memory_mb`)."""
        device = self.jax.devices()[0]
        if device.platform == "cpu":
            return None, None
        return (lambda: device.memory_stats().get("bytes_in_use", 0) / 2**20), None

    def attention(self) -> Any:
        """The context the base model's forward is traced in: on GPU, flash attention (cuDNN's through
        `jax.nn.dot_product_attention` for bfloat16, blockwise for float32), as every MissModel of the suite
        (`set_attn_implementation("flash")`) and as PyTorch's sdpa; on CPU the model's own."""
        import contextlib

        from miss_jax import attention

        return attention.efficient_attention(attention.Flash()) if self.gpu else contextlib.nullcontext()

    def _bf16(self) -> tuple[Any, dict]:
        """The model in bfloat16 (activations) with bfloat16 base params; MiSS blocks stay float32."""
        if not hasattr(self, "bf16"):
            model = self.cls(self.model.config, dtype=self.jnp.bfloat16, _do_init=False)
            self.bf16 = model, self.jax.tree_util.tree_map(lambda x: x.astype(self.jnp.bfloat16), self.base)
        return self.bf16

    def _sync(self, x: Any) -> Any:
        return self.jax.block_until_ready(x)

    def _rounds(self) -> timing.Rounds:
        return timing.Rounds(self._sync, self.settings.warmup, self.memory, self.baseline)

    def _miss_model(self, variant: str, bf16: bool = False) -> Any:
        from miss_jax import MissConfig, MissModel

        config = MissConfig(**specs.miss_kwargs(variant, self.settings, self.spec))
        model, params = self._bf16() if bf16 else (self.model, self.base)
        pm = MissModel(model, config, params=params)
        if self.gpu:
            pm.set_attn_implementation("flash")
        return pm

    def run(self, out: dict[str, Any], save: Callable[[], None]) -> None:
        """Fills `out` with every case of this model, calling `save()` after each group."""
        import numpy as np

        spec = self.spec
        out["compiles"] = {}
        logits = self.forward(self.base, specs.logits_inputs(spec, self.model_inputs))
        np.save(os.path.join(self.settings.workdir, spec.name, "jax_logits.npy"), np.asarray(logits),
                allow_pickle=False)
        self.baseline = self.memory.current()  # the base model, loaded and compiled
        if spec.suite == "long":
            out["long"] = {}
            self._long_cases(out["long"], out["compiles"], save)
            return
        variants = [v for v in specs.VARIANTS if spec.runs("forward", v) or spec.runs("train", v)]
        models = {v: self._miss_model(v) for v in variants}
        from miss_jax.programs import trace_count

        if any(spec.runs("forward", c) for c in specs.FORWARD_CASES):
            out["forward"] = self._forward_cases(models)
            for variant, pm in models.items():  # traces of each jitted program: 1 when nothing recompiled
                out["compiles"][f"forward/{variant}"] = trace_count(pm.plan)
            out["flops"], out["matmul_flops"] = self._forward_flops(models)
            save()
        traced = {variant: trace_count(pm.plan) for variant, pm in models.items()}
        out["train"] = self._train_cases(models, out["compiles"])
        for variant, pm in models.items():
            out["compiles"][f"train/{variant}"] = trace_count(pm.plan) - traced[variant]
        out["trainable_params"] = {v: pm.get_nb_trainable_parameters()[0] for v, pm in models.items()}
        save()
        del models
        if spec.generate[0]:
            out["generate"] = self._generate_cases()
            save()
        out["create"] = {v: self._create(v) for v in specs.VARIANTS if spec.runs("create", v)}
        out["merge_and_unload"] = {v: self._merge(v) for v in specs.VARIANTS if spec.runs("merge_and_unload", v)}
        if out["merge_and_unload"]:
            out["copy_kernels"] = self._copy_kernels()
        save()

    def _forward_cases(self, models: dict[str, Any]) -> dict[str, dict]:
        """Base, each MiSS variant (unmerged) and the merged balance model, timed in rounds."""
        forward = self._rounds()
        if self.spec.runs("forward", "base"):
            forward.add("base", lambda: lambda: self.forward(self.base, self.model_inputs))
        for variant, pm in models.items():
            if self.spec.runs("forward", variant):
                forward.add(variant, lambda pm=pm: lambda: pm(**self.model_inputs).logits)
        if self.spec.runs("forward", "merged"):
            merged = self._miss_model("balance").merge_and_unload().params
            self.model.params = self.base
            forward.add("merged", lambda: lambda: self.forward(merged, self.model_inputs))
        return forward.run(self.settings.repeats)

    def _long_cases(self, out: dict[str, dict], compiles: dict[str, int], save: Callable[[], None]) -> None:
        """A balance train step at length, as a user runs it (`specs.LONG_CASES`; on GPU `GPU_LONG_CASES`),
        each case saved into `out` as soon as it is measured; `compiles` gets each step's traces. On CPU each
        case runs in a process of its own (`timing.isolated`: at this size one case's freed buffers would
        hide the next one's memory); on GPU in this one (device memory is read off each compiled step)."""
        for name in self.spec.long_cases():
            if self.gpu:
                result = self.long_case(name)
            else:
                flags = specs.LONG_XLA_FLAGS.get(name, "")
                result = timing.isolated(__file__, self.settings, self.spec.name, name, flags)
                if flags:
                    result["measure"]["xla_flags"] = flags
            out[name], compiles[f"long/{name}"] = result["measure"], result["compiles"]
            save()

    def long_case(self, name: str) -> dict[str, Any]:
        """One long-sequence case in this process: `{"measure": ..., "compiles": traces of its step}`.
        `balance/plain`: transformers' attention and the plain loss; `balance`: "flash" attention (cuDNN on a
        GPU, blockwise elsewhere) and the chunked loss; `+remat`: and per-layer gradient checkpointing;
        `.../bf16`: the bfloat16 model (`_bf16`)."""
        from miss_jax import losses
        from miss_jax.programs import trace_count

        self.baseline = self.memory.current()
        case, bf16 = name.removesuffix(specs.BF16), name.endswith(specs.BF16)
        pm = self._miss_model("balance", bf16=bf16)
        loss_fn = self.loss_fn
        if case != "balance/plain":
            pm.set_attn_implementation("flash")
            loss_fn = losses.ChunkedCausalLMLoss()
        if case == "balance+remat":
            pm.gradient_checkpointing_enable()
        before = trace_count(pm.plan)
        run, _, facts = self._train_miss(pm, loss_fn, hlo_facts=False)
        rounds = self._rounds()
        rounds.add(name, lambda: run)
        measure = rounds.run(specs.long_repeats(self.settings))[name]
        measure.update(facts())
        measure["attention"] = pm.attn_implementation
        return {"measure": measure, "compiles": trace_count(pm.plan) - before}

    def _generate_cases(self) -> dict[str, dict]:
        """Greedy generate (KV cache, every token produced): the merged balance model's own `generate`
        (jitted as a user would) and `MissModel.generate` with the balance adapter unmerged."""
        _, prompt, new = self.spec.generate
        inputs = {k: self.jnp.asarray(v) for k, v in specs.generate_inputs(self.spec).items()}
        options = dict(max_new_tokens=new, min_length=prompt + new, do_sample=False, pad_token_id=0)
        rounds = self._rounds()

        def merged() -> Callable[[], Any]:
            plain, params = self._miss_model("balance").merge_and_unload(return_params=True)
            run = self.jax.jit(lambda p, ids, mask: plain.generate(ids, attention_mask=mask, params=p,
                                                                    **options).sequences)
            return lambda: run(params, inputs["input_ids"], inputs["attention_mask"])

        def unmerged() -> Callable[[], Any]:
            pm = self._miss_model("balance")
            return lambda: pm.generate(inputs["input_ids"], inputs["attention_mask"], **options).sequences

        if self.spec.runs("generate", "merged"):
            rounds.add("merged", merged)
        if self.spec.runs("generate", "balance"):
            rounds.add("balance", unmerged)
        return rounds.run(self.settings.repeats)

    def _forward_flops(self, models: dict[str, Any]) -> tuple[dict[str, Optional[float]], dict[str, int]]:
        """Per compiled forward (base and each MiSS variant): XLA's count of floating-point operations
        (`cost_analysis`; None where the backend gives none; on GPU it counts other things than on CPU),
        and the matmul FLOPs of the lowered program (`hlo.matmul_flops`, the same on every platform)."""

        def counts(fn: Callable[..., Any], *args: Any) -> tuple[Optional[float], int]:
            lowered = self.jax.jit(fn).lower(*args)
            cost = {} if self.gpu else hlo.xla_cost(lowered.compile())
            return (float(cost["flops"]) if "flops" in cost else None), hlo.matmul_flops(lowered.as_text(dialect="hlo"))

        inputs = self.model_inputs
        out = {"base": counts(lambda p: self.forward(p, inputs), self.base)}
        for variant, pm in models.items():
            apply = pm.apply_fn()
            out[variant] = counts(lambda p, a, apply=apply: apply(p, a, **inputs).logits, pm.params, pm.adapter_params)
        return {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}

    def _train_cases(self, models: dict[str, Any], compiles: dict[str, int]) -> dict[str, dict]:
        """A train step of each MiSS variant (and the bfloat16 balance one, `.../bf16`) and of full fine-tuning,
        timed in rounds, with HLO facts and the compiled step's device memory."""
        train = self._rounds()
        steps = {v: self._train_miss(pm) for v, pm in models.items() if self.spec.runs("train", v)}
        if self.spec.runs("train", "balance" + specs.BF16):
            steps["balance" + specs.BF16] = self._train_miss(self._miss_model("balance", bf16=True))
        if self.spec.runs("train", "full"):
            steps["full"] = self._train_full()
        for case, (run, _, _) in steps.items():
            train.add(case, lambda run=run: run)
        out = train.run(self.settings.repeats)
        for case, (_, step, facts) in steps.items():
            out[case].update(facts())
        if "full" in steps:
            compiles["train/full"] = self.full_traces[0]
        return out

    def _train_miss(self, pm: Any, loss_fn: Any = None, hlo_facts: bool = True) -> tuple[Callable[[], Any], Any, Callable[[], dict]]:
        """(one step, the jitted step, its facts) for a MiSS model: make_train_step, donated state. The facts:
        the compiled step's device memory (`device_mb`, on an accelerator) and, with `hlo_facts`, what its
        HLO shows (`hlo`)."""
        from miss_jax.train import create_train_state, make_train_step

        step = make_train_step(pm, self.tx, loss_fn or self.loss_fn)
        box: dict[str, Any] = {}
        rng = self.jax.random.PRNGKey(0)
        params = pm.params

        def run() -> Any:
            if not box:  # built on the first call, so that the group counts it as this case's memory
                box["state"] = create_train_state(pm, self.tx)
            box["state"], loss = step(params, box["state"], self.batch, rng)
            return loss

        def facts() -> dict:
            compiled = step.lower(params, box["state"], self.batch, rng).compile()  # the cached executable
            out: dict[str, Any] = {"device_mb": hlo.program_memory_mb(compiled)} if self.gpu else {}
            if hlo_facts:
                out["hlo"] = dict(hlo.train_step_facts(compiled.as_text(), self._frozen_kernel_shapes(pm),
                                                       self.spec.batch * self.spec.seq),
                                  state_buffers=len(self.jax.tree_util.tree_leaves(box["state"])))
            return out

        return run, step, facts

    def _frozen_kernel_shapes(self, pm: Any) -> set[tuple[int, ...]]:
        """Shapes (and transposes) of the adapted layers' kernels, which the MiSS step must not differentiate."""
        shapes = {tuple(self.tree.get(self.base, layer.path)["kernel"].shape) for layer in pm.plan.spec("default").layers}
        return shapes | {s[::-1] for s in shapes}

    def _train_full(self) -> tuple[Callable[[], Any], Any, Callable[[], dict]]:
        """Full fine-tuning for reference: every base param differentiated, AdamW, donated buffers."""
        jax, optax, model, loss_fn, tx = self.jax, self.optax, self.model, self.loss_fn, self.tx

        def step(params: Any, opt_state: Any, batch: dict, rng: Any) -> tuple[Any, Any, Any]:
            def loss(p: Any) -> Any:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                return loss_fn(model(**inputs, params=p, dropout_rng=rng, train=True), batch)

            value, grads = jax.value_and_grad(loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        jitted = jax.jit(_counted(step, self.full_traces), donate_argnums=(0, 1))
        box: dict[str, Any] = {}
        rng = jax.random.PRNGKey(0)

        def run() -> Any:
            if not box:  # built on the first call, so that the group counts it as this case's memory
                box["params"] = jax.tree_util.tree_map(self.jnp.copy, self.base)  # donated: never the base
                box["opt"] = tx.init(box["params"])
            box["params"], box["opt"], loss = jitted(box["params"], box["opt"], self.batch, rng)
            return loss

        def facts() -> dict:
            compiled = jitted.lower(box["params"], box["opt"], self.batch, rng).compile()
            shapes = self._frozen_kernel_shapes(self._miss_model("balance"))
            out: dict[str, Any] = {"device_mb": hlo.program_memory_mb(compiled)} if self.gpu else {}
            out["hlo"] = dict(hlo.train_step_facts(compiled.as_text(), shapes, self.spec.batch * self.spec.seq),
                              state_buffers=len(jax.tree_util.tree_leaves((box["params"], box["opt"]))))
            return out

        return run, jitted, facts

    def _create(self, variant: str) -> dict[str, float]:
        def create(_: Any) -> Any:
            return self._miss_model(variant).adapter_params

        return timing.measure_fresh(lambda: None, create, self._sync, self.settings.repeats, self.memory,
                                    self.baseline)

    def _merge(self, variant: str) -> dict[str, float]:
        def setup() -> Any:
            pm = self._miss_model(variant)
            self._sync(pm.adapter_params)
            return pm

        result = timing.measure_fresh(setup, lambda pm: pm.merge_and_unload().params, self._sync,
                                      self.settings.repeats, self.memory, self.baseline)
        self.model.params = self.base
        return result

    def _copy_kernels(self) -> dict[str, float]:
        """Reference for merge_and_unload: a jitted copy of the same kernels (one pass over them), measured
        like the merges (fresh memory each run)."""
        pm = self._miss_model("balance")
        kernels = [self.tree.get(self.base, layer.path)["kernel"] for layer in pm.plan.spec("default").layers]
        copy = self.jax.jit(lambda ks: [self.jnp.copy(k) for k in ks])
        return timing.measure_fresh(lambda: None, lambda _: copy(kernels), self._sync, self.settings.repeats,
                                    self.memory, self.baseline)



def long_case_main(settings_path: str, out_path: str, model: str, case: str) -> None:
    """One long-sequence case in this process (`timing.isolated` calls this through `--long-case`)."""
    settings = specs.Settings.from_json(open(settings_path).read())
    _setup(settings)
    spec = next(s for s in settings.models if s.name == model)
    suite = JaxSuite(spec, settings)
    suite.forward(suite.base, specs.logits_inputs(spec, suite.model_inputs))  # compiled, as in `run`
    write_json(out_path, suite.long_case(case))


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[3] == "--long-case":
        long_case_main(sys.argv[1], sys.argv[2], sys.argv[4], sys.argv[5])
    else:
        main(sys.argv[1], sys.argv[2])
