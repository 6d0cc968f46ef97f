#!/usr/bin/env bash
# GPU one-shot: build in place, run the whole test suite (CUDA tests included), run the benchmarks, and
# write the log, the results JSON and a markdown table under OUTDIR. For a machine with a GPU and no
# network where python3 already has torch, triton, pybind11, ninja, pytest (and pytest-benchmark).
#   bash scripts/gpu_check.sh OUTDIR [--full]      (about 10 minutes on one H100 with 16 cores; --full: every bench case)
# Phases are time-boxed (BUILD_TIMEOUT=240, TEST_TIMEOUT=180 s, benchmarks: what is left of 570 s) so the whole run
# fits one 10-minute device call and a hang in one phase still leaves the others' output.
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR [--full]}"
MODE="${2:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
script_start=$(date +%s)
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/gpu_check.log"; }

log "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; nvcc --version | tail -1; } 2>&1 | tee -a "$OUT/gpu_check.log"

log "build (setup.py build_ext --inplace, arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
start=$(date +%s)
timeout "${BUILD_TIMEOUT:-240}" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
build_rc=$?
log "build rc=$build_rc in $(( $(date +%s) - start ))s"
tail -5 "$OUT/build.log" | tee -a "$OUT/gpu_check.log"
if [ "$build_rc" != 0 ]; then
  # Tests against a stale library would report on code that was not built: stop here.
  tail -40 "$OUT/build.log" >> "$OUT/gpu_check.log"
  log "build failed (rc=$build_rc; 124 = timed out after ${BUILD_TIMEOUT:-240}s): see build.log"
  exit "$build_rc"
fi
"$PY" -m llmkernels info 2>&1 | tee -a "$OUT/gpu_check.log"

log "tests (parallel pytest processes: Triton JIT compiles in parallel, a kernel fault stays in its job)"
# Sub-processes see TEST_TIMEOUT too: it is the runner's deadline, after which unfinished jobs are killed.
TEST_TIMEOUT="${TEST_TIMEOUT:-180}" "$PY" scripts/run_tests_parallel.py "$OUT/tests" tests > "$OUT/tests.log" 2>&1
test_rc=$?
tail -60 "$OUT/tests.log" | tee -a "$OUT/gpu_check.log"
log "tests rc=$test_rc"

log "benchmarks"
# Default: --quick, which on a GPU is exactly the issues' target cases; --full: every case (does not fit one
# 10-minute call: use it per op in a later call). One process per op with its own share of BENCH_TIMEOUT, so a
# slow op (FlexAttention compiles) cannot starve the others; cheap ops first, each writes its own JSON.
bench_rc=0
# What is left of one 10-minute device call (570 s, keeping a margin), unless BENCH_TIMEOUT says otherwise.
left=$(( 570 - ($(date +%s) - script_start) ))
budget=${BENCH_TIMEOUT:-$(( left < 120 ? 120 : left ))}
for op in ternary selective_scan sliding_window attention; do
  case "$op" in attention) share=$(( budget / 2 ));; *) share=$(( budget / 6 ));; esac
  # --budget-s stops starting new cases (the op still saves what it measured); timeout is the hard stop.
  timeout $(( share + 30 )) "$PY" bench/run.py --op "$op" $([ "$MODE" = "--full" ] || echo --quick) --tag "$op" \
    --budget-s "$share" --out "$OUT" >> "$OUT/bench.log" 2>&1 || { rc=$?; log "bench $op rc=$rc"; bench_rc=$rc; }
done
grep -v '^\[' "$OUT/bench.log" > "$OUT/bench_tables.md" || true
tail -60 "$OUT/bench.log" | tee -a "$OUT/gpu_check.log"
# Auto-dispatch on this GPU: whichever of the CUDA and Triton backends measured faster, per op.
if ls "$OUT"/*.json > /dev/null 2>&1; then
  "$PY" bench/make_dispatch_table.py "$OUT"/*.json >> "$OUT/gpu_check.log" 2>&1 && cp llmkernels/cuda_dispatch_table.json "$OUT/"
fi
log "bench rc=$bench_rc; results in $OUT (commit bench/results/ and llmkernels/cuda_dispatch_table.json)"
exit $(( build_rc != 0 ? build_rc : test_rc ))
