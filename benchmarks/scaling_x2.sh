#!/usr/bin/env bash
# Issue 15 on 2 GPUs of one host, one device call: the correctness check (every method, data 2
# and fsdp 2 against one GPU), the 1b weak-scaling rows (one GPU of the same host, then both),
# with XLA's collective-overlap flags and without, and per-op profiles of the 2-GPU LoRA steps.
#
#   NCCL_NVLS_ENABLE=0 OUT=/tmp/scaling bash benchmarks/scaling_x2.sh [sections]
#
# sections (default all): check rows profile. Results: $OUT/results.jsonl (jax_step.py's lines,
# with their "xla_flags"), $OUT/rows.log, $OUT/multi_gpu_check.{json,log}, $OUT/profiles.txt.
# OVERLAP_ROWS=1 adds the rows with XLA's collective-overlap flags (no gain on 2 H200s: README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/scaling}; PY=${PY:-python3}; STEPS=${STEPS:-5}
export NCCL_NVLS_ENABLE=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
# XLA's overlap of collectives with compute (the names of xla/debug_options_flags.cc): the
# latency-hiding scheduler, and the collective pipeliner moving the next layer's all-gather (and
# this layer's reduce-scatter / all-reduce) across the layer scan's iterations.
OVERLAP="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_pipelined_all_gather=true \
--xla_gpu_enable_pipelined_reduce_scatter=true --xla_gpu_enable_pipelined_all_reduce=true \
--xla_gpu_enable_while_loop_double_buffering=true"
SECTIONS=${*:-check rows profile}

row() {  # row <tag> <XLA_FLAGS> <CUDA_VISIBLE_DEVICES> <jax_step args...>
  local tag=$1 flags=$2 visible=$3; shift 3
  echo "== $tag: $*"
  echo "== $tag: $*" >> "$OUT/rows.log"
  XLA_FLAGS="$flags" CUDA_VISIBLE_DEVICES="$visible" timeout 240 "$PY" benchmarks/jax_step.py \
    --scale 1b --scan-unroll 1 --steps "$STEPS" --out "$OUT" "$@" >> "$OUT/rows.log" 2>&1 \
    || echo "   FAILED ($?): see rows.log"
  tail -1 "$OUT/results.jsonl" | grep -o '"ms_per_step": [0-9.]*' 
}

for section in $SECTIONS; do
  case $section in
    check)
      timeout 300 "$PY" benchmarks/multi_gpu_check.py --scale base --out "$OUT" \
        > "$OUT/multi_gpu_check.log" 2>&1; echo "multi_gpu_check exit $?"
      tail -25 "$OUT/multi_gpu_check.log" ;;
    rows)
      row lora_1gpu "" 0 --mode lora
      row lora_dp2 "" 0,1 --mode lora --fsdp 1
      row lora_fsdp2 "" 0,1 --mode lora --fsdp 2
      if [ "${OVERLAP_ROWS:-0}" = 1 ]; then
        row lora_dp2_overlap "$OVERLAP" 0,1 --mode lora --fsdp 1
        row lora_fsdp2_overlap "$OVERLAP" 0,1 --mode lora --fsdp 2
        row lora_pro_full_fsdp2_overlap "$OVERLAP" 0,1 --mode lora_pro_full --fsdp 2
      fi
      row lora_pro_full_1gpu "" 0 --mode lora_pro_full
      row lora_pro_full_fsdp2 "" 0,1 --mode lora_pro_full --fsdp 2
      row dynamic_rank_1gpu "" 0 --mode dynamic_rank
      row dynamic_rank_fsdp2 "" 0,1 --mode dynamic_rank --fsdp 2 ;;
    profile)
      for fsdp in 1 2; do
        timeout 200 "$PY" benchmarks/profile_step.py --scale 1b --mode lora --scan-unroll 1 \
          --fsdp $fsdp --steps 2 --top 45 >> "$OUT/profiles.txt" 2>&1
        echo "profile fsdp $fsdp exit $?"
      done ;;
    *) echo "unknown section $section (expected check, rows, profile)" >&2; exit 2 ;;
  esac
done
