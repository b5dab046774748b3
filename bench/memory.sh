#!/usr/bin/env bash
# Peak memory per pass under --memory-limit (issue 10): one 1 GiB BF16 tensor (16384 x 32768)
# through every pass that needs whole-tensor statistics or a whole-tensor solver (low-rank,
# per-tensor HQQ, hashed), each on a fresh worker process started with --memory-limit 512MB,
# so its VmHWM is that pass's peak. Prints, per pass, the worker's peak resident memory, the
# wall time and whether the job succeeded (a pass whose declared memory is over the limit is
# not leased to the worker, and its job fails by name after --unassignable-timeout-secs).
# The last rows are the baseline, measured the same way: the tensor as one chunk with no
# limit (what these passes did before they streamed).
# Usage: bash bench/memory.sh [WORKDIR]   (needs ~3 GB free, ~8 GB of memory for the
#        baseline; builds the release binary; SHARDPRESS_BIN=path/to/shardpress uses that
#        binary instead; ONLY=REGEX runs the passes whose name matches)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${SHARDPRESS_BIN:-}" ]; then
  cargo build --release --bin shardpress >/dev/null
  SHARDPRESS_BIN=$PWD/target/release/shardpress
fi
bin=$SHARDPRESS_BIN
limit=${LIMIT:-512MB}
work=${1:-/tmp/shardpress-memory}
mkdir -p "$work"
cd "$work"
model=$work/one-tensor.safetensors
if [ ! -f "$model" ]; then
  # 64 rows of plausible BF16 weights (uneven row scales, a few outliers) repeated to 1 GiB.
  python3 - "$model" <<'PY'
import random, struct, sys
rows, cols, block_rows = 16384, 32768, 64
random.seed(0)
def bf16(x):
    return struct.unpack('<I', struct.pack('<f', x))[0] >> 16
block = bytearray()
for r in range(block_rows):
    scale = 0.02 * (1 + (r % 13) * 0.1)
    vals = [bf16(random.gauss(0, scale) * (6 if random.random() < 0.01 else 1)) for _ in range(cols)]
    block += struct.pack('<%dH' % cols, *vals)
name = "model.layers.0.mlp.down_proj.weight"
header = '{"%s":{"dtype":"BF16","shape":[%d,%d],"data_offsets":[0,%d]}}' % (name, rows, cols, rows * cols * 2)
header = header.encode()
header += b' ' * (-len(header) % 8)
with open(sys.argv[1], 'wb') as f:
    f.write(struct.pack('<Q', len(header)))
    f.write(header)
    for _ in range(rows // block_rows):
        f.write(block)
PY
fi
port=50793
url=http://127.0.0.1:$port
export SHARDPRESS_LOG=info
# A pass no worker can take (its memory need over every live worker's limit) fails its job
# after this long instead of the default minute.
"$bin" coordinator --listen 127.0.0.1:$port --unassignable-timeout-secs 5 >/dev/null 2>coordinator.log &
coordinator=$!
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
sleep 0.5
peak_kb() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }

passes=(
  "rtn-tensor|quantize: { bits: 8, granularity: tensor }"
  "nf4-tensor|codebook: { method: nf4, granularity: tensor }"
  "fp8-tensor|fp8: { granularity: tensor }"
  "kmeans-4bit|codebook: { method: kmeans, bits: 4 }"
  "magnitude-50%|prune: { method: magnitude, sparsity: 0.5 }"
  "rows-25%|prune: { method: rows, fraction: 0.25 }"
  "columns-25%|prune: { method: columns, fraction: 0.25 }"
  "rows+rtn-tensor|prune: { method: rows, fraction: 0.25 }@quantize: { bits: 4, granularity: tensor }"
  "rtn-int4-g128|quantize: { bits: 4, granularity: group, group_size: 128 }"
  "magnitude-50%+rtn-int4-channel|prune: { method: magnitude, sparsity: 0.5 }@quantize: { bits: 4, granularity: channel }"
  "hqq-tensor|quantize: { method: hqq, bits: 4, granularity: tensor }"
  "lowrank-r64|lowrank: { rank: 64 }"
  "hashed-1%|hashed: { fraction: 0.01 }"
  "hashed-10%|hashed: { fraction: 0.1 }"
  "rtn-tensor, one chunk, no limit|quantize: { bits: 8, granularity: tensor }|--chunk-mb 100000"
  "kmeans-4bit, one chunk, no limit|codebook: { method: kmeans, bits: 4 }|--chunk-mb 100000"
)
echo "one 1 GiB BF16 tensor (16384 x 32768), worker --memory-limit $limit, one fresh worker per pass"
printf '%-34s %12s %9s  %s\n' pass "peak RSS" "wall s" outcome
i=0
for entry in "${passes[@]}"; do
  i=$((i + 1))
  IFS='|' read -r name spec worker_args <<<"$entry"
  if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then continue; fi
  worker_args=${worker_args:---memory-limit $limit}
  recipe=recipe-$i.yaml
  echo "name: bench-$i" >"$recipe"
  echo "passes:" >>"$recipe"
  IFS='@' read -ra stages <<<"$spec"
  for stage in "${stages[@]}"; do
    printf '  - %s\n    targets: ["re:.*"]\n' "$stage" >>"$recipe"
  done
  # shellcheck disable=SC2086 # worker_args is a list of flags
  "$bin" worker --coordinator $url --name w$i $worker_args >/dev/null 2>worker-$i.log &
  worker=$!
  rm -rf out-$i
  started=$(date +%s.%N)
  set +e
  "$bin" compress --coordinator $url --model "$model" --out out-$i --recipe "$recipe" \
    >job-$i.stdout 2>job-$i.stderr
  code=$?
  set -e
  ended=$(date +%s.%N)
  peak=$(peak_kb $worker)
  kill $worker
  wait $worker 2>/dev/null || true
  if [ $code -eq 0 ]; then
    outcome=ok
  else
    outcome="refused: $(grep -oE 'needs about [0-9.]* [MG]B|at least [0-9.]* [MG]B' job-$i.stderr | head -1)"
  fi
  printf '%-34s %9.0f MB %9.1f  %s\n' "$name" "$(echo "$peak * 1024 / 1000000" | bc -l)" \
    "$(echo "$ended - $started" | bc -l)" "$outcome"
  rm -rf out-$i
done
