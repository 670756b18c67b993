#!/usr/bin/env bash
# The benchmark suite (benchmarks/run.py) on a GPU machine, in one prepared script.
#
# The lent GPU machines have no network and ship transformers 5 (no Flax models), so the few
# wheels this project needs travel with the working tree, in .whl/ (git-ignored):
#
#   1. here, where PyPI answers:       benchmarks/gpu.sh fetch
#   2. on the GPU machine (repo root, .whl carried; the device tool: carry=[".whl"]):
#                                       benchmarks/gpu.sh [extra run.py options]
#
# Step 2 installs the wheels into /tmp/site (ahead of the image's packages on PYTHONPATH), prints
# the stack, runs a --quick smoke run, then the full suite with --device gpu. Results go to
# $OUT (when set: gpu.json, gpu.md, env.txt, logs) and to benchmarks/results/gpu.json. JAX uses the
# image's jax (CUDA plugin) and torch its CUDA torch; float32 matmuls run as TF32 on both sides.
# Budget: under 10 minutes (each run is bounded by `timeout`); the full suite includes the generate cases
# and the long-sequence train step (llama-long, batch 2 x 2048).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(transformers==4.57.6 peft==0.21.2 huggingface_hub==0.36.0 tokenizers==0.22.1)

if [[ "${1:-}" == "fetch" ]]; then
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    PY="${PYTHON:-.venv/bin/python}"
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    ls -la .whl
    exit 0
fi

OUTDIR="${OUT:-benchmarks/results}"
mkdir -p "$OUTDIR" benchmarks/results
ls .whl/*.whl > /dev/null 2>&1 || { echo "no wheels in .whl/: run 'benchmarks/gpu.sh fetch' here first and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 - <<'EOF'
import jax, torch, transformers, peft, flax, optax
print("python", __import__("sys").version.split()[0])
print("jax", jax.__version__, jax.devices())
print("torch", torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("transformers", transformers.__version__, "peft", peft.__version__, "flax", flax.__version__, "optax", optax.__version__)
from transformers import FlaxBertForSequenceClassification  # noqa: F401  (transformers 4.x: Flax models present)
EOF
} 2>&1 | tee "$OUTDIR/env.txt"

echo "== smoke run (--quick)"
timeout 150 python3 benchmarks/run.py --device gpu --quick --out "$OUTDIR/gpu-quick.json" > "$OUTDIR/gpu-quick.log" 2>&1 \
    || { tail -40 "$OUTDIR/gpu-quick.log"; exit 1; }
echo "== full suite"
timeout 400 python3 benchmarks/run.py --device gpu --out "$OUTDIR/gpu.json" "$@" 2>&1 | tee "$OUTDIR/gpu.log"
[[ "$OUTDIR" == benchmarks/results ]] || cp "$OUTDIR/gpu.json" "$OUTDIR/gpu.md" benchmarks/results/
