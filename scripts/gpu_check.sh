#!/usr/bin/env bash
# make gpu-check: the device tests on CUDA (CPU vs CUDA agreement, the implicit-device guard),
# then benchmarks/gpu_check.py (seconds per traced fact and per edit, peak GPU memory, for the
# Gemma-3-270M and GPT-J-6B shapes), in under 8 minutes on one H200.
#
# Needs only python3 with torch (CUDA), transformers, lightning, numpy, pandas and pytest: no
# .venv, no network, no weights. Results: benchmarks/results/{tracing,editing}-cuda.json, and a
# copy of them plus the log under $OUT when that is set (the GPU machine's run tool).
#
#   scripts/gpu_check.sh          # on the GPU machine
#   scripts/gpu_check.sh --dry    # anywhere: CPU, tiny shapes, results in $OUT or a temp folder
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export LOCEDIT_GPT2_TOKENIZER_DIR=$PWD/benchmarks/assets/gpt2
export TOKENIZERS_PARALLELISM=false
DRY=()
RESULTS=benchmarks/results
if [[ "${1:-}" == "--dry" ]]; then
  DRY=(--dry)
  RESULTS=${OUT:-$(mktemp -d)}
fi
LOG=${OUT:-/tmp}/gpu-check.log
mkdir -p "$(dirname "$LOG")"
{
  set +e  # run the benchmarks even when a device test fails; report both statuses
  echo "== gpu-check $(date -u +%FT%TZ) ${DRY[*]:-}"
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-"); print("transformers", transformers.__version__)'
  echo "== device tests (CPU vs CUDA; the cuda half is skipped without a GPU)"
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider -n 0 tests/test_device.py -m "" -rs
  tests=$?
  echo "== benchmarks"
  timeout 400 "$PY" benchmarks/gpu_check.py ${DRY[@]+"${DRY[@]}"} --out "$RESULTS"
  bench=$?
  echo "== device tests: exit $tests; benchmarks: exit $bench (124: timed out)"
  exit $(( tests != 0 || bench != 0 ))
} 2>&1 | tee "$LOG" && status=0 || status=${PIPESTATUS[0]}
if [[ -n "${OUT:-}" && -z "${DRY[*]:-}" ]]; then  # also after a timeout: per-shape files
  cp benchmarks/results/tracing-cuda.json benchmarks/results/editing-cuda.json "$OUT"/ 2>/dev/null || true
fi
exit "$status"
