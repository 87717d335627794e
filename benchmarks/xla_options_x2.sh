#!/usr/bin/env bash
# Issues 16 and 15, one device call on 2 GPUs of one host: which XLA GPU options make the 1b LoRA
# step faster, or its compile shorter, scanned and unrolled. Two lanes run side by side, one per
# GPU (one process per row, `jax_step.py --scale 1b --mode lora`); then, with both GPUs, the
# data 2 / fsdp 2 rows of the unrolled step under the option the lanes are testing.
#
#   NCCL_NVLS_ENABLE=0 OUT=/tmp/options bash benchmarks/xla_options_x2.sh
#
# $OUT/summary.log: one line per row (ms/step, first step, compile) and XLA's own autotuner timing
# lines (INFO logs); $OUT/results.jsonl: jax_step.py's lines (each with its "xla_flags").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/options}; PY=${PY:-python3}; STEPS=${STEPS:-10}; SCALE=${SCALE:-1b}
CALL_BUDGET=${CALL_BUDGET:-560}
export NCCL_NVLS_ENABLE=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT/rows" "$OUT/logs"
started=$SECONDS
NO_TRITON="--xla_gpu_enable_triton_gemm=false"

row() {  # row <CUDA_VISIBLE_DEVICES> <tag> <timeout s> <XLA_FLAGS> <jax_step args...>
  local gpus=$1 tag=$2 limit=$3 flags=$4; shift 4
  local left=$((CALL_BUDGET - (SECONDS - started)))
  if [ "$left" -lt 40 ]; then echo "== $tag skipped (call budget)" | tee -a "$OUT/summary.log"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  mkdir -p "$OUT/rows/$tag"
  XLA_FLAGS="$flags" TF_CPP_MIN_LOG_LEVEL=0 CUDA_VISIBLE_DEVICES=$gpus timeout "$limit" "$PY" \
    benchmarks/jax_step.py --scale "$SCALE" --steps "$STEPS" --out "$OUT/rows/$tag" "$@" \
    > "$OUT/logs/$tag.log" 2>&1
  local rc=$? result="$OUT/rows/$tag/results.jsonl"
  local numbers="no result"
  [ -f "$result" ] && numbers=$(grep -o '"ms_per_step": [0-9.]*\|"first_step_s": [0-9.]*\|"compile_s": [0-9.]*\|"peak_gib": [0-9.]*' "$result" | tr '\n' ' ')
  {
    echo "== $tag [$flags] $* rc=$rc: $numbers"
    grep -h "autotuner time\|Compiling [0-9]* configs\|autotuning [0-9]* / [0-9]* fusions" \
      "$OUT/logs/$tag.log" | cut -c1-220 | sed "s/^/     /"
    [ "$rc" = 0 ] || tail -3 "$OUT/logs/$tag.log" | cut -c1-300 | sed "s/^/     /"
  } >> "$OUT/summary.log"
}

scanned_lane() {  # GPU 0: the scanned step under each option (about 30 s a row)
  row 0 s_default 120 "" --mode lora --scan-unroll 1
  row 0 s_dynamic_slice_fusion 120 "--xla_gpu_enable_dynamic_slice_fusion=true" --mode lora --scan-unroll 1
  row 0 s_no_triton 120 "$NO_TRITON" --mode lora --scan-unroll 1
  row 0 s_no_command_buffer 120 "--xla_gpu_enable_command_buffer=" --mode lora --scan-unroll 1
  row 0 s_autotune0 120 "--xla_gpu_autotune_level=0" --mode lora --scan-unroll 1
  row 0 s_dsf_no_triton 120 "--xla_gpu_enable_dynamic_slice_fusion=true $NO_TRITON" --mode lora --scan-unroll 1
}

unrolled_lane() {  # GPU 1: the unrolled step (181 s to its first step by default, issue 16)
  row 1 u_no_triton 220 "$NO_TRITON" --mode lora
  row 1 u_fusion_autotuner_off 200 "--xla_gpu_experimental_enable_fusion_autotuner=false" --mode lora
  row 1 u_autotune0 200 "--xla_gpu_autotune_level=0" --mode lora
}

scanned_lane & unrolled_lane & wait
row 0,1 u_no_triton_dp2 150 "$NO_TRITON" --mode lora --fsdp 1
row 0,1 u_no_triton_fsdp2 150 "$NO_TRITON" --mode lora --fsdp 2
cat "$OUT"/rows/*/results.jsonl > "$OUT/results.jsonl" 2>/dev/null
cat "$OUT/summary.log"
echo "call: $((SECONDS - started)) s"
