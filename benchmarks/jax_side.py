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
    for spec in settings.models:
        result["models"][spec.name] = JaxSuite(spec, settings).run()
    write_json(out_path, result)


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
        self.model = cls.from_pretrained(os.path.join(settings.workdir, spec.name, "flax"))
        self.base = unfreeze(self.model.params)
        self.batch = {k: jnp.asarray(v) for k, v in specs.inputs(spec).items()}
        self.model_inputs = {k: v for k, v in self.batch.items() if k != "labels"}
        self.loss_fn = classification_loss if spec.task == "classification" else causal_lm_loss
        self.tx = optax.adamw(1e-4, weight_decay=0.01)
        self.memory = timing.Memory(*self._device_memory_hooks())
        self.baseline: dict[str, float] = {}  # memory with the base model only, set by `run`
        model = self.model
        self.forward = jax.jit(lambda params, inputs: model(**inputs, params=params).logits)

    def _device_memory_hooks(self) -> tuple[Any, Any]:
        device = self.jax.devices()[0]
        if device.platform == "cpu":
            return None, None
        stats = lambda key: device.memory_stats().get(key, 0) / 2**20  # noqa: E731
        # XLA exposes no reset of the peak: `peak_device_mb` is the process's peak so far.
        return (lambda: stats("bytes_in_use")), (lambda: stats("peak_bytes_in_use"))

    def _sync(self, x: Any) -> Any:
        return self.jax.block_until_ready(x)

    def _rounds(self) -> timing.Rounds:
        return timing.Rounds(self._sync, self.settings.warmup, self.memory, self.baseline)

    def _miss_model(self, variant: str) -> Any:
        from miss_jax import MissConfig, MissModel

        config = MissConfig(**specs.miss_kwargs(variant, self.settings, self.spec))
        return MissModel(self.model, config, params=self.base)

    def run(self) -> dict[str, Any]:
        import numpy as np

        out: dict[str, Any] = {"compiles": {}}
        logits = self.forward(self.base, specs.logits_inputs(self.spec, self.model_inputs))
        np.save(os.path.join(self.settings.workdir, self.spec.name, "jax_logits.npy"), np.asarray(logits),
                allow_pickle=False)
        self.baseline = self.memory.current()  # the base model, loaded and compiled
        if self.spec.suite == "long":
            out["long"] = self._long_cases(out["compiles"])
            return out
        models = {v: self._miss_model(v) for v in specs.VARIANTS}
        from miss_jax.programs import trace_count

        out["forward"] = self._forward_cases(models)
        for variant, pm in models.items():  # traces of each jitted program: 1 when nothing recompiled
            out["compiles"][f"forward/{variant}"] = trace_count(pm.plan)
        out["flops"] = self._forward_flops(models)
        traced = {variant: trace_count(pm.plan) for variant, pm in models.items()}
        out["train"] = self._train_cases(models, out["compiles"])
        for variant, pm in models.items():
            out["compiles"][f"train/{variant}"] = trace_count(pm.plan) - traced[variant]
        out["trainable_params"] = {v: pm.get_nb_trainable_parameters()[0] for v, pm in models.items()}
        del models
        if self.spec.generate[0]:
            out["generate"] = self._generate_cases()
        out["create"] = {v: self._create(v) for v in specs.VARIANTS}
        out["merge_and_unload"] = {v: self._merge(v) for v in specs.VARIANTS}
        out["copy_kernels"] = self._copy_kernels()
        return out

    def _forward_cases(self, models: dict[str, Any]) -> dict[str, dict]:
        """Base, each MiSS variant (unmerged) and the merged balance model, timed in rounds."""
        forward = self._rounds()
        forward.add("base", lambda: lambda: self.forward(self.base, self.model_inputs))
        for variant, pm in models.items():
            forward.add(variant, lambda pm=pm: lambda: pm(**self.model_inputs).logits)
        merged = self._miss_model("balance").merge_and_unload().params
        self.model.params = self.base
        forward.add("merged", lambda: lambda: self.forward(merged, self.model_inputs))
        return forward.run(self.settings.repeats)

    def _long_cases(self, compiles: dict[str, int]) -> dict[str, dict]:
        """A balance train step at length, as a user runs it: `balance/plain` (transformers' attention, the
        plain loss), `balance` (blockwise attention, the chunked loss) and `balance+remat` (and per-layer
        gradient checkpointing). Each case runs in a process of its own (`timing.isolated`): at this size
        one case's freed buffers would hide the next one's memory. `compiles` gets each step's traces."""
        out = {}
        for name in specs.LONG_CASES:
            flags = specs.LONG_XLA_FLAGS.get(name, "") if self.settings.device == "cpu" else ""
            result = timing.isolated(__file__, self.settings, self.spec.name, name, flags)
            out[name], compiles[f"long/{name}"] = result["measure"], result["compiles"]
            if flags:
                out[name]["xla_flags"] = flags
        return out

    def long_case(self, name: str) -> dict[str, Any]:
        """One case of `_long_cases` in this process: `{"measure": ..., "compiles": traces of its step}`."""
        from miss_jax import losses
        from miss_jax.programs import trace_count
        from miss_jax.train import create_train_state, make_train_step

        self.baseline = self.memory.current()
        pm = self._miss_model("balance")
        loss_fn = self.loss_fn
        if name != "balance/plain":
            pm.set_attn_implementation("blockwise")
            loss_fn = losses.ChunkedCausalLMLoss()
        if name == "balance+remat":
            pm.gradient_checkpointing_enable()
        rng = self.jax.random.PRNGKey(0)
        before = trace_count(pm.plan)

        def build() -> Callable[[], Any]:
            step = make_train_step(pm, self.tx, loss_fn)
            box: dict[str, Any] = {}

            def run() -> Any:
                if not box:  # built on the first call, so that it counts as this case's memory
                    box["state"] = create_train_state(pm, self.tx)
                box["state"], loss = step(pm.params, box["state"], self.batch, rng)
                return loss

            return run

        rounds = self._rounds()
        rounds.add(name, build)
        return {"measure": rounds.run(specs.long_repeats(self.settings))[name], "compiles": trace_count(pm.plan) - before}

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

        rounds.add("merged", merged)
        rounds.add("balance", unmerged)
        return rounds.run(self.settings.repeats)

    def _forward_flops(self, models: dict[str, Any]) -> dict[str, Optional[float]]:
        """XLA's count of floating-point operations in each compiled forward (`cost_analysis`): the work
        the adapter adds, whatever the machine (None where the backend gives no count)."""

        def flops(fn: Callable[..., Any], *args: Any) -> Optional[float]:
            cost = hlo.xla_cost(self.jax.jit(fn).lower(*args).compile())
            return float(cost["flops"]) if "flops" in cost else None

        inputs, model = self.model_inputs, self.model
        out = {"base": flops(lambda p: model(**inputs, params=p).logits, self.base)}
        for variant, pm in models.items():
            apply = pm.apply_fn()
            out[variant] = flops(lambda p, a, apply=apply: apply(p, a, **inputs).logits, pm.params, pm.adapter_params)
        return out

    def _train_cases(self, models: dict[str, Any], compiles: dict[str, int]) -> dict[str, dict]:
        """A train step of each MiSS variant and of full fine-tuning, timed in rounds, with HLO facts."""
        train = self._rounds()
        steps = {v: self._train_miss(pm) for v, pm in models.items()}
        steps["full"] = self._train_full()
        for case, (run, _, _) in steps.items():
            train.add(case, lambda run=run: run)
        out = train.run(self.settings.repeats)
        for case, (_, step, facts) in steps.items():
            out[case]["hlo"] = facts()
        compiles["train/full"] = self.full_traces[0]
        return out

    def _train_miss(self, pm: Any) -> tuple[Callable[[], Any], Any, Callable[[], dict]]:
        """(one step, the jitted step, its HLO facts) for a MiSS model: make_train_step, donated state."""
        from miss_jax.train import create_train_state, make_train_step

        step = make_train_step(pm, self.tx, self.loss_fn)
        box: dict[str, Any] = {}
        rng = self.jax.random.PRNGKey(0)
        params = pm.params

        def run() -> Any:
            if not box:  # built on the first call, so that the group counts it as this case's memory
                box["state"] = create_train_state(pm, self.tx)
            box["state"], loss = step(params, box["state"], self.batch, rng)
            return loss

        def facts() -> dict:
            text = step.lower(params, box["state"], self.batch, rng).compile().as_text()  # the cached executable
            return dict(hlo.train_step_facts(text, self._frozen_kernel_shapes(pm), self.spec.batch * self.spec.seq),
                        state_buffers=len(self.jax.tree_util.tree_leaves(box["state"])))

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
            text = jitted.lower(box["params"], box["opt"], self.batch, rng).compile().as_text()
            shapes = self._frozen_kernel_shapes(self._miss_model("balance"))
            return dict(hlo.train_step_facts(text, shapes, self.spec.batch * self.spec.seq),
                        state_buffers=len(jax.tree_util.tree_leaves((box["params"], box["opt"]))))

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
