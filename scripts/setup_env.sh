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
  # (the filter drops pip's notes about this machine's local package mirrors; pipefail keeps pip's status)
  python -m pip install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -d /usr/lib/ccache ]; then export PATH="/usr/lib/ccache:$PATH"; fi
# Paths under the checkout (the venv included) hash as relative, so clones at other paths share the cache.
export CCACHE_BASEDIR="$ROOT" CCACHE_NOHASHDIR=1
if command -v ccache >/dev/null 2>&1 && [ -n "${CUDA_HOME:-}" ]; then export PYTORCH_NVCC="ccache $CUDA_HOME/bin/nvcc"; fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

echo "== building llmkernels (CUDA_HOME=${CUDA_HOME:-none}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}, MAX_JOBS=$MAX_JOBS)"
start=$(date +%s)
# build_ext --inplace keeps build/ between runs, so ninja recompiles only what changed (pip's editable
# build would start from a fresh temporary folder every time). A .pth file puts the checkout on sys.path.
python setup.py -q build_ext --inplace > build.log 2>&1 \
  || { tail -40 build.log; echo "build failed: full log in build.log" >&2; exit 1; }
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$ROOT" > "$site/llmkernels-checkout.pth"
echo "== built in $(( $(date +%s) - start ))s (log: build.log)"
