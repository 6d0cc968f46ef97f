#!/usr/bin/env bash
# Configures and builds the CMake project (CPU sources) and checks that the library it makes loads.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
cmake -S . -B build/cmake -DPython3_EXECUTABLE="$(command -v python)" -DCMAKE_BUILD_TYPE=Release > build/cmake.log 2>&1 \
  || { cat build/cmake.log; exit 1; }
cmake --build build/cmake -j "$MAX_JOBS" 2>&1 | tail -2
LLMKERNELS_EXT_PATH="$(ls build/cmake/_C*.so)" python -c \
  "import llmkernels as l; assert l._ext.loaded, l._ext.load_error; print('cmake build loads:', l.extension_status())"
