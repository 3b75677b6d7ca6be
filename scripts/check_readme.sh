#!/usr/bin/env bash
# README.md's commands, as a newcomer runs them: a fresh clone of this repository's HEAD in a temporary
# folder, a new virtual environment, and none of the caller's environment variables (no MAX_JOBS,
# TORCH_CUDA_ARCH_LIST, DLSN_*...). The commands are read from README.md, so what runs is what it says:
#   1. the Install block's `pip install` line
#   2. the test command (the first build, then scripts/test.sh)
#   3. the main job's command: its install must not recompile anything; the 9-minute training is replaced
#      by a 20-step run, which must end with the steps/s line README compares machines by.
# Fails if any of them fails. With DLSN_WITH_CUDA=1 in the caller's environment it also fails when the
# build has no CUDA kernels (the README build decides on its own, so this checks that it chose CUDA).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
expect_cuda="${DLSN_WITH_CUDA:-}"
work="$(mktemp -d "${TMPDIR:-/tmp}/dlsn-readme.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# The fenced bash block lines of one README section ("## Install", "## The two commands"), comments dropped.
section_commands() {
  awk -v want="$1" '
    /^## / { in_section = ($0 == want) }
    in_section && /^```bash/ { in_block = 1; next }
    in_block && /^```/ { in_block = 0; next }
    in_section && in_block { sub(/[ \t]+#.*$/, ""); if ($0 != "") print }
  ' "$repo/README.md"
}
mapfile -t install_lines < <(section_commands "## Install")
mapfile -t commands < <(section_commands "## The two commands")
if [ "${#install_lines[@]}" -lt 1 ] || [ "${#commands[@]}" -ne 2 ]; then
  echo "check_readme: expected an Install block and two commands in README.md" >&2
  exit 1
fi
main_command="${commands[0]}"
test_command="${commands[1]}"
case "$main_command" in
  *" && python -m dlsn.train") ;;
  *) echo "check_readme: the main job's command no longer ends in 'python -m dlsn.train': $main_command" >&2; exit 1 ;;
esac
main_install="${main_command% && python -m dlsn.train}"

git clone --quiet "$repo" "$work/clone"
python -m venv "$work/venv"

# A clean environment: the venv first on PATH, the usual system folders after it, HOME for pip's cache.
# Each command's output goes to a log; the end of it is shown (all of the last 200 lines on failure).
run_clean() {
  local label="$1" command="$2" start status log
  log="$work/log.$(( ++step ))"
  echo "+ [$label] $command"
  start=$(date +%s)
  status=0
  env -i HOME="$HOME" PATH="$work/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    VIRTUAL_ENV="$work/venv" bash -c "cd '$work/clone' && $command" >"$log" 2>&1 || status=$?
  tail -n "$([ "$status" -eq 0 ] && echo "${TAIL_LINES:-30}" || echo 200)" "$log" | sed 's/^/    /'
  # every pytest run's count line, also those the tail cut off (the record of what ran)
  grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$log" | sed 's/^/  [pytest] /' || true
  echo "  [$label] $(( $(date +%s) - start )) s, exit $status"
  return "$status"
}
step=0

for line in "${install_lines[@]}"; do
  run_clean install "$line"
done
run_clean "test command" "$test_command"

stamp="$work/stamp"
touch "$stamp"
run_clean "main job: install" "$main_install"
recompiled=$(find "$work/clone/build" -name '*.o' -newer "$stamp" | wc -l)
if [ "$recompiled" -ne 0 ]; then
  echo "check_readme: rerunning the install recompiled $recompiled object files although nothing changed" >&2
  exit 1
fi
run_clean "main job: 20 steps" "python -m dlsn.train --max-steps 20 --out '$work/run' --no-progress"
# README compares machines by the speed the main job prints at its end.
if ! grep -Eq "^trained 20 steps .* [0-9.]+ steps/s$" "$work/log.$step"; then
  echo "check_readme: the main job's report has no 'trained N steps ... X steps/s' line (README quotes it)" >&2
  exit 1
fi

if [ "$expect_cuda" = "1" ]; then
  run_clean "CUDA kernels built" "python -c \"import torch, dlsn_kernels; \
assert torch._C._dispatch_has_kernel_for_dispatch_key('dlsn::chunk_attention', 'CUDA'), 'no CUDA kernels'\""
fi
echo "check_readme: README's commands passed in a fresh clone and virtual environment"
