#!/usr/bin/env bash
# The test command of README.md: every test, then each benchmark once at small sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
export DLSN_REQUIRE_EXTENSION=1  # a broken build fails the run instead of skipping tests
python -m pytest -q tests
DLSN_BENCH_QUICK=1 python -m pytest -q bench -p no:randomly
