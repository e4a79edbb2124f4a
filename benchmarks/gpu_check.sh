#!/usr/bin/env bash
# GPU check (issue #18 part 4): one script, ≤ 8 minutes on one CUDA GPU. Never needed on CPU machines.
# Runs the device-handling tests, bench_analysis, a `run` with recovery in bf16, and decode speed base
# vs pruned on the GPU; prints one table at the end (also written to $OUT/table.md).
#
# Two kinds of machine:
# - yours, with this repository's venv holding a CUDA torch (`make install`, then
#   `.venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu128`): SmolLM2's real weights;
# - one that cannot download, whose python3 holds a CUDA torch (the GPU machine lent to sessions here):
#   first `make gpu-bundle` where a registry is reachable and carry .gpu_bundle/ along; the
#   check installs the bundle's wheels into .gpu_bundle/site (put first on PYTHONPATH with src/, the
#   machine's own packages untouched) and, SmolLM2's weights not being there, runs a SmolLM2-shaped model
#   with random weights (same shapes, so the same device handling and speed; its bits/byte mean nothing).
#
# Usage: bash benchmarks/gpu_check.sh   (from the repository root)
# OUT: logs and the table (≤ 8 files; default /tmp/minigpts-gpu-check); WORK: models and run outputs.
# DEVICE=cpu runs the same steps on the CPU with tiny budgets (to try the script where no GPU is).
set -uo pipefail
OUT=${OUT:-/tmp/minigpts-gpu-check}
WORK=${WORK:-/tmp/minigpts-gpu-work}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT" "$WORK"
declare -A ROW
export PYTHONUNBUFFERED=1  # a step stopped at its limit still leaves its log
step() { local name=$1; shift; local t0=$SECONDS; if timeout "$((${LIMIT:-150} * SCALE))" "$@" >"$OUT/$name.log" 2>&1; then ROW[$name]="ok $((SECONDS - t0)) s"; else ROW[$name]="FAILED ($?) $((SECONDS - t0)) s, see $name.log"; fi; }
has_device() { "$1" -c "import sys, torch; sys.exit(0 if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 1)" 2>/dev/null; }

if [ -x .venv/bin/python ] && has_device .venv/bin/python; then
  PY=.venv/bin/python
elif has_device python3; then
  PY=python3
else
  echo "gpu_check: no Python here with a CUDA torch (.venv/bin/python, python3): nothing to check" >&2
  exit 2
fi
BUNDLED=0  # 1: minigpts and the bundle's wheels come from PYTHONPATH (a machine without the venv)
$PY -c "import minigpts, transformers, datasets, gguf" 2>/dev/null || BUNDLED=1
{
  if [ "$BUNDLED" = 1 ]; then
    if [ ! -d .gpu_bundle/wheels ]; then
      echo "gpu_check: $PY lacks minigpts' dependencies; run 'make gpu-bundle' and carry .gpu_bundle" >&2
      exit 2
    fi
    $PY -m pip install -q --no-deps --no-index --find-links .gpu_bundle/wheels --target .gpu_bundle/site \
      --upgrade transformers datasets dill multiprocess gguf
    export PYTHONPATH="$PWD/.gpu_bundle/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  fi
  $PY -c "import torch, transformers, minigpts; print('python', '$PY', 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} 2>&1 | tee "$OUT/setup.log"
[ "${PIPESTATUS[0]}" = 0 ] || exit 2
[ "$BUNDLED" = 1 ] && export PYTHONPATH="$PWD/.gpu_bundle/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

MODEL=smollm2-135m
WEIGHTS="SmolLM2-135M-Instruct"
if ! $PY -c "from minigpts.models import _resolve_source; _resolve_source('$MODEL')" >/dev/null 2>&1; then
  MODEL="$WORK/smollm2-random"
  WEIGHTS="random (SmolLM2's shapes: bits/byte meaningless)"
  $PY - "$MODEL" <<'EOF' >>"$OUT/setup.log" 2>&1 || { echo "gpu_check: no SmolLM2 and no .gpu_bundle/smollm2" >&2; exit 2; }
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

source, target = Path(".gpu_bundle/smollm2"), Path(sys.argv[1])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(target)
for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
    if (source / name).exists():
        shutil.copy(source / name, target / name)
print("random-weight SmolLM2-shaped model written to", target)
EOF
fi

if [ "$DEVICE" = cpu ]; then  # the script's own try-out: tiny budgets, 10x the time limits
  DTYPE=float32 WINDOWS=2 SEQ=256 CALIB=2048 EVAL=2048 STEPS=2 TOKENS=8 REPEATS=1 SCALE=10
else
  DTYPE=bfloat16 WINDOWS=16 SEQ=1024 CALIB=65536 EVAL=8192 STEPS=40 TOKENS=128 REPEATS=3 SCALE=1
fi
MINIGPTS=("$PY" -m minigpts)
LIMIT=150 step tests "$PY" -m pytest -q -m "not slow" -p no:cacheprovider \
  -k "device or cuda or dtype or bf16 or distributed" tests/
LIMIT=90 step bench_analysis "$PY" benchmarks/bench_analysis.py --device "$DEVICE" --windows "$WINDOWS" \
  --seq-len "$SEQ"
LIMIT=180 step run "${MINIGPTS[@]}" run --data sample --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
  --calib-tokens "$CALIB" --max-eval-tokens "$EVAL" --target-params 0.7 --finetune distill --max-steps "$STEPS" \
  --out "$WORK/run" --force
LIMIT=120 step decode "$PY" benchmarks/bench_generate.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
  --no-llama-cpp --no-compile --no-aot --no-per-layer --tokens "$TOKENS" --repeats "$REPEATS" --json "$OUT/decode.json"

{
  echo
  echo "GPU check: $(head -n 1 "$OUT/setup.log"); weights: $WEIGHTS; $DEVICE, $DTYPE"
  echo
  echo "| check | result |"
  echo "|---|---|"
  for k in tests bench_analysis run decode; do echo "| $k | ${ROW[$k]:-not run} |"; done
  echo "| tests summary | $(tail -n 1 "$OUT/tests.log" 2>/dev/null) |"
  echo "| bench_analysis | $(grep -E '\(wall\) =' "$OUT/bench_analysis.log" 2>/dev/null | tr -s ' ' | tr '\n' ';') |"
  echo "| run (bits/byte) | $(tr '\r' '\n' <"$OUT/run.log" 2>/dev/null | grep -E '^(base|pruned|finetuned): ' | tr '\n' ';') |"
  echo "| decode base vs pruned | $(grep -E '^(base|MLP|\+ )' "$OUT/decode.log" 2>/dev/null | tr -s ' ' | tr '\n' ';') |"
} | tee "$OUT/table.md"
