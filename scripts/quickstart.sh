#!/usr/bin/env bash
# The README's first command: install the packages, build (Release, native ISA), run the
# example Qwen3 forward pass on the built-in default model. Extra arguments go to the example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
LAUNCHER=(); command -v ccache >/dev/null && LAUNCHER=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "${LAUNCHER[@]}"
cmake --build build -j "$(nproc)"
build/examples/attnkit-qwen3 "$@"
