#!/usr/bin/env bash
# All benchmarks of issue 9 (and issue 4's optimizer-update microbenchmark), one process per
# measurement so that each peak-memory number is clean.
#
#   benchmarks/run_all.sh [section ...]      sections: env jax torch micro profile (default: the first four)
#
# Environment: OUT (results folder, default benchmarks/results/local), SCALES ("1b base"; "tiny" on
# a CPU), JAX_MODES, TORCH_MODES (eager), TORCH_COMPILED_MODES (run again under torch.compile,
# default "lora full": issue 16's peft_lora_compiled / full_compiled; "" for none), TORCH_COMPILE
# (their torch.compile mode: default or max-autotune-no-cudagraphs), PROFILE_MODES, JAX_ARGS
# (extra jax_step.py flags), BREAKDOWN (1: also time the gradient alone), STEPS (timed steps,
# default 10), PY (python, default python3).
# On the device machine the PyTorch side needs transformers 4.57 / peft / lora-pro-adamw carried as
# wheels in .whl/ (see benchmarks/README.md); they are installed to /tmp/site when .whl/ exists.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local}
SCALES=${SCALES:-"1b base"}
JAX_MODES=${JAX_MODES:-"full lora lora_pro lora_pro_full dynamic_rank lora_pro_dynamic_rank lora_r12 lora_r12_gated"}
TORCH_MODES=${TORCH_MODES:-"lora full lora_pro lora_pro_full"}
TORCH_COMPILED_MODES=${TORCH_COMPILED_MODES-"lora full"}
TORCH_COMPILE=${TORCH_COMPILE:-default}
STEPS=${STEPS:-10}
PY=${PY:-python3}
SECTIONS=${*:-"env jax torch micro"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && [ ! -d /tmp/site ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
[ -d /tmp/site ] && TORCH_PATH="/tmp/site:$PYTHONPATH" || TORCH_PATH="$PYTHONPATH"

for section in $SECTIONS; do
  case $section in
    env)
      { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
        $PY -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
        PYTHONPATH=$TORCH_PATH $PY -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
        [ "$SCALES" != tiny ] && $PY benchmarks/check_attention.py
      } 2>&1 | tee -a "$OUT/env.log" ;;
    jax)
      for scale in $SCALES; do for mode in $JAX_MODES; do
        echo "== jax $scale $mode" | tee -a "$OUT/jax.log"
        extra=""; [ "$mode" != full ] && [ "${BREAKDOWN:-1}" = 1 ] && extra="--breakdown"
        timeout 400 $PY benchmarks/jax_step.py --scale "$scale" --mode "$mode" --steps "$STEPS" \
          --out "$OUT" $extra ${JAX_ARGS:-} >> "$OUT/jax.log" 2>&1 || echo "FAILED jax $scale $mode (rc $?)" | tee -a "$OUT/jax.log"
      done; done ;;
    torch)
      # "mode:compile" pairs: the eager peers, then the compiled ones
      runs=""; for mode in $TORCH_MODES; do runs="$runs $mode:none"; done
      for mode in $TORCH_COMPILED_MODES; do runs="$runs $mode:$TORCH_COMPILE"; done
      for scale in $SCALES; do for run in $runs; do
        mode=${run%%:*}; compile=${run#*:}
        echo "== torch $scale $mode compile $compile" | tee -a "$OUT/torch.log"
        PYTHONPATH=$TORCH_PATH timeout 400 $PY benchmarks/torch_peers.py --scale "$scale" --mode "$mode" \
          --compile "$compile" --steps "$STEPS" --out "$OUT" >> "$OUT/torch.log" 2>&1 || echo "FAILED torch $scale $mode compile $compile (rc $?)" | tee -a "$OUT/torch.log"
        tail -n 1 "$OUT/results.jsonl" 2>/dev/null | cut -c1-160
      done; done ;;
    profile)
      for scale in $SCALES; do for mode in ${PROFILE_MODES:-lora}; do
        timeout 400 $PY benchmarks/profile_step.py --scale "$scale" --mode "$mode" --hlo --out "$OUT" ${JAX_ARGS:-} \
          > "$OUT/profile_${scale}_${mode}.log" 2>&1 || echo "FAILED profile $scale $mode"
        grep -A 40 "ms of ops per step" "$OUT/profile_${scale}_${mode}.log" | cut -c1-200 | head -n 40
      done; done ;;
    micro)
      tiny=""; [ "$SCALES" = tiny ] && tiny="--tiny"
      timeout 400 $PY benchmarks/lora_pro_update.py $tiny --out "$OUT" 2>&1 | tee "$OUT/micro.log" | tail -n 12 ;;
    *) echo "unknown section $section (expected env jax torch micro profile)"; exit 2 ;;
  esac
done
[ -f "$OUT/results.jsonl" ] && $PY benchmarks/report.py "$OUT/results.jsonl" | tee "$OUT/table.md"
exit 0
