"""Test session set-up (tests and doctests): 8 simulated CPU devices (sharding tests), offline hub, quiet
transformers. At the root so that it runs before anything imports jax. `miss_jax.quantized` needs qwix (the
modern environment, `make test-modern`): elsewhere its doctests are not collected."""

import importlib.util
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

collect_ignore = [] if importlib.util.find_spec("qwix") else ["miss_jax/quantized.py"]
