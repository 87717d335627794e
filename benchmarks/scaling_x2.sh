#!/usr/bin/env bash
# Issue 15 on 2 GPUs of one host, one device call: the correctness check (every method, data 2
# and fsdp 2 against one GPU), the 1b weak-scaling rows with the layer loop scanned (one GPU of
# the same host, then both) and per-op profiles of the LoRA steps (one GPU, data 2, fsdp 2).
#
#   NCCL_NVLS_ENABLE=0 OUT=/tmp/scaling bash benchmarks/scaling_x2.sh [sections]
#
# sections (default all): check rows profile. Results: $OUT/results.jsonl (jax_step.py's lines,
# with their "xla_flags"), $OUT/summary.log, $OUT/multi_gpu_check.{json,log}, $OUT/profiles.txt.
# XLA's collective-overlap flags (no gain on 2 H200s: README) go in through XLA_OPTIONS.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/scaling}; PY=${PY:-python3}; STEPS=${STEPS:-5}
export NCCL_NVLS_ENABLE=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
SECTIONS=${*:-check rows profile}

for section in $SECTIONS; do
  case $section in
    check)
      timeout 480 "$PY" benchmarks/multi_gpu_check.py --scale base --out "$OUT" \
        > "$OUT/multi_gpu_check.log" 2>&1; echo "multi_gpu_check exit $?"
      tail -25 "$OUT/multi_gpu_check.log" ;;
    rows)  # the scanned rows of this page's table (benchmarks/gpu_rows.sh runs them)
      SCAN_UNROLL=1 OUT="$OUT" PY="$PY" STEPS="$STEPS" bash benchmarks/gpu_rows.sh scaling ;;
    profile)
      for fsdp in 0 1 2; do
        timeout 200 "$PY" benchmarks/profile_step.py --scale 1b --mode lora --scan-unroll 1 \
          --fsdp $fsdp --steps 2 --top 45 >> "$OUT/profiles.txt" 2>&1
        echo "profile fsdp $fsdp exit $?"
      done ;;
    *) echo "unknown section $section (expected check, rows, profile)" >&2; exit 2 ;;
  esac
done
