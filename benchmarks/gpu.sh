#!/usr/bin/env bash
# One-GPU benchmark: the JAX train step against the released code's PyTorch computation
# (benchmarks/torch_reference.py), ResNet50 and ViT at 224x224x96 (JAX bf16 against torch AMP,
# plus ResNet50 at batch 8 with bf16 + remat). About 6 minutes on an H100-class GPU. It writes
# one JSON object per case to $OUT/gpu_benchmarks.json (default benchmarks/results/, git-ignored)
# and prints a table with volumes/s, device memory, MFU and the JAX/PyTorch ratios.
#
# Set up a GPU host once (CUDA 12 driver):
#   python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt
#   .venv/bin/pip install -U "jax[cuda12]"                 # the CUDA build of JAX
#   .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu124   # CUDA torch
# then run:  PATH=.venv/bin:$PATH bash benchmarks/gpu.sh
#
# A host without network access can bring the pure-Python wheels it lacks (e.g. ml_collections,
# monai) in a .whl/ folder at the repository root (git-ignored): they are installed into a
# temporary site directory first. BENCH_SET=cpu BENCH_ONLY=small runs the same machinery on a
# CPU (a quick check of this script).
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
