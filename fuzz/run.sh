#!/usr/bin/env bash
# Runs each libFuzzer target for <seconds> on a scratch copy of its seed corpus.
#   cmake -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DATTNKIT_BUILD_FUZZERS=ON \
#         -DATTNKIT_BUILD_TESTS=OFF -DATTNKIT_BUILD_BENCHMARKS=OFF -DATTNKIT_BUILD_EXAMPLES=OFF
#   ninja -C build-fuzz
#   fuzz/run.sh build-fuzz 60                       # CI runs 10 s per target
#   fuzz/run.sh build-fuzz 600                      # a deeper run: 10 minutes per target
#   ATTNKIT_FUZZ_TARGETS="recipes op_input" fuzz/run.sh build-fuzz 600   # some targets only
# Targets: safetensors, config, recipes (every model type's config; small ones built and run),
# op_input (attnkit-op's input reader), tokenizer, tokenizer_json. The corpus grows in a scratch
# copy; the final stats (executions, cov/ft) are printed per target.
# Exits non-zero if any target crashes; crash inputs are kept in <build-dir>/fuzz/artifacts/<target>/.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 <build-dir> <seconds>" >&2
  exit 2
fi
build=$(cd "$1" && pwd)
seconds=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

status=0
for target in ${ATTNKIT_FUZZ_TARGETS:-safetensors config recipes op_input tokenizer tokenizer_json}; do
  exe="$build/fuzz/attnkit-fuzz-$target"
  if [[ ! -x "$exe" ]]; then
    echo "missing $exe (configure with -DCMAKE_CXX_COMPILER=clang++ -DATTNKIT_BUILD_FUZZERS=ON)" >&2
    exit 2
  fi
  cp -r "$here/corpus/$target" "$scratch/$target"
  artifacts="$build/fuzz/artifacts/$target"
  mkdir -p "$artifacts"
  echo "== attnkit-fuzz-$target for ${seconds}s"
  if "$exe" -max_total_time="$seconds" -dict="$here/$target.dict" -artifact_prefix="$artifacts/" \
      -print_final_stats=1 "$scratch/$target" 2>"$scratch/$target.log"; then
    grep -E "^stat::(number_of_executed_units|peak_rss_mb)|^Done" "$scratch/$target.log" || true
    grep -E "^#[0-9]+.*(DONE|cov:)" "$scratch/$target.log" | tail -n 1 || true
  else
    tail -n 60 "$scratch/$target.log" >&2
    echo "attnkit-fuzz-$target FAILED; crash input in $artifacts" >&2
    status=1
  fi
done
exit $status
