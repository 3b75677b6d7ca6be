#!/usr/bin/env bash
# The one prepared check for a GPU machine (torch 2.11, triton 3.6, Python 3.12, no internet):
# build the extension with CUDA kernels, run every GPU test, the accuracy table, the GPU benchmark
# and a short GPU training run. Logs and bench/results/gpu.md go to $OUT when the device tool
# provides it (else bench/results). Expected about 5 minutes; each step has its own timeout so a
# hang costs one step, not the rest.
#   bash bench/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
results=${OUT:-bench/results}
mkdir -p "$results" bench/results
log="$results/gpu_check.log"
: > "$log"
export PYTHONUNBUFFERED=1
if ! command -v python > /dev/null; then  # images that only have python3
  mkdir -p /tmp/dlsn_pyshim && ln -sf "$(command -v python3)" /tmp/dlsn_pyshim/python
  export PATH=/tmp/dlsn_pyshim:$PATH
fi
say() { echo "== $* ($(date +%T))" | tee -a "$log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
python -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'numpy', numpy.__version__)" | tee -a "$log"
nproc | sed 's/^/cores: /' | tee -a "$log"

# Compiling is CPU work and the Triton tests need no extension: run both at once.
say "build (CUDA kernels for sm_90) in the background; Triton tests meanwhile"
(
  export DLSN_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-12}
  timeout 280 python setup.py build_ext --inplace > "$results/build.log" 2>&1
  echo $? > /tmp/dlsn_build_rc
) &
build_job=$!
# Fixed block sizes in the tests: autotuning every small shape is what made them slow (240 s were not enough).
DLSN_TRITON_AUTOTUNE=0 timeout 240 python -m pytest -q -rs -p no:cacheprovider -n 6 tests/test_triton.py \
  tests/test_triton_ops.py \
  > "$results/tests_triton.log" 2>&1
echo "triton tests rc=$?: $(tail -1 "$results/tests_triton.log")" | tee -a "$log"
wait "$build_job"
build_rc=$(cat /tmp/dlsn_build_rc 2>/dev/null || echo missing)
say "build rc=$build_rc"
if [ "$build_rc" != 0 ]; then
  grep -E "error|Error" "$results/build.log" | head -20 | tee -a "$log"
fi
python - <<'PY' 2>&1 | tee -a "$log"
import torch, dlsn_kernels as dk
for op in ["sblsh_hash", "bucket_sort", "chunk_attention", "gla_attention", "attention_backward"]:
    print(op, [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"dlsn::{op}", k)])
print("backends on cuda:", dk.available_backends("cuda"))
PY

say "CUDA tests"
# test_models' GPU case is selected with -k, so it runs in its own pytest (the -k would filter test_cuda too).
DLSN_REQUIRE_EXTENSION=1 timeout 90 python -m pytest -q -rs -p no:cacheprovider -n 8 tests/test_cuda.py \
  > "$results/tests_cuda.log" 2>&1
echo "cuda tests rc=$?: $(tail -1 "$results/tests_cuda.log")" | tee -a "$log"
DLSN_REQUIRE_EXTENSION=1 timeout 90 python -m pytest -q -rs -p no:cacheprovider tests/test_models.py \
  -k compiled_backend >> "$results/tests_cuda.log" 2>&1
echo "model tests rc=$?: $(tail -1 "$results/tests_cuda.log")" | tee -a "$log"
say "bad-input calls of the CUDA ops, one process each (a crash here was seen once)"
timeout 120 python -m bench.gpu_error_paths 2>&1 | tee -a "$log"
grep -E "^(FAILED|ERROR)" "$results/tests_cuda.log" "$results/tests_triton.log" | head -30 | tee -a "$log"
skip=()
if grep -qiE "illegal memory access|unspecified launch failure|misaligned address" "$results/tests_cuda.log" \
   || [ "$build_rc" != 0 ]; then
  skip=(--skip "fused cuda")
  echo "fused cuda left out of the benchmark" | tee -a "$log"
fi

say "accuracy vs float64 reference"
for backend in triton cuda; do
  DLSN_TRITON_AUTOTUNE=0 timeout 90 python -m bench.accuracy --backend "$backend" --device cuda --dtypes float32 float16 bfloat16 \
    >> "$results/accuracy.log" 2>&1
  echo "$backend rc=$?" >> "$results/accuracy.log"
done
tail -20 "$results/accuracy.log" | tee -a "$log"

say "GPU benchmark"
timeout 150 python -m bench.gpu_bench --out "$results/gpu.md" "${skip[@]}" > "$results/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$log"
cat "$results/gpu.md" 2>/dev/null | tee -a "$log" || tail -20 "$results/bench.log" | tee -a "$log"

say "GPU training smoke run (bf16 autocast, 300 steps)"
timeout 90 python -m dlsn.train --device cuda --max-steps 300 --val-every 150 --out /tmp/dlsn_gpu_run \
  --no-progress > "$results/train.log" 2>&1
echo "train rc=$?" | tee -a "$log"
tail -12 "$results/train.log" | tee -a "$log"
[ "$results" != bench/results ] && cp "$results/gpu.md" bench/results/gpu.md 2>/dev/null
say "done"
