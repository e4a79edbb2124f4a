#!/usr/bin/env bash
# GPU check (issue #18 part 4): one script, ≤ 8 minutes on one CUDA GPU. Never needed on CPU machines.
# Installs the CUDA torch into the venv, runs the device-handling tests, bench_analysis, a `run` with
# recovery in bf16 on SmolLM2, and decode speed base vs pruned; prints one table at the end.
# Usage: bash benchmarks/gpu_check.sh   (from the repository root; needs the venv and the SmolLM2 wheel)
set -uo pipefail
PY=.venv/bin/python
OUT=${OUT:-/tmp/minigpts-gpu-check}
mkdir -p "$OUT"
declare -A ROW
step() { local name=$1; shift; local t0=$SECONDS; if timeout "${LIMIT:-150}" "$@" >"$OUT/$name.log" 2>&1; then ROW[$name]="ok $((SECONDS - t0)) s"; else ROW[$name]="FAILED ($?) $((SECONDS - t0)) s, see $OUT/$name.log"; fi; }

if ! $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  LIMIT=240 step install $PY -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/device.log"
LIMIT=150 step tests $PY -m pytest -q -m "not slow" -k "device or cuda or dtype or bf16 or distributed" tests/
LIMIT=90 step bench_analysis $PY benchmarks/bench_analysis.py --device cuda --windows 16 --seq-len 1024
LIMIT=180 step run_bf16 .venv/bin/minigpts run --data sample --model smollm2-135m --device cuda --dtype bfloat16 \
  --mlp-ratio 0.5 --finetune full --max-steps 40 --out "$OUT/run" --force
LIMIT=90 step decode $PY benchmarks/bench_generate.py --no-llama-cpp --tokens 128 --repeats 3 --json "$OUT/decode.json"

echo
echo "| check | result |"
echo "|---|---|"
for k in install tests bench_analysis run_bf16 decode; do [ -n "${ROW[$k]:-}" ] && echo "| $k | ${ROW[$k]} |"; done
echo "| tests summary | $(tail -n 1 "$OUT/tests.log" 2>/dev/null) |"
echo "| bench_analysis | $(grep -iE 'ratio|tok/s' "$OUT/bench_analysis.log" 2>/dev/null | tail -n 2 | tr '\n' ' ') |"
echo "| run bf16 (bits/byte) | $(grep -E 'finetuned|pruned|base' "$OUT/run_bf16.log" 2>/dev/null | grep -E '[0-9]\.[0-9]{4}' | tail -n 3 | tr -s ' ' | tr '\n' ';') |"
echo "| decode base vs pruned | $(tail -n 3 "$OUT/decode.log" 2>/dev/null | tr -s ' ' | tr '\n' ';') |"
