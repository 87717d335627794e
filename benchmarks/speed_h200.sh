#!/usr/bin/env bash
# Issue 16 on one H200, one device call: our LoRA-family steps and the PyTorch peers (PEFT eager
# and under torch.compile) side by side, every row with its time to the first finished step.
#
#   OUT=/tmp/speed bash benchmarks/speed_h200.sh      # with .whl carried (transformers 4.57.6,
#                                                      # huggingface_hub 0.36.2, tokenizers, peft)
# Rows in priority order (each process capped at ROW_TIMEOUT s, the call at CALL_BUDGET s):
# results.jsonl and rows.log under $OUT, then benchmarks/report.py's table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/speed}; PY=${PY:-python3}; STEPS=${STEPS:-10}
ROW_TIMEOUT=${ROW_TIMEOUT:-200}; CALL_BUDGET=${CALL_BUDGET:-500}
mkdir -p "$OUT"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
started=$SECONDS

row() {  # row <script> <args...>
  if [ $((SECONDS - started)) -gt "$CALL_BUDGET" ]; then echo "skipped (budget): $*"; return; fi
  echo "== $*" | tee -a "$OUT/rows.log"
  timeout "$ROW_TIMEOUT" "$PY" "benchmarks/$1" --steps "$STEPS" --out "$OUT" "${@:2}" \
    >> "$OUT/rows.log" 2>&1 || echo "   FAILED ($?)"
  tail -1 "$OUT/results.jsonl" | grep -o '"ms_per_step": [0-9.]*\|"first_step_s": [0-9.]*' | tr '\n' ' '
  echo
}

row torch_peers.py --scale 1b --mode lora
row torch_peers.py --scale 1b --mode lora --compile default
row jax_step.py --scale 1b --mode lora --scan-unroll 1
row jax_step.py --scale 1b --mode lora --scan-unroll 2
row jax_step.py --scale 1b --mode lora_pro --scan-unroll 1
row jax_step.py --scale 1b --mode lora_pro_full --scan-unroll 1
row jax_step.py --scale 1b --mode dynamic_rank --scan-unroll 1
row torch_peers.py --scale 1b --mode full --compile default
row jax_step.py --scale base --mode lora
row torch_peers.py --scale base --mode lora
row torch_peers.py --scale base --mode lora --compile default
"$PY" benchmarks/report.py "$OUT/results.jsonl" > "$OUT/table.md" 2>&1; cat "$OUT/table.md"
echo "call: $((SECONDS - started)) s"
