#!/usr/bin/env bash
# The GPU benchmark in one prepared script that fits a short GPU slot (at most 8 minutes, compiles included).
#
# The lent GPU machines have no network and ship transformers 5 (no Flax models), so the few
# wheels this project needs travel with the working tree, in .whl/ (git-ignored):
#
#   1. here, where PyPI answers:       benchmarks/gpu.sh fetch
#   2. on the GPU machine (repo root, .whl carried; the device tool: carry=[".whl"]):
#                                       benchmarks/gpu.sh [extra run.py options]
#   3. anywhere, no GPU needed:         benchmarks/gpu.sh dry-run   (tiny shapes, the same code paths, ~3 min on 2 CPUs)
#
# Step 2 installs the wheels into /tmp/site (ahead of the image's packages on PYTHONPATH), records the
# stack (env.txt), checks cuDNN's flash attention against the model's own (attention-check.json), then runs
# the GPU suite (`run.py --device gpu`: the SmolLM2-135M shape at 8 x 2048 with generate, a ~1B Llama at
# 8 x 2048 and at 4 x 8192; float32 as TF32 and bfloat16 on both sides) with a deadline. Every case is
# written the moment its group is measured: gpu.json / gpu.md in $OUT (when set) are rewritten after each
# model and printed as the run goes, so a run cut short still returns what it measured. No process holds
# XLA's default 75% preallocation (they take turns on the GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(transformers==4.57.6 peft==0.21.2 huggingface_hub==0.36.0 tokenizers==0.22.1)
BUDGET="${GPU_BENCH_SECONDS:-470}"  # the whole script, compiles included
START=$SECONDS

if [[ "${1:-}" == "fetch" ]]; then
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    PY="${PYTHON:-.venv/bin/python}"
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    ls -la .whl
    exit 0
fi

if [[ "${1:-}" == "dry-run" ]]; then
    shift
    OUTDIR="${OUT:-/tmp/miss-jax-gpu-dry-run}"
    mkdir -p "$OUTDIR"
    PY="${PYTHON:-.venv/bin/python}"
    JAX_PLATFORMS=cpu "$PY" benchmarks/attention_check.py "$OUTDIR/attention-check.json" > "$OUTDIR/attention-check.log"
    exec "$PY" benchmarks/run.py --device gpu --quick --deadline "$BUDGET" --out "$OUTDIR/gpu.json" "$@"
fi

OUTDIR="${OUT:-benchmarks/results}"
mkdir -p "$OUTDIR"
ls .whl/*.whl > /dev/null 2>&1 || { echo "no wheels in .whl/: run 'benchmarks/gpu.sh fetch' here first and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export XLA_PYTHON_CLIENT_PREALLOCATE=false

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 - <<'PYEOF'
import jax, torch, transformers, peft, flax, optax
print("python", __import__("sys").version.split()[0])
print("jax", jax.__version__, jax.devices(), "default matmul precision:", jax.config.jax_default_matmul_precision)
print("torch", torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "",
      "cudnn", torch.backends.cudnn.version())
print("transformers", transformers.__version__, "peft", peft.__version__, "flax", flax.__version__, "optax", optax.__version__)
from transformers import FlaxLlamaForCausalLM  # noqa: F401  (transformers 4.x: Flax models present)
PYEOF
} 2>&1 | tee "$OUTDIR/env.txt"

echo "== cuDNN attention against the model's own ($((SECONDS - START)) s)"
[[ -n "${GPU_BENCH_SKIP_CHECK:-}" ]] || timeout 90 python3 benchmarks/attention_check.py "$OUTDIR/attention-check.json" > "$OUTDIR/attention-check.log" 2>&1 \
    || { tail -30 "$OUTDIR/attention-check.log"; echo "attention check failed; the suite runs anyway"; }
echo "== GPU suite ($((SECONDS - START)) s)"
LEFT=$((BUDGET - (SECONDS - START) - 10))
python3 benchmarks/run.py --device gpu --deadline "$LEFT" --out "$OUTDIR/gpu.json" "$@" 2>&1 | tee "$OUTDIR/gpu.log"
echo "== done in $((SECONDS - START)) s"
