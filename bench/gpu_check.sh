#!/usr/bin/env bash
# The one prepared check for a GPU machine (torch 2.11, triton 3.6, Python 3.12, no internet):
# build the extension with CUDA kernels, run every GPU test, run the GPU benchmark, and write the
# table to bench/results/gpu.md (and to $OUT when the device tool provides it). Budget: 8 minutes.
#   bash bench/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
results=${OUT:-bench/results}
mkdir -p "$results" bench/results
log="$results/gpu_check.log"
: > "$log"
say() { echo "== $* ($(date +%T))" | tee -a "$log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$log"

say "build (CUDA kernels for sm_90)"
export DLSN_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if ! timeout 300 pip install --no-deps --no-build-isolation -e . >> "$log" 2>&1; then
  tail -40 "$log"; echo "BUILD FAILED"; exit 1
fi
python - <<'PY' | tee -a "$log"
import torch, dlsn_kernels as dk
for op in ["sblsh_hash", "bucket_sort", "chunk_attention", "gla_attention", "attention_backward"]:
    print(op, [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"dlsn::{op}", k)])
print("backends on cuda:", dk.available_backends("cuda"))
PY

say "GPU tests"
timeout 240 python -m pytest -q -rs tests/test_cuda.py tests/test_triton.py tests/test_ops_cpu.py 2>&1 | tail -25 | tee -a "$log"

say "accuracy vs float64 reference"
for backend in cuda triton; do
  timeout 60 python -m bench.accuracy --backend "$backend" --device cuda --dtypes float32 float16 bfloat16 2>&1 \
    | tail -6 | tee -a "$log"
done

say "GPU benchmark"
timeout 180 python -m bench.gpu_bench --out "$results/gpu.md" 2>&1 | tail -30 | tee -a "$log"
[ "$results" != bench/results ] && cp "$results/gpu.md" bench/results/gpu.md 2>/dev/null
say "done"
