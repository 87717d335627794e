#!/usr/bin/env bash
# The GPU rows of issues 15 and 16, one device call per section, one process per row.
#
#   NCCL_NVLS_ENABLE=0 OUT=/tmp/rows bash benchmarks/gpu_rows.sh [sections]   # .whl carried for
#                                                                               # the PyTorch rows
# sections (default: table):
#   table    issue 16's table at 1b and base: our LoRA family and the PyTorch peers (PEFT eager and
#            under torch.compile, full fine-tuning compiled);
#   table7b  the same at LLaMA-2-7B's shape (4 x 1024);
#   scaling  issue 15's 1b weak-scaling rows: one GPU, data 2, fsdp 2 (needs 2 GPUs);
#   scaling_lora  its LoRA rows only, the one-GPU row on each GPU (the 2-GPU step waits for the
#            slower one), and data 2 / fsdp 2 again as one process per GPU (jax.distributed);
#   options  the 1b LoRA step under single XLA options, layer loop rolled and unrolled;
#   max_autotune  our 1b LoRA row, then PEFT LoRA under torch.compile's max-autotune-no-cudagraphs
#            (its GEMM autotuning takes most of the call);
#   floor    the LoRA step against the same step without adapters (jax_step.py's norms_only) at
#            1b and base, and a per-op profile of both at 1b: what the adapters cost, and what
#            the rest of the step costs with XLA's kernels;
#   copies   DecoderConfig.copy_layer_weights as shipped (on) against off (--no-layer-weight-copies):
#            the LoRA step at 1b and 7B, and the no-adapter floor at 1b with the copies.
# With two GPUs a table's two lanes (ours on GPU 0, the peers on GPU 1) run at the same time, so
# the ratios come from one call; with one they run one after the other. XLA_OPTIONS (default
# none) goes to our rows' XLA_FLAGS; SCAN_UNROLL (default 0: unrolled) to jax_step.py.
# $OUT/summary.log: a line per row; $OUT/results.jsonl (jax_step.py's and torch_peers.py's lines,
# each with its "xla_flags"); $OUT/table.md (benchmarks/report.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rows}; PY=${PY:-python3}; STEPS=${STEPS:-10}; SCALE=${SCALE:-}
CALL_BUDGET=${CALL_BUDGET:-540}; XLA_OPTIONS=${XLA_OPTIONS-}; SCAN_UNROLL=${SCAN_UNROLL:-0}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export NCCL_NVLS_ENABLE=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT/rows" "$OUT/logs"
started=$SECONDS
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
PEERS_GPU=$([ "$GPUS" -ge 2 ] && echo 1 || echo 0)
PROCS=${PROCS:-$GPUS}  # processes of the _procs rows, one per GPU

# limit_or_skip <tag> <timeout s>: the timeout cut to what is left of the call's budget, or
# nothing (and a "skipped" line in summary.log) when too little is left
limit_or_skip() {
  local left=$((CALL_BUDGET - (SECONDS - started)))
  if [ "$left" -lt 40 ]; then echo "== $1 skipped (call budget)" >> "$OUT/summary.log"; return; fi
  echo $(($2 < left ? $2 : left))
}

record() {  # record <tag> <rc> <XLA_FLAGS> <what ran> <log>: a line of summary.log
  local tag=$1 rc=$2 flags=$3 what=$4 log=$5 result="$OUT/rows/$1/results.jsonl" numbers="no result"
  [ -f "$result" ] && numbers=$(grep -o '"ms_per_step": [0-9.]*\|"ms_per_step_pipelined": [0-9.]*\|"first_step_s": [0-9.]*\|"setup_s": [0-9.]*\|"compile_s": [0-9.]*' "$result" | tr '\n' ' ')
  {
    echo "== $tag [$flags] $what rc=$rc: $numbers"
    [ "$rc" = 0 ] || tail -4 "$log" | cut -c1-300 | sed "s/^/     /"
  } >> "$OUT/summary.log"
}

row() {  # row <CUDA_VISIBLE_DEVICES> <tag> <timeout s> <XLA_FLAGS> <script> <args...>
  local gpus=$1 tag=$2 limit flags=$4 script=$5
  limit=$(limit_or_skip "$tag" "$3"); shift 5
  [ -n "$limit" ] || return
  mkdir -p "$OUT/rows/$tag"
  XLA_FLAGS="$flags" CUDA_VISIBLE_DEVICES=$gpus timeout "$limit" "$PY" "benchmarks/$script" \
    --steps "$STEPS" --out "$OUT/rows/$tag" "$@" > "$OUT/logs/$tag.log" 2>&1
  record "$tag" $? "$flags" "$script $*" "$OUT/logs/$tag.log"
}

procs_row() {  # procs_row <tag> <timeout s> <jax_step args...>: one process per GPU, one mesh
  local tag=$1 limit
  limit=$(limit_or_skip "$tag" "$2"); shift 2
  [ -n "$limit" ] || return
  mkdir -p "$OUT/rows/$tag"
  XLA_FLAGS="$XLA_OPTIONS" "$PY" -m lorapro_jax.launch --processes "$PROCS" --timeout "$limit" \
    --log-dir "$OUT/logs/$tag" -- "$PY" benchmarks/jax_step.py --scan-unroll "$SCAN_UNROLL" \
    --steps "$STEPS" --out "$OUT/rows/$tag" "$@"
  record "$tag" $? "$XLA_OPTIONS" "$PROCS processes: jax_step.py $*" "$OUT/logs/$tag/process_0.log"
}

ours() {  # ours <tag> <timeout s> <jax_step args...>: on GPU 0, under XLA_OPTIONS
  local tag=$1 limit=$2; shift 2
  row 0 "$tag" "$limit" "$XLA_OPTIONS" jax_step.py --scan-unroll "$SCAN_UNROLL" "$@"
}

lanes() {  # lanes <ours function> <peers function>: side by side on two GPUs, else in turn
  if [ "$PEERS_GPU" = 1 ]; then "$1" & "$2" & wait; else "$1"; "$2"; fi
}

ours_1b() {
  for mode in lora lora_pro lora_pro_full dynamic_rank; do
    ours "$mode" 200 --scale "${SCALE:-1b}" --mode $mode
  done
  ours base_lora 120 --scale "${SCALE:-base}" --mode lora
}

peers_1b() {
  row $PEERS_GPU peft 120 "" torch_peers.py --scale "${SCALE:-1b}" --mode lora
  row $PEERS_GPU peft_compiled 240 "" torch_peers.py --scale "${SCALE:-1b}" --mode lora --compile default
  row $PEERS_GPU base_peft 90 "" torch_peers.py --scale "${SCALE:-base}" --mode lora
  row $PEERS_GPU base_peft_compiled 150 "" torch_peers.py --scale "${SCALE:-base}" --mode lora --compile default
  row $PEERS_GPU full_compiled 200 "" torch_peers.py --scale "${SCALE:-1b}" --mode full --compile default
}

ours_7b() {
  for mode in lora lora_pro lora_pro_full dynamic_rank; do
    ours "7b_$mode" 240 --scale "${SCALE:-7b}" --mode $mode --steps 5
  done
}

peers_7b() {
  row $PEERS_GPU 7b_peft 200 "" torch_peers.py --scale "${SCALE:-7b}" --mode lora --steps 5
  row $PEERS_GPU 7b_peft_compiled 300 "" torch_peers.py --scale "${SCALE:-7b}" --mode lora \
    --compile default --steps 5
}

# the one-GPU rows of the scaling sections: LoRA on GPU 0, $modes on the other
lora_one_gpu() { ours lora_1gpu 200 --scale "${SCALE:-1b}" --mode lora; }
other_modes_one_gpu() {
  for mode in $modes; do
    row $PEERS_GPU ${mode}_1gpu_gpu$PEERS_GPU 200 "$XLA_OPTIONS" jax_step.py --scan-unroll "$SCAN_UNROLL" \
      --scale "${SCALE:-1b}" --mode $mode
  done
}

# XLA options, one per row; the lanes are the rolled loop (GPU 0) and the unrolled one (GPU 1)
rolled_options() {
  for option in "" --xla_gpu_enable_dynamic_slice_fusion=true --xla_gpu_enable_triton_gemm=false \
      --xla_gpu_enable_command_buffer= --xla_gpu_autotune_level=0; do
    row 0 "rolled${option:+_${option#--xla_gpu_}}" 120 "$option" jax_step.py \
      --scale "${SCALE:-1b}" --mode lora --scan-unroll 1
  done
}

unrolled_options() {
  for option in --xla_gpu_experimental_enable_fusion_autotuner=false \
      --xla_gpu_enable_triton_gemm=false; do
    row $PEERS_GPU "unrolled_${option#--xla_gpu_}" 220 "$option" jax_step.py \
      --scale "${SCALE:-1b}" --mode lora
  done
}

for section in ${*:-table}; do
  case $section in
    table) lanes ours_1b peers_1b ;;
    table7b) lanes ours_7b peers_7b ;;
    options) lanes rolled_options unrolled_options ;;
    scaling|scaling_lora)
      if [ $section = scaling ]; then modes="lora_pro_full dynamic_rank"; else modes=lora; fi
      lanes lora_one_gpu other_modes_one_gpu
      row 0,1 lora_dp2 200 "$XLA_OPTIONS" jax_step.py --scan-unroll "$SCAN_UNROLL" \
        --scale "${SCALE:-1b}" --mode lora --fsdp 1
      for mode in lora $([ $section = scaling ] && echo $modes); do
        row 0,1 ${mode}_fsdp2 200 "$XLA_OPTIONS" jax_step.py --scan-unroll "$SCAN_UNROLL" \
          --scale "${SCALE:-1b}" --mode $mode --fsdp 2
      done
      if [ $section = scaling_lora ]; then  # the same meshes, one process per GPU
        procs_row lora_dp2_procs 200 --scale "${SCALE:-1b}" --mode lora --fsdp 1
        procs_row lora_fsdp2_procs 200 --scale "${SCALE:-1b}" --mode lora --fsdp 2
      fi ;;
    max_autotune)
      ours lora 200 --scale "${SCALE:-1b}" --mode lora
      row $PEERS_GPU peft_max_autotune 450 "" torch_peers.py --scale "${SCALE:-1b}" --mode lora \
        --compile max-autotune-no-cudagraphs ;;
    floor)
      for scale in ${SCALE:-1b base}; do
        for mode in lora norms_only; do ours "floor_${scale}_$mode" 200 --scale "$scale" --mode $mode; done
      done
      for mode in lora norms_only; do
        row 0 "profile_${SCALE:-1b}_$mode" 200 "$XLA_OPTIONS" profile_step.py --scale "${SCALE:-1b}" \
          --mode $mode --top 60
      done ;;
    copies)
      ours copies_1b_lora 200 --scale 1b --mode lora
      ours no_copies_1b_lora 200 --scale 1b --mode lora --no-layer-weight-copies
      ours copies_1b_norms_only 200 --scale 1b --mode norms_only
      ours copies_7b_lora 200 --scale 7b --mode lora --steps 5
      ours no_copies_7b_lora 240 --scale 7b --mode lora --steps 5 --no-layer-weight-copies ;;
    *) echo "unknown section $section (expected table, table7b, scaling, scaling_lora, options, max_autotune, floor, copies)" >&2; exit 2 ;;
  esac
done
cat "$OUT"/rows/*/results.jsonl > "$OUT/results.jsonl" 2>/dev/null
"$PY" benchmarks/report.py "$OUT/results.jsonl" > "$OUT/table.md" 2>&1
cat "$OUT/summary.log" "$OUT/table.md"
echo "call: $((SECONDS - started)) s"
