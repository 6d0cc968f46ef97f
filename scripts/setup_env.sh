#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/demo.sh: makes .venv (once), installs the pinned requirements
# and builds the extension in place (incremental: ninja rebuilds only what changed).
#   PYTHON=python3.11        interpreter for the venv
#   TORCH_CUDA_ARCH_LIST     CUDA targets (default "8.0;9.0a"); LLMKERNELS_BUILD_CUDA=0 skips CUDA
#   LLMKERNELS_SKIP_INSTALL=1  reuse the environment as it is (no pip)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

if [ "${LLMKERNELS_SKIP_INSTALL:-0}" != "1" ]; then
  echo "== installing requirements (torch pinned in requirements-dev.txt)"
  python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -d /usr/lib/ccache ]; then export PATH="/usr/lib/ccache:$PATH"; fi
# Paths under the checkout (the venv included) hash as relative, so clones at other paths share the cache.
export CCACHE_BASEDIR="$ROOT"
if command -v ccache >/dev/null 2>&1 && [ -n "${CUDA_HOME:-}" ]; then export PYTORCH_NVCC="ccache $CUDA_HOME/bin/nvcc"; fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

echo "== building llmkernels (CUDA_HOME=${CUDA_HOME:-none}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}, MAX_JOBS=$MAX_JOBS)"
start=$(date +%s)
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . \
  || { echo "build failed; rerun with: pip install -v --no-build-isolation -e ." >&2; exit 1; }
echo "== built in $(( $(date +%s) - start ))s"
