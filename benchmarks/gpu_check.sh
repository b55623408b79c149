#!/usr/bin/env bash
# Check a GPU machine end to end in one call, within 9 minutes:
#
#     bash benchmarks/gpu_check.sh OUT_DIR [--skip-tests] [--budget SECONDS]
#
# Installs this checkout offline (no package index needed: torch, triton, pytest,
# pytest-benchmark, ninja and matplotlib must be there already), then runs
# `python -m fastattn.tools.gpu_check`: versions and GPU, the device's peaks, the C++/CUDA
# extension build, the test suite on CUDA, the benchmarks of every registered op (results
# JSON + PNG into OUT_DIR) and a summary table, printed last. The install counts against
# the budget.
set -euo pipefail

out="${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--skip-tests] [--budget SECONDS]}"
shift
budget=540
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) budget="${2:?--budget needs a number of seconds}"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done

cd "$(dirname "$0")/.."
mkdir -p "$out"
out="$(cd "$out" && pwd)"
start=$(date +%s)
echo "== install (pip install --no-deps --no-build-isolation -e .)"
if ! python -m pip install --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then
    tail -n 20 "$out/install.log"
    echo "install failed: see $out/install.log" >&2
    exit 1
fi
left=$(( budget - ($(date +%s) - start) ))
exec python -m fastattn.tools.gpu_check "$out" --budget "$left" "${args[@]+"${args[@]}"}"
