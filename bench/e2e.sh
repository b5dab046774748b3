#!/usr/bin/env bash
# End-to-end benchmark of the distributed pipeline (not a test): on a generated Llama-shaped BF16
# model of SIZE (default 1GB) it measures, in one run,
#   - `cp -r` of the model directory (the baseline: reading and writing the same bytes),
#   - `shardpress run` (local coordinator + N worker processes) with 1 and 2 workers,
#   - peak RSS of a standalone coordinator and of one worker process (GNU time).
# Usage: bash bench/e2e.sh [SIZE] [RECIPE] [FORMAT]   (builds the release binary first; FORMAT
# is safetensors, compressed-tensors or spz, default safetensors; the output size is printed)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1GB}
recipe=${2:-int4-g128}
format=${3:-safetensors}
cargo build --release --bin shardpress >&2
bin=$PWD/target/release/shardpress
work=$(mktemp -d /tmp/shardpress-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

"$bin" gen-model --out "$work/model" --size "$size" >&2
bytes=$(du -sb "$work/model" | cut -f1)
mb=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1e6 }')
now() { date +%s.%N; }
rate() { awk -v b="$bytes" -v s="$1" 'BEGIN { printf "%.1f MB/s (%.2f s)", b / 1e6 / s, s }'; }

# Every contender starts alike: the previous one's output removed and the model read once
# (warm in the page cache, as far as memory allows).
warm() { sync; cat "$work"/model/* > /dev/null; }
warm
t0=$(now); cp -r "$work/model" "$work/copy"; sync; t1=$(now)
cp_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
rm -rf "$work/copy"

declare -A run_s
for workers in 1 2; do
  rm -rf "$work/out-1"
  warm
  t0=$(now)
  "$bin" run --workers "$workers" --model "$work/model" --out "$work/out-$workers" --recipe "$recipe" \
    --format "$format" > "$work/run-$workers.txt"
  sync; t1=$(now)
  run_s[$workers]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
done

# Peak memory: a standalone coordinator and two workers under GNU time.
/usr/bin/time -f "%M" -o "$work/coord.rss" "$bin" coordinator --listen 127.0.0.1:0 > "$work/coord.out" 2> /dev/null &
coord=$!
for _ in $(seq 100); do grep -q listening "$work/coord.out" 2> /dev/null && break; sleep 0.1; done
url="http://$(awk '{ print $NF }' "$work/coord.out")"
/usr/bin/time -f "%M" -o "$work/w1.rss" "$bin" worker --coordinator "$url" --threads 1 2> /dev/null &
w1=$!
/usr/bin/time -f "%M" -o "$work/w2.rss" "$bin" worker --coordinator "$url" --threads 1 2> /dev/null &
w2=$!
"$bin" compress --coordinator "$url" --model "$work/model" --out "$work/out-rss" --recipe "$recipe" \
  --format "$format" > /dev/null
pkill -TERM -P "$w1" -f "shardpress worker" || true
pkill -TERM -P "$w2" -f "shardpress worker" || true
pkill -TERM -P "$coord" -f "shardpress coordinator" || true
wait "$w1" "$w2" "$coord" || true
biggest=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(max(int(t['params'])*2 for t in r['tensors']))" "$work/out-rss/report.json")

echo "model: $mb MB ($size, BF16), recipe $recipe, --format $format, $(nproc) cores, $(date -u +%Y-%m-%d)"
echo "output on disk:              $(du -sb "$work/out-2" | awk '{ printf "%.1f MB", $1 / 1e6 }')"
echo "cp -r model:                 $(rate "$cp_s")"
echo "shardpress run, 1 worker:    $(rate "${run_s[1]}")  = $(awk -v c="$cp_s" -v r="${run_s[1]}" 'BEGIN { printf "%.2f", c / r }') x cp speed"
echo "shardpress run, 2 workers:   $(rate "${run_s[2]}")  = $(awk -v c="$cp_s" -v r="${run_s[2]}" 'BEGIN { printf "%.2f", c / r }') x cp speed"
rss_mb() { echo $(( $(tail -n 1 "$1") / 1024 )); }   # GNU time may note a signal first
echo "peak RSS coordinator:        $(rss_mb "$work/coord.rss") MB"
echo "peak RSS worker (2 running): $(rss_mb "$work/w1.rss") MB, $(rss_mb "$work/w2.rss") MB"
echo "largest tensor:              $(( biggest / 1000000 )) MB; model $mb MB"
echo "time breakdown of the 2-worker run (sum over tasks):"
python3 - "$work/out-2/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t = r["tasks"]
tot = lambda k: sum(x[k] for x in t)
print(f"  read {tot('read_seconds'):.2f} s, compute {tot('compute_seconds'):.2f} s, write {tot('write_seconds'):.2f} s, task total {tot('seconds'):.2f} s, job wall {r['summary']['wall_seconds']:.2f} s")
PY
