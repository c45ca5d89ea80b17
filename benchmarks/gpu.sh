#!/usr/bin/env bash
# One-GPU benchmark: our JAX train step vs the released PyTorch computation, ResNet50 and ViT at
# 224x224x96 (bf16 vs AMP; plus ResNet50 batch 8 with bf16 + remat), about 6 minutes; writes
# $OUT/gpu_benchmarks.json (or benchmarks/results/) and prints the table with JAX/PyTorch ratios.
#
# The lent GPU machines (see /work/.library/device/KINDS.md) have JAX, PyTorch, flax, optax,
# orbax and transformers but not ml_collections or monai: carry their wheels. Once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0 monai==1.6.1
# then: device run, command "bash benchmarks/gpu.sh", carry [".whl"].
# BENCH_SET=cpu BENCH_ONLY=small runs the same machinery on a CPU (a quick check of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/medfinder_site .whl/*.whl \
    && export PYTHONPATH="/tmp/medfinder_site:${PYTHONPATH:-}"
fi
python3 - <<'PY'
import jax, torch
print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
timeout 500 python3 benchmarks/run_all.py --set "${BENCH_SET:-gpu}" --only "${BENCH_ONLY:-}" \
  --timeout 150 --out "$out/gpu_benchmarks.json"
status=$?
echo "results: $out/gpu_benchmarks.json (exit $status)"
exit $status
