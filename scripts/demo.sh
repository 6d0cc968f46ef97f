#!/usr/bin/env bash
# The main job, from a fresh machine: venv, pinned torch, build, then `llmkernels info`, the demo (three
# small decoders, llmkernels against pure PyTorch) and a quick benchmark on whatever hardware is here.
#   bash scripts/demo.sh [--tokens N]
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
python -m llmkernels info
python -m llmkernels demo "$@"
python -m llmkernels bench --quick
