#!/usr/bin/env bash
# GGUF output next to llama.cpp's own pipeline (not a test): on a generated Llama-shaped BF16
# model of SIZE (default 1GB) it times, in one run,
#   - `cp -r` of the model directory (the baseline),
#   - llama.cpp: convert_hf_to_gguf.py to BF16 (the model's dtype: an F16 intermediate would
#     flush its tiniest weights, so llama-quantize would quantize other values than we do), then
#     llama-quantize (libllama, 2 threads) to each file type; Q8_0 straight from the converter,
#   - `shardpress run --workers 2 --format gguf` with the recipe of the same name,
# and checks that every tensor of our file is byte-identical to llama.cpp's.
# Needs the real-readers venv (../shared/tools/real-readers-venv; override with REAL_READERS=DIR).
# Usage: bash bench/gguf-vs-llama-cpp.sh [SIZE] [FILE_TYPES...]   (default: 1GB q8_0 q4_0 q4_k_m q6_k)
# GEN_ARGS adds gen-model options, e.g. GEN_ARGS="--experts 8" for a Mixtral-shaped model;
# with it, LAYOUT=qwen2moe|qwen3moe rewrites that model as a Qwen2-MoE / Qwen3-MoE checkpoint
# (bench/moe_layout.py) before the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1GB}
shift || true
if [ $# -gt 0 ]; then types=("$@"); else types=(q8_0 q4_0 q4_k_m q6_k); fi
py=${REAL_READERS:-$HOME/.cache/shardpress/real-readers}/bin/python
helper=$PWD/bench/gguf_llama_cpp.py
cargo build --release --bin shardpress >&2
bin=$PWD/target/release/shardpress
work=$(mktemp -d /tmp/shardpress-gguf-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

# llama.cpp's converter, from the llama-cpp-python sdist the venv was built from.
version=$("$py" -c "import llama_cpp; print(llama_cpp.__version__)")
vendor=$("$py" "$helper" fetch "$version" "$work")

# shellcheck disable=SC2086
"$bin" gen-model --out "$work/model" --size "$size" ${GEN_ARGS:-} >&2
if [ -n "${LAYOUT:-}" ]; then
  "$py" "$PWD/bench/moe_layout.py" "$work/model" "$work/rewritten" "$LAYOUT"
  rm -rf "$work/model" && mv "$work/rewritten" "$work/model"
fi
bytes=$(du -sb "$work/model" | cut -f1)
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
cat "$work"/model/* > /dev/null
t0=$(now); cp -r "$work/model" "$work/copy"; sync; t1=$(now); cp_s=$(secs "$t0" "$t1")
rm -rf "$work/copy"
t0=$(now)
"$py" "$helper" convert "$vendor" "$work/model" bf16 "$work/ref-BF16.gguf" llama-bpe > "$work/convert.log" 2>&1
sync; t1=$(now); convert_s=$(secs "$t0" "$t1")

echo "model: $(awk -v b="$bytes" 'BEGIN { printf "%.1f MB", b / 1e6 }') ($size, BF16), $(nproc) cores, llama-cpp-python $version, $(date -u +%Y-%m-%d)"
echo "cp -r model: $cp_s s; llama.cpp convert_hf_to_gguf.py to BF16: $convert_s s"
printf "%-8s %12s %22s %22s %10s  %s\n" type "output MB" "llama.cpp quantize s" "shardpress 2 workers s" "x cp" "tensors vs llama.cpp"
for t in "${types[@]}"; do
  upper=$(echo "$t" | tr a-z A-Z)
  ftype=$(case $t in q8_0) echo 7;; q4_0) echo 2;; q4_k_m) echo 15;; q6_k) echo 18;; esac)
  if [ "$t" = q8_0 ]; then
    # The converter writes Q8_0 itself.
    t0=$(now); "$py" "$helper" convert "$vendor" "$work/model" q8_0 "$work/ref-$upper.gguf" llama-bpe > /dev/null 2>&1
    sync; t1=$(now); q_s="$(secs "$t0" "$t1") (convert)"
  else
    t0=$(now); "$py" "$helper" quantize "$work/ref-BF16.gguf" "$work/ref-$upper.gguf" "$ftype" > /dev/null 2>&1
    sync; t1=$(now); q_s="$(secs "$t0" "$t1") (+ convert)"
  fi
  t0=$(now)
  "$bin" run --workers 2 --model "$work/model" --out "$work/out-$t" --recipe "$t" --format gguf > /dev/null
  sync; t1=$(now); ours_s=$(secs "$t0" "$t1")
  same=$("$py" "$helper" compare "$work/out-$t/model.gguf" "$work/ref-$upper.gguf" | head -1 || true)
  printf "%-8s %12s %22s %22s %10s  %s\n" "$t" "$(du -b "$work/out-$t/model.gguf" | awk '{ printf "%.1f", $1 / 1e6 }')" \
    "$q_s" "$ours_s" "$(awk -v c="$cp_s" -v r="$ours_s" 'BEGIN { printf "%.2f", c / r }')" "$same"
  rm -rf "$work/out-$t" "$work/ref-$upper.gguf"
done
