#!/usr/bin/env bash
# Issue 16's table in one device call on 2 GPUs of one host: our rows on GPU 0 and the PyTorch
# peers on GPU 1 at the same time (one process per row, each on its own GPU), so that the ratios
# come from one call. Section "scaling" adds issue 15's 1b weak-scaling rows on both GPUs.
#
#   NCCL_NVLS_ENABLE=0 OUT=/tmp/speed bash benchmarks/speed_x2.sh [sections]   # with .whl carried
#
# sections (default: table): table, table7b (LLaMA-2-7B's shape), scaling. Our rows run the unrolled layer loop (jax_step.py's
# default) under XLA_OPTIONS (default none; results/speed_h200x2_issue16/ was measured with
# --xla_gpu_experimental_enable_fusion_autotuner=false, and its row "lora_default_options" shows
# the default options give the same step and compile). $OUT/summary.log: a line per row;
# $OUT/results.jsonl; $OUT/table.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/speed}; PY=${PY:-python3}; STEPS=${STEPS:-10}
CALL_BUDGET=${CALL_BUDGET:-540}
XLA_OPTIONS=${XLA_OPTIONS-}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export NCCL_NVLS_ENABLE=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT/rows" "$OUT/logs"
started=$SECONDS

row() {  # row <CUDA_VISIBLE_DEVICES> <tag> <timeout s> <XLA_FLAGS> <script> <args...>
  local gpus=$1 tag=$2 limit=$3 flags=$4 script=$5; shift 5
  local left=$((CALL_BUDGET - (SECONDS - started)))
  if [ "$left" -lt 40 ]; then echo "== $tag skipped (call budget)" >> "$OUT/summary.log"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  mkdir -p "$OUT/rows/$tag"
  XLA_FLAGS="$flags" CUDA_VISIBLE_DEVICES=$gpus timeout "$limit" "$PY" "benchmarks/$script" \
    --steps "$STEPS" --out "$OUT/rows/$tag" "$@" > "$OUT/logs/$tag.log" 2>&1
  local rc=$? result="$OUT/rows/$tag/results.jsonl" numbers="no result"
  [ -f "$result" ] && numbers=$(grep -o '"ms_per_step": [0-9.]*\|"first_step_s": [0-9.]*\|"setup_s": [0-9.]*\|"compile_s": [0-9.]*' "$result" | tr '\n' ' ')
  {
    echo "== $tag [$flags] $script $* rc=$rc: $numbers"
    [ "$rc" = 0 ] || tail -4 "$OUT/logs/$tag.log" | cut -c1-300 | sed "s/^/     /"
  } >> "$OUT/summary.log"
}

ours_lane() {  # GPU 0
  row 0 lora 200 "$XLA_OPTIONS" jax_step.py --scale 1b --mode lora
  row 0 lora_pro 200 "$XLA_OPTIONS" jax_step.py --scale 1b --mode lora_pro
  row 0 lora_pro_full 200 "$XLA_OPTIONS" jax_step.py --scale 1b --mode lora_pro_full
  row 0 dynamic_rank 200 "$XLA_OPTIONS" jax_step.py --scale 1b --mode dynamic_rank
  row 0 base_lora 120 "$XLA_OPTIONS" jax_step.py --scale base --mode lora
  row 0 lora_default_options 240 "" jax_step.py --scale 1b --mode lora
}

peers_lane() {  # GPU 1
  row 1 peft 120 "" torch_peers.py --scale 1b --mode lora
  row 1 peft_compiled 240 "" torch_peers.py --scale 1b --mode lora --compile default
  row 1 base_peft 90 "" torch_peers.py --scale base --mode lora
  row 1 base_peft_compiled 150 "" torch_peers.py --scale base --mode lora --compile default
  row 1 full_compiled 200 "" torch_peers.py --scale 1b --mode full --compile default
}

ours_lane_7b() {  # GPU 0: LLaMA-2-7B's shape, 4 x 1024
  for mode in lora lora_pro lora_pro_full dynamic_rank; do
    row 0 "7b_$mode" 240 "$XLA_OPTIONS" jax_step.py --scale 7b --mode $mode --steps 5
  done
}

peers_lane_7b() {  # GPU 1
  row 1 7b_peft 200 "" torch_peers.py --scale 7b --mode lora --steps 5
  row 1 7b_peft_compiled 300 "" torch_peers.py --scale 7b --mode lora --compile default --steps 5
}

for section in ${*:-table}; do
  case $section in
    table) ours_lane & peers_lane & wait ;;
    table7b) ours_lane_7b & peers_lane_7b & wait ;;
    scaling)
      row 0 lora_1gpu 200 "$XLA_OPTIONS" jax_step.py --scale 1b --mode lora
      row 0,1 lora_dp2 200 "$XLA_OPTIONS" jax_step.py --scale 1b --mode lora --fsdp 1
      row 0,1 lora_fsdp2 200 "$XLA_OPTIONS" jax_step.py --scale 1b --mode lora --fsdp 2
      row 0,1 lora_pro_full_fsdp2 200 "$XLA_OPTIONS" jax_step.py --scale 1b --mode lora_pro_full --fsdp 2
      row 0,1 dynamic_rank_fsdp2 200 "$XLA_OPTIONS" jax_step.py --scale 1b --mode dynamic_rank --fsdp 2 ;;
    *) echo "unknown section $section (expected table, table7b, scaling)" >&2; exit 2 ;;
  esac
done
# the default-options row is compared in summary.log only (its table label is the same as "lora")
cat $(ls "$OUT"/rows/*/results.jsonl | grep -v default_options) > "$OUT/results.jsonl" 2>/dev/null
"$PY" benchmarks/report.py "$OUT/results.jsonl" > "$OUT/table.md" 2>&1
cat "$OUT/summary.log" "$OUT/table.md"
echo "call: $((SECONDS - started)) s"
