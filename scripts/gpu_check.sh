#!/usr/bin/env bash
# GPU one-shot: build in place, run the whole test suite (CUDA tests included), run the benchmarks. For a
# machine with a GPU and no network where python3 already has torch, triton, pybind11, ninja, pytest.
#   bash scripts/gpu_check.sh OUTDIR [--full]     (about 10 minutes on one H100 with 16 cores)
# Phases are time-boxed (BUILD_TIMEOUT=240 s, TEST_TIMEOUT=240 s, benchmarks: what is left of 570 s) so the
# whole run fits one 10-minute device call and a hang in one phase still leaves the others' output.
# --full: every benchmark case (does not fit one call with the rest: use `bench/run.py --op NAME` alone).
#
# The device tool brings back at most 8 files from OUTDIR, so everything is written to a work folder and OUTDIR
# gets: gpu_check.log (the summary), tests.log (every failure), bench_tables.md, <device>-<date>.json (all
# benchmark rows, for bench/results/), cuda_dispatch_table.json, build.log, and gpu_check.tar.gz (all of it:
# per-job test logs and junit XML, per-op bench logs and JSON).
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR [--full]}"
MODE="${2:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
script_start=$(date +%s)
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$WORK/gpu_check.log"; }

finish() {  # whatever happened: the summary files and one archive of everything into OUTDIR
  for f in gpu_check.log tests.log bench_tables.md build.log; do [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"; done
  [ -f llmkernels/cuda_dispatch_table.json ] && cp llmkernels/cuda_dispatch_table.json "$OUT/"
  ls "$WORK"/merged/*.json > /dev/null 2>&1 && cp "$WORK"/merged/*.json "$OUT/"
  tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" . 2> /dev/null
}
trap finish EXIT

log "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; nvcc --version | tail -1; } 2>&1 | tee -a "$WORK/gpu_check.log"

log "build (setup.py build_ext --inplace, arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
start=$(date +%s)
timeout "${BUILD_TIMEOUT:-240}" "$PY" setup.py build_ext --inplace > "$WORK/build.log" 2>&1
build_rc=$?
log "build rc=$build_rc in $(( $(date +%s) - start ))s"
tail -5 "$WORK/build.log" | tee -a "$WORK/gpu_check.log"
if [ "$build_rc" != 0 ]; then
  # Tests against a stale library would report on code that was not built: stop here.
  tail -40 "$WORK/build.log" >> "$WORK/gpu_check.log"
  log "build failed (rc=$build_rc; 124 = timed out after ${BUILD_TIMEOUT:-240}s): see build.log"
  exit "$build_rc"
fi
"$PY" -m llmkernels info 2>&1 | tee -a "$WORK/gpu_check.log"

log "tests (parallel pytest processes: Triton JIT compiles in parallel, a kernel fault stays in its job)"
# TEST_TIMEOUT is the runner's deadline, after which unfinished jobs are killed and reported.
TEST_TIMEOUT="${TEST_TIMEOUT:-240}" "$PY" scripts/run_tests_parallel.py "$WORK/tests" tests > "$WORK/tests.log" 2>&1
test_rc=$?
tail -60 "$WORK/tests.log" | tee -a "$WORK/gpu_check.log"
log "tests rc=$test_rc"

log "benchmarks"
# One process per op with its own share of what is left of one 10-minute device call (570 s, keeping a
# margin), so a slow op (FlexAttention compiles) cannot starve the others; cheap ops first. On a GPU, --quick is
# exactly the issues' target cases. --budget-s stops starting new cases (the op still saves what it measured);
# timeout is the hard stop.
bench_rc=0
left=$(( 570 - ($(date +%s) - script_start) ))
# Each op's hard timeout is its share + 30 s (a case in flight, imports, saving), cut to what is left of the call
# (585 s, before the device tool's 600): the shares sum to what is left less 4 x 30 s; an op with under 20 s left
# is skipped. A killed script returns nothing, so OUTDIR is refreshed after every op.
budget=${BENCH_TIMEOUT:-$(( left - 130 < 80 ? 80 : left - 130 ))}
mkdir -p "$WORK/bench"
for op in ternary selective_scan sliding_window attention; do
  case "$op" in attention) share=$(( budget / 2 ));; *) share=$(( budget / 6 ));; esac
  share=$(( share < 1 ? 1 : share ))
  rem=$(( 585 - ($(date +%s) - script_start) ))
  if [ "$rem" -lt 20 ]; then log "bench $op skipped: ${rem}s left of the call"; continue; fi
  hard=$(( share + 30 < rem ? share + 30 : rem ))
  share=$(( share < hard - 10 ? share : hard - 10 ))
  timeout "$hard" "$PY" bench/run.py --op "$op" $([ "$MODE" = "--full" ] || echo --quick) --tag "$op" \
    --budget-s "$share" --out "$WORK/bench" >> "$WORK/bench.log" 2>&1 || { rc=$?; log "bench $op rc=$rc"; bench_rc=$rc; }
  finish
done
grep -v '^\[' "$WORK/bench.log" > "$WORK/bench_tables.md" || true
tail -60 "$WORK/bench.log" | tee -a "$WORK/gpu_check.log"
if ls "$WORK"/bench/*.json > /dev/null 2>&1; then
  mkdir -p "$WORK/merged"
  "$PY" bench/merge_results.py "$WORK"/bench/*.json --out-dir "$WORK/merged" 2>&1 | tee -a "$WORK/gpu_check.log"
  # Auto-dispatch on this GPU: whichever of the CUDA and Triton backends measured faster, per op.
  "$PY" bench/make_dispatch_table.py "$WORK"/bench/*.json 2>&1 | tee -a "$WORK/gpu_check.log"
fi
log "bench rc=$bench_rc; commit the <device>-<date>.json under bench/results/ and llmkernels/cuda_dispatch_table.json"
exit $(( build_rc != 0 ? build_rc : test_rc ))
