#!/usr/bin/env bash
# One focused GPU iteration, for working on one or two op families in a device call of a few minutes:
# build (about 85 s on the H100 machine's 16 cores), the families' CUDA tests in parallel processes, their
# --quick benchmarks (the issues' target cases). The whole suite is scripts/gpu_check.sh.
#   bash scripts/gpu_iterate.sh OUTDIR FAMILY [FAMILY...]    FAMILY: attention | sliding_window | ternary | selective_scan
# Env: SKIP_BUILD=1 (dry runs), TEST_PATHS (test files instead of tests/FAMILY), TEST_TIMEOUT (default 150 s), BENCH_TIMEOUT (per family, whole seconds, default 120), PYTEST_ARGS (default "-m cuda": the CUDA and compiled-Triton cases), NO_BENCH=1.
# OUTDIR gets iterate.log (summary), build.log, tests.log (every failure), bench.log, the benchmark JSON.
set -uo pipefail
OUT="${1:?usage: scripts/gpu_iterate.sh OUTDIR FAMILY [FAMILY...]}"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/iterate.log"; }

log "build"
[ "${SKIP_BUILD:-0}" = 1 ] && echo "SKIP_BUILD=1: using the library already built" > "$OUT/build.log" ||
timeout "${BUILD_TIMEOUT:-240}" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
rc=$?; log "build rc=$rc"; [ "$rc" = 0 ] || { tail -30 "$OUT/build.log" >> "$OUT/iterate.log"; exit "$rc"; }
grep -i "spill\|warning" "$OUT/build.log" | grep -v "Py_LIMITED_API\|previous definition" | head -20 >> "$OUT/iterate.log"

paths=(); for fam in "$@"; do paths+=("tests/$fam"); done
# shellcheck disable=SC2206
[ -n "${TEST_PATHS:-}" ] && paths=($TEST_PATHS)
# xdist replaces a crashed worker and names the test it was running; without it, one process.
par=(); "$PY" -c "import xdist" 2> /dev/null && par=(-n "$(( $(nproc) < 12 ? $(nproc) : 12 ))")
log "tests ${paths[*]} ${PYTEST_ARGS:--m cuda}"
# shellcheck disable=SC2086
timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest -q -p no:cacheprovider "${par[@]}" ${PYTEST_ARGS:--m cuda} "${paths[@]}" > "$OUT/tests.log" 2>&1
log "tests rc=$? (124: timed out)"; grep -E "^(FAILED|ERROR)|passed|failed|skipped|crashed|node down" "$OUT/tests.log" | tail -25 | tee -a "$OUT/iterate.log"

[ "${NO_BENCH:-0}" = 1 ] && exit 0
# Also time the kernels still behind an off-by-default switch (bench/common.py: switched_kernels_enabled).
export LLMKERNELS_BENCH_SWITCHED=1
# --budget-s below the hard timeout (run.py then saves what it measured); results into a work folder and only the
# JSON into OUTDIR (the device tool returns at most 8 files: no plots).
BENCH_WORK="$(mktemp -d /tmp/gpu_iterate_bench.XXXXXX)"
bench_timeout=${BENCH_TIMEOUT:-120}  # (whole seconds)
bench_budget=$(( bench_timeout > 80 ? bench_timeout - 40 : bench_timeout / 2 ))
for fam in "$@"; do
  log "bench $fam"
  timeout "$bench_timeout" "$PY" bench/run.py --op "$fam" --quick --tag "$fam" --out "$BENCH_WORK" \
    --budget-s "$bench_budget" >> "$OUT/bench.log" 2>&1 || log "bench $fam rc=$?"
  cp "$BENCH_WORK"/*.json "$OUT/" 2> /dev/null
done
grep "^|\|^##" "$OUT/bench.log" | tee -a "$OUT/iterate.log" > /dev/null
log "done"
