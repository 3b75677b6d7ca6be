#!/usr/bin/env bash
# One device call of at most 6 minutes on a lent GPU (torch 2.11, Triton 3.6, no internet), build included:
# build the extension (CUDA kernels for this GPU's architecture: A100, H100, H200, ...) while the Triton GPU tests
# run, the CUDA tests, then
# bench.gpu_session (correctness smoke test, determinism, the timing table with FlexAttention, the per-pass
# backend choice, a profile), then the bad-input calls of the CUDA ops under compute-sanitizer.
# Budget, each step with its own timeout: Triton tests 85 s (the build, 35 s measured, runs meanwhile),
# CUDA tests 45 s, gpu_session 200 s (flex's compiles and rows at most 80 of them, --flex-budget-s; the
# session starts no new row after 175 s, --deadline-s, and still writes its report), sanitizer 30 s: 360 s.
# Results go to $OUT (the device tool brings them back) and bench/results/gpu.md; the check's cache (docs/check.md) is copied to $OUT.
#   bash bench/gpu_session.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
results=${OUT:-bench/results/session}
mkdir -p "$results"
log="$results/session.log"
: > "$log"
export PYTHONUNBUFFERED=1
if ! command -v python > /dev/null; then
  mkdir -p /tmp/dlsn_pyshim && ln -sf "$(command -v python3)" /tmp/dlsn_pyshim/python
  export PATH=/tmp/dlsn_pyshim:$PATH
fi
say() { echo "== $* ($(date +%T))" | tee -a "$log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee -a "$log"
# this card's capability ("8.6", "9.0"): the CUDA build targets it, and every table of the report names it
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
cap=${cap:-9.0}
say "arch sm_${cap/./}"

say "build in the background; Triton GPU tests meanwhile"
(
  export DLSN_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} MAX_JOBS=${MAX_JOBS:-12}
  timeout 150 python setup.py build_ext --inplace > "$results/build.log" 2>&1
  echo $? > /tmp/dlsn_build_rc
) &
build_job=$!
timeout 85 python -m pytest -q -p no:cacheprovider -n 8 tests/test_triton.py > "$results/tests_triton.log" 2>&1
echo "triton tests rc=$?: $(tail -1 "$results/tests_triton.log")" | tee -a "$log"
wait "$build_job"
say "build rc=$(cat /tmp/dlsn_build_rc 2>/dev/null || echo missing)"
backends=(triton cuda flex)
if [ "$(cat /tmp/dlsn_build_rc 2>/dev/null)" = 0 ]; then
  DLSN_REQUIRE_EXTENSION=1 timeout 45 python -m pytest -q -p no:cacheprovider -n 8 tests/test_cuda.py tests/test_public_api.py \
    > "$results/tests_cuda.log" 2>&1
  echo "cuda tests rc=$?: $(tail -1 "$results/tests_cuda.log")" | tee -a "$log"
  grep -iqE "illegal memory access|unspecified launch failure|misaligned address" "$results/tests_cuda.log" \
    && backends=(triton flex)
else
  backends=(triton flex)
fi
grep -hE "^(FAILED|ERROR)" "$results"/tests_*.log | head -20 | tee -a "$log"

say "bench.gpu_session"
timeout 200 python -m bench.gpu_session --out "$results" --backends "${backends[@]}" --deadline-s 175 \
  --flex-budget-s 80 > "$results/gpu_session.out" 2>&1
echo "gpu_session rc=$?" | tee -a "$log"
tail -60 "$results/gpu_session.out" | tee -a "$log"

if [ "${backends[*]}" = "triton cuda flex" ] && command -v compute-sanitizer > /dev/null; then
  say "bad-input calls of the CUDA ops under compute-sanitizer"
  timeout 30 compute-sanitizer --tool memcheck --print-limit 5 python -m bench.gpu_error_paths 2>&1 \
    | tail -40 | tee -a "$log"
fi
cp "$results/session.md" bench/results/gpu.md 2>/dev/null
cp "${XDG_CACHE_HOME:-$HOME/.cache}/dlsn_kernels/check.json" "$results/check_cache.json" 2>/dev/null
say "done"
