"""Long-sequence training: per-layer rematerialisation (`remat`), blockwise attention (`attention`) and
the chunked causal-LM loss (`losses`), each equal to the plain path, on the tiny models."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import tiny_models as tm
from miss_jax import MissConfig, attention, get_peft_model, linen, losses, remat
from miss_jax import train as T

DECODERS = ("llama", "mistral", "gemma", "gpt2", "gpt_neo", "opt")
TOL = dict(atol=1e-5, rtol=1e-5)


@functools.lru_cache(maxsize=None)
def _model(name: str):
    """The tiny models of `tiny_models`, plus a Mistral with a 3-token sliding window and a GPT-J."""
    if name == "mistral_window":
        config = transformers.MistralConfig(
            vocab_size=tm.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=3, max_position_embeddings=64)
        return transformers.FlaxMistralForCausalLM(config, seed=0)
    if name == "gptj":
        config = transformers.GPTJConfig(vocab_size=tm.VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                         n_positions=64)
        return transformers.FlaxGPTJForCausalLM(config, seed=0)
    return tm.flax_model(name)


def _adapted(name: str, **config):
    targets = ["q_proj", "v_proj"] if name in ("mistral_window", "gptj") else tm.targets(name)
    config = {"r": 4, "init_weights": False, "target_modules": targets, **config}
    return get_peft_model(_model(name), MissConfig(**config))


def _batch(name: str, seq: int = 13) -> dict:
    """Inputs with right padding in row 0 and left padding in row 1."""
    arch = name if name in tm.ARCHS else "llama"
    batch = {k: jnp.asarray(v) for k, v in tm.inputs(arch, seq=seq).items()}
    if "attention_mask" in batch:
        batch["attention_mask"] = batch["attention_mask"].at[0, -3:].set(0).at[1, :2].set(0)
    return batch


def _forward(pm, model) -> Callable:
    """`f(adapter_params, **inputs)`: the model through `miss_jax.linen.apply` with `pm`'s plan."""
    call = lambda p, **k: model(params=p, **k)  # noqa: E731
    return lambda adapter_params, **inputs: linen.apply(pm.plan, call, pm.params, adapter_params, **inputs)


def _value_and_grad(pm, model, batch: dict, *contexts: Callable[[], contextlib.AbstractContextManager],
                    real_tokens_only: bool = False):
    """Jitted (logits, grad of a fixed random projection of the logits) w.r.t. the trainable adapter
    params, with `contexts` entered while the forward is traced; `real_tokens_only`: padded positions
    out of the projection (as out of a loss)."""
    forward = _forward(pm, model)

    def loss(trainable):
        with contextlib.ExitStack() as stack:
            for make in contexts:
                stack.enter_context(make())
            logits = forward(trainable, **batch).logits
        weights = jax.random.normal(jax.random.PRNGKey(1), logits.shape)
        if real_tokens_only and "attention_mask" in batch:
            weights = weights * batch["attention_mask"][:, :, None]
        return (logits * weights).sum() / logits.size, logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(pm.trainable_params())
    return logits, grads


def _assert_trees_close(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


def _checkpoints(jaxpr) -> int:
    """How many top-level equations of `jaxpr` are `jax.checkpoint` calls."""
    checkpoint = jax.make_jaxpr(jax.checkpoint(lambda x: x))(0.0).eqns[0].primitive
    return sum(eqn.primitive is checkpoint for eqn in jaxpr.eqns)


# --------------------------------------------------------------------------- remat


def test_policies_and_unknown_policy():
    for name in remat.POLICIES:
        assert callable(remat.resolve_policy(name))
    with pytest.raises(ValueError, match="valid policies are .*nothing_saveable"):
        with remat.checkpointing("save_everything"):
            pass


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_remat_gradients_equal_plain(arch):
    pm, model, batch = _adapted(arch), _model(arch), _batch(arch)
    logits, grads = _value_and_grad(pm, model, batch)
    logits_r, grads_r = _value_and_grad(pm, model, batch, remat.checkpointing)
    np.testing.assert_allclose(logits_r, logits, **TOL)
    _assert_trees_close(grads_r, grads)
    # one checkpoint per layer: the outermost digit-named modules (T5's sub-layers run inside their block's)
    forward = _forward(pm, model)

    def run(trainable):
        with remat.checkpointing():
            return forward(trainable, **batch).logits

    layers = 4 if arch in ("t5", "bart") else 2
    assert _checkpoints(jax.make_jaxpr(run)(pm.trainable_params()).jaxpr) == layers


@pytest.mark.parametrize("policy", sorted(remat.POLICIES))
def test_remat_policies(policy):
    pm, model, batch = _adapted("llama"), _model("llama"), _batch("llama")
    _, grads = _value_and_grad(pm, model, batch)
    _, grads_r = _value_and_grad(pm, model, batch, lambda: remat.checkpointing(policy))
    _assert_trees_close(grads_r, grads)


def test_remat_keeps_dropout():
    """Training mode: the checkpointed layers draw the same dropout masks as the plain ones."""
    model, batch = _model("gpt2"), _batch("gpt2")
    run = lambda p: model(**batch, params=p, train=True, dropout_rng=jax.random.PRNGKey(3)).logits  # noqa: E731

    def run_r(p):
        with remat.checkpointing():
            return run(p)

    np.testing.assert_allclose(jax.jit(run_r)(model.params), jax.jit(run)(model.params), **TOL)
    assert not np.allclose(run(model.params), model(**batch).logits, atol=1e-3)  # dropout was on


def _llama(seq: int, vocab: int = tm.VOCAB, layers: int = 2):
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)
    model = transformers.FlaxLlamaForCausalLM(config, seed=0)
    return model, get_peft_model(model, MissConfig(r=4, target_modules=["q_proj", "v_proj"]))


def _mean_logit_loss(pm, model, ids, *contexts):
    forward = _forward(pm, model)

    def loss(trainable):
        with contextlib.ExitStack() as stack:
            for make in contexts:
                stack.enter_context(make())
            return forward(trainable, input_ids=ids).logits[..., 0].mean()

    return loss


def _residuals(loss: Callable, trainable) -> list:
    """Shapes and dtypes of what the backward pass of `loss` keeps (the leaves of its vjp function)."""
    return jax.tree_util.tree_leaves(jax.eval_shape(lambda t: jax.vjp(loss, t)[1], trainable))


def test_remat_saves_fewer_residuals():
    """The backward pass keeps each layer's input instead of its activations: no (B, H, T, T) residual."""
    model, pm = _llama(64, layers=4)
    ids = jnp.ones((2, 64), jnp.int32)
    plain = _residuals(_mean_logit_loss(pm, model, ids), pm.trainable_params())
    ckpt = _residuals(_mean_logit_loss(pm, model, ids, remat.checkpointing), pm.trainable_params())
    nbytes = lambda leaves: sum(np.prod(a.shape) * a.dtype.itemsize for a in leaves)  # noqa: E731
    assert any(a.shape == (2, 4, 64, 64) for a in plain)
    assert not any(a.shape == (2, 4, 64, 64) for a in ckpt)
    assert nbytes(ckpt) < nbytes(plain) / 4, (nbytes(ckpt), nbytes(plain))


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() == "cpu", reason="XLA:CPU merges the recomputation into the forward pass")
def test_remat_compiled_memory_drops():
    model, pm = _llama(1024, layers=4)
    ids = jnp.ones((2, 1024), jnp.int32)

    def temp(loss):
        return jax.jit(jax.grad(loss)).lower(pm.trainable_params()).compile().memory_analysis().temp_size_in_bytes

    assert temp(_mean_logit_loss(pm, model, ids, remat.checkpointing)) < temp(_mean_logit_loss(pm, model, ids)) / 2


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("name", DECODERS + ("mistral_window", "gptj"))
def test_attention_equals_plain(name):
    pm, model, batch = _adapted(name), _model(name), _batch(name)
    logits, grads = _value_and_grad(pm, model, batch)
    efficient = lambda: attention.memory_efficient_attention(block_size=4)  # noqa: E731
    logits_e, grads_e = _value_and_grad(pm, model, batch, efficient)
    np.testing.assert_allclose(logits_e, logits, **TOL)  # padded positions included
    _assert_trees_close(grads_e, grads)


KERNELS = {"sdpa": attention.Sdpa("xla"), "flash": attention.Flash(block_size=4)}  # "flash" is blockwise on CPU


@pytest.mark.parametrize("name, kernel", [(n, "sdpa") for n in DECODERS + ("mistral_window", "gptj")]
                         + [("llama", "flash")])
def test_attention_kernels_equal_plain(name, kernel):
    """`jax.nn.dot_product_attention` (XLA's on CPU; cuDNN's runs in the GPU benchmark) and "flash" (blockwise
    on CPU) against the model's own attention: logits (padded positions included) and adapter gradients
    through the real tokens (a left-padded query that sees no key passes no gradient to the keys in "sdpa",
    as in PyTorch's sdpa; transformers' eager attention passes one through its masked scores)."""
    pm, model, batch = _adapted(name), _model(name), _batch(name)
    logits, grads = _value_and_grad(pm, model, batch, real_tokens_only=True)
    efficient = lambda: attention.efficient_attention(KERNELS[kernel])  # noqa: E731
    logits_k, grads_k = _value_and_grad(pm, model, batch, efficient, real_tokens_only=True)
    np.testing.assert_allclose(logits_k, logits, **TOL)
    _assert_trees_close(grads_k, grads)


def _gqa_inputs():
    """q `(2, 11, 6, 8)`, k and v `(2, 11, 2, 8)`: three query heads per key/value head."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(keys[0], (2, 11, 6, 8)), jax.random.normal(keys[1], (2, 11, 2, 8)),
            jax.random.normal(keys[2], (2, 11, 2, 8)))


def _direct_attention(q, k, v, mask, window):
    """A direct softmax over the full (B, H, T, S) scores of `_gqa_inputs`, causal, with a key mask and window."""
    i, j = jnp.arange(11)[:, None], jnp.arange(11)[None, :]
    allowed = (j <= i) & (i - j <= (window if window is not None else 11)) & mask[:, None, None, :]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q / jnp.sqrt(8.0), jnp.repeat(k, 3, axis=2))
    weights = jax.nn.softmax(scores + jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, jnp.repeat(v, 3, axis=2))


def test_fused_attention_masks_gqa_and_windows():
    """`fused_attention` against the dense softmax, with and without padded keys (the two `lax.cond` branches)."""
    q, k, v = _gqa_inputs()
    for mask in (jnp.ones((2, 11), bool), jnp.ones((2, 11), bool).at[1, :3].set(False).at[0, -2:].set(False)):
        for window in (None, 2):
            got = jax.jit(lambda q, k, v, m: attention.fused_attention(q, k, v, m, window=window))(q, k, v, mask)
            np.testing.assert_allclose(got, _direct_attention(q, k, v, mask, window), **TOL)
    assert not attention.cudnn_fits(q.astype(jnp.bfloat16)) or jax.default_backend() == "gpu"


def test_sdpa_without_dropout_support_runs_the_models_attention_in_training():
    """A training call with attention dropout: "sdpa" gives way to the model's own attention (dropout kept);
    "flash" on CPU runs blockwise attention with dropout."""
    model, batch = _model("gpt2"), _batch("gpt2")
    rng = jax.random.PRNGKey(3)
    plain = model(**batch, train=True, dropout_rng=rng).logits
    with attention.efficient_attention(attention.Sdpa()):
        np.testing.assert_array_equal(model(**batch, train=True, dropout_rng=rng).logits, plain)
    with attention.efficient_attention(attention.Flash(block_size=4)):
        flash = model(**batch, train=True, dropout_rng=rng).logits
    assert np.isfinite(flash).all() and not np.allclose(flash, model(**batch).logits, atol=1e-3)
    with pytest.raises(ValueError, match="implementation must be 'xla', 'cudnn' or None"):
        attention.Sdpa("triton")


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt"])
def test_attention_and_remat_compose(name):
    pm, model, batch = _adapted(name), _model(name), _batch(name)
    logits, grads = _value_and_grad(pm, model, batch)
    efficient = lambda: attention.memory_efficient_attention(block_size=4)  # noqa: E731
    logits_b, grads_b = _value_and_grad(pm, model, batch, efficient, remat.checkpointing)
    np.testing.assert_allclose(logits_b, logits, **TOL)
    _assert_trees_close(grads_b, grads)


def test_blockwise_attention_window_and_gqa():
    """The pure function against a direct softmax over the full (B, H, T, S) scores."""
    q, k, v = _gqa_inputs()
    mask = jnp.ones((2, 11), bool).at[1, :3].set(False)
    got = attention.blockwise_attention(q, k, v, mask, window=2, block_size=4)
    np.testing.assert_allclose(got, _direct_attention(q, k, v, mask, 2), **TOL)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_attention_falls_back_for_weights_and_cache(name):
    model, batch = _model(name), _batch(name)
    efficient = lambda: attention.memory_efficient_attention(block_size=4)  # noqa: E731
    plain = model(**batch, output_attentions=True)
    with efficient():
        out = model(**batch, output_attentions=True)
    for a, b in zip(out.attentions, plain.attentions):
        np.testing.assert_allclose(a, b, **TOL)
    # one prefill step and one decoding step on a KV cache, as generate() runs them
    ids = batch["input_ids"]
    step = lambda: model(ids, **model.prepare_inputs_for_generation(ids, 16, batch["attention_mask"]))  # noqa: E731
    ref = step()
    with efficient():
        got = step()
    np.testing.assert_allclose(got.logits, ref.logits, **TOL)


def test_attention_leaves_other_families_alone():
    for arch in ("bert", "t5"):
        model, batch = _model(arch), _batch(arch)
        with attention.memory_efficient_attention(block_size=4):
            logits = model(**batch).logits
        np.testing.assert_array_equal(logits, model(**batch).logits)


def test_attention_keeps_dropout_on():
    model, batch = _model("gpt2"), _batch("gpt2")
    with attention.memory_efficient_attention(block_size=4):
        train = model(**batch, train=True, dropout_rng=jax.random.PRNGKey(3)).logits
    assert np.isfinite(train).all() and not np.allclose(train, model(**batch).logits, atol=1e-3)


def test_attention_drops_the_full_weights_buffer():
    model, pm = _llama(128)
    ids = jnp.ones((2, 128), jnp.int32)

    def compiled(*contexts):
        loss = _mean_logit_loss(pm, model, ids, *contexts)
        return jax.jit(jax.grad(loss)).lower(pm.trainable_params()).compile()

    plain, efficient = compiled(), compiled(lambda: attention.memory_efficient_attention(block_size=32))
    assert "f32[2,4,128,128]" in plain.as_text() and "f32[2,4,128,128]" not in efficient.as_text()
    assert efficient.memory_analysis().temp_size_in_bytes < plain.memory_analysis().temp_size_in_bytes / 2


def test_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        with attention.memory_efficient_attention(block_size=0):
            pass


# --------------------------------------------------------------------------- losses


def _loss_batch(name: str) -> dict:
    batch = _batch(name)
    batch["labels"] = batch["input_ids"].at[1, 5:8].set(-100)
    return batch


def _losses(pm, model, batch: dict, chunk_size: int = 5):
    forward = _forward(pm, model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def plain(trainable):
        return T.causal_lm_loss(forward(trainable, **inputs), batch)

    def chunked(trainable):
        with losses.lm_head_inputs():
            outputs = forward(trainable, **inputs)
        return losses.chunked_causal_lm_loss(outputs, batch, chunk_size=chunk_size)

    trainable = pm.trainable_params()
    return (jax.jit(jax.value_and_grad(f))(trainable) for f in (plain, chunked))


@pytest.mark.parametrize("name", DECODERS + ("gptj",))
def test_chunked_loss_equals_plain(name):
    # tied embeddings (GPT-2, GPT-Neo, OPT, Gemma) train through modules_to_save of the embedding
    saved = {"llama": ["lm_head"], "gpt2": ["wte"], "opt": ["embed_tokens"]}.get(name)
    pm = _adapted(name, modules_to_save=saved)
    (value, grads), (value_c, grads_c) = _losses(pm, _model(name), _loss_batch(name))
    np.testing.assert_allclose(value_c, value, **TOL)
    _assert_trees_close(grads_c, grads)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads_c))


def test_chunked_loss_with_bat_lm_head_and_no_mask():
    pm = _adapted("llama", init_weights="bat", target_modules=["q_proj", "lm_head"], r=8)
    losses.check_plan(pm.plan)
    batch = {"input_ids": _batch("llama")["input_ids"]}
    (value, grads), (value_c, grads_c) = _losses(pm, _model("llama"), batch, chunk_size=64)
    np.testing.assert_allclose(value_c, value, **TOL)
    _assert_trees_close(grads_c, grads)


@pytest.mark.parametrize("argnums", [(0, 1, 2), (0,), (1, 2)])
def test_chunked_cross_entropy_gradients_equal_autodiff(argnums):
    # 13 rows in chunks of 4 (padding), a masked row, a bias; gradients only for the inputs asked for
    r = np.random.default_rng(0)
    hidden, kernel, bias = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((13, 6), (6, 11), (11,)))
    labels = jnp.asarray(r.integers(0, 11, 13))
    mask = jnp.arange(13) != 3

    def plain(h, k, b):
        losses_ = jax.nn.logsumexp(h @ k + b, -1) - jnp.take_along_axis(h @ k + b, labels[:, None], -1)[:, 0]
        return jnp.where(mask, losses_, 0.0).sum()

    def chunked(h, k, b):
        return losses.chunked_cross_entropy(h, k, labels, mask, b, chunk_size=4)[0]

    want = jax.value_and_grad(plain, argnums)(hidden, kernel, bias)
    got = jax.jit(jax.value_and_grad(chunked, argnums))(hidden, kernel, bias)
    np.testing.assert_allclose(got[0], want[0], **TOL)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, **TOL)
    np.testing.assert_allclose(jax.jit(chunked)(hidden, kernel, bias), want[0], **TOL)  # value only: no gradients
    assert float(losses.chunked_cross_entropy(hidden, kernel, labels, mask, bias, chunk_size=4)[1]) == 12


def test_chunked_cross_entropy_keeps_the_hidden_dtype():
    hidden = jnp.ones((8, 4), jnp.bfloat16)
    grad = jax.grad(lambda h: losses.chunked_cross_entropy(h, jnp.ones((4, 5)), jnp.zeros(8, jnp.int32),
                                                           jnp.ones(8, bool), chunk_size=3)[0])(hidden)
    assert grad.dtype == jnp.bfloat16 and grad.shape == (8, 4)
    np.testing.assert_allclose(grad.astype(np.float32), np.zeros((8, 4)), atol=1e-6)  # (softmax - onehot) @ ones = 0


def test_check_plan_rejects_additive_lm_head():
    pm = _adapted("llama", target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="bat"):
        losses.check_plan(pm.plan)


def test_chunked_loss_needs_captured_head():
    model, batch = _model("llama"), _loss_batch("llama")
    with pytest.raises(ValueError, match="lm_head_inputs"):
        losses.chunked_causal_lm_loss(model(batch["input_ids"]), batch)


def test_chunked_loss_drops_the_logits_buffer():
    model, pm = _llama(64, vocab=4096)
    batch = {"input_ids": jnp.ones((2, 64), jnp.int32)}
    forward = _forward(pm, model)

    def plain(trainable):
        return T.causal_lm_loss(forward(trainable, **batch), batch)

    def chunked(trainable):
        with losses.lm_head_inputs():
            outputs = forward(trainable, **batch)
        return losses.chunked_causal_lm_loss(outputs, batch, chunk_size=16)

    def compiled(f):
        return jax.jit(jax.grad(f)).lower(pm.trainable_params()).compile()

    a, b = compiled(plain), compiled(chunked)
    assert "f32[2,64,4096]" in a.as_text() and "f32[2,64,4096]" not in b.as_text()
    assert b.memory_analysis().temp_size_in_bytes < a.memory_analysis().temp_size_in_bytes / 2
