#!/usr/bin/env bash
# Scale run: a generated fine-grained MoE model of 50,051 tensors (128 layers of 128 experts,
# 3.3 GB BF16) through a real coordinator and 2 worker processes on loopback.
#   1. One job at the default task budget: planning time, coordinator peak memory (VmHWM),
#      wall time, and the client's exit code (it must receive the whole report).
#   2. Resume cost: a job of ~3,300 tasks (--task-budget-mb 1) whose coordinator is SIGKILLed
#      once most tasks are journaled, then restarted; the same job submitted again reloads
#      its journal. Prints the time to read it back and how many tasks were kept.
# Usage: bash bench/scale.sh [WORKDIR]   (needs ~10 GB free; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin shardpress >/dev/null
bin=$PWD/target/release/shardpress
work=${1:-/tmp/shardpress-scale}
mkdir -p "$work"
cd "$work"
model=m50k
if [ ! -f "$model/config.json" ]; then
  "$bin" gen-model --out "$model" --size 3.283GB --hidden 256 --experts 128 --expert-width 128 \
    --max-shard-mb 4000
fi
port=50791
url=http://127.0.0.1:$port
export SHARDPRESS_LOG=info

start_coordinator() { # $1: log
  "$bin" coordinator --listen 127.0.0.1:$port >/dev/null 2>"$1" &
  coordinator=$!
  sleep 0.5
}
peak_kb() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }

start_coordinator coordinator-1.log
for i in 1 2; do "$bin" worker --coordinator $url --name w$i >/dev/null 2>worker-$i.log & done
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

echo "== 1. one job, default task budget"
rm -rf out1
started=$(date +%s.%N)
set +e
"$bin" compress --coordinator $url --model $model --out out1 --recipe int8 >job1.stdout 2>job1.stderr
code=$?
set -e
ended=$(date +%s.%N)
echo "client exit code $code; wall $(echo "$ended - $started" | bc) s"
echo "planning: $(grep 'job planned' coordinator-1.log | grep -o ' tasks=[0-9]*\| seconds=[0-9.]*' | tr -d '\n')"
echo "coordinator peak memory: $(( $(peak_kb $coordinator) / 1024 )) MiB"
echo "report.json: $(stat -c %s out1/report.json) bytes; $(grep -c . job1.stdout) summary lines"

echo "== 2. resume cost, ~3,300 tasks"
rm -rf out2
"$bin" compress --coordinator $url --model $model --out out2 --recipe int8 --task-budget-mb 1 \
  --no-wait >/dev/null 2>job2.stderr
total=$(grep -o '[0-9]* tasks' job2.stderr | head -1 | cut -d' ' -f1)
while [ "$(ls out2/.shardpress/done 2>/dev/null | wc -l)" -lt $((total * 6 / 10)) ]; do sleep 0.2; done
kill -9 $coordinator
wait $coordinator 2>/dev/null || true
journaled=$(ls out2/.shardpress/done | wc -l)
echo "killed the coordinator with $journaled of $total tasks journaled"
start_coordinator coordinator-2.log
"$bin" compress --coordinator $url --model $model --out out2 --recipe int8 --task-budget-mb 1 \
  >job3.stdout 2>job3.stderr
echo "resubmitted: $(grep 'job planned' coordinator-2.log | grep -o ' resumed_tasks=[0-9]*\| journal_seconds=[0-9.]*\| seconds=[0-9.]*' | tr -d '\n')"
grep resuming job3.stderr
"$bin" verify out2 | tail -1
