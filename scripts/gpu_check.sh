#!/usr/bin/env bash
# make gpu-check: the device tests on CUDA (CPU vs CUDA agreement, the implicit-device guard,
# the model never moved), then benchmarks/gpu_check.py (every registered method on the
# Gemma-3-270M float32/bfloat16 and GPT-J-6B bfloat16 shapes, a profile of one ROME edit and
# one traced fact), in at most 4 minutes on one H200 (two runs fit the 15-minute lease).
#
# Runs against requirements.lock: the wheels that scripts/gpu_wheels.sh downloaded into .whl/
# (the locked transformers and what it needs) are installed into /tmp/site first, and the
# machine's and the locked versions are printed. Needs python3 with torch (CUDA), numpy,
# pandas and pytest: no .venv, no network, no weights. Results: benchmarks/results/
# {tracing,editing}-cuda.json, and a copy of them plus the log under $OUT when that is set
# (the GPU machine's run tool). A failing method is recorded in the JSON and the run goes on;
# the exit status is non-zero at the end if anything failed.
#
#   scripts/gpu_wheels.sh         # here, once (network): .whl/, ~25 MB, ignored by git
#   scripts/gpu_check.sh          # on the GPU machine (carry .whl)
#   scripts/gpu_check.sh --dry    # anywhere: CPU, tiny shapes, results in $OUT or a temp folder
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=()
RESULTS=benchmarks/results
BUDGET=135
LIMIT=150  # the budget stops starting work; this stops work that started before it ran out
TESTS=(-m "")  # every test of the file, the CUDA halves included
if [[ "${1:-}" == "--dry" ]]; then
  DRY=(--dry)
  RESULTS=${OUT:-$(mktemp -d)}
  BUDGET=45
  LIMIT=300  # a loaded CPU: let the last started step finish, what is left is skipped
  TESTS=(-m device -k "tracing_agrees or rome")  # two CPU halves: does pytest run here?
fi
LOG=${OUT:-/tmp}/gpu-check.log
mkdir -p "$(dirname "$LOG")"
{
  echo "== gpu-check $(date -u +%FT%TZ) ${DRY[*]:-}"
  if [[ -z "${DRY[*]:-}" ]]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
        || echo "!! installing .whl/ failed: the check runs on the machine's versions"
    else
      echo "!! no .whl/ (scripts/gpu_wheels.sh; carry .whl): the check runs on the machine's versions"
    fi
  fi
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
  export LOCEDIT_GPT2_TOKENIZER_DIR=$PWD/benchmarks/assets/gpt2
  export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-"); print("transformers", transformers.__version__, "from", transformers.__file__)'
  echo "== device tests (CPU vs CUDA; the cuda half is skipped without a GPU)"
  timeout 75 "$PY" -m pytest -q -p no:cacheprovider -n 0 tests/test_device.py "${TESTS[@]}" -rs
  tests=$?
  echo "== benchmarks (budget ${BUDGET} s)"
  timeout "$LIMIT" "$PY" benchmarks/gpu_check.py ${DRY[@]+"${DRY[@]}"} \
    --budget "$BUDGET" --out "$RESULTS"
  bench=$?
  echo "== device tests: exit $tests; benchmarks: exit $bench (124: timed out)"
  exit $(( tests != 0 || bench != 0 ))
} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
if [[ -n "${OUT:-}" && -z "${DRY[*]:-}" ]]; then  # also after a timeout: per-shape files
  cp benchmarks/results/tracing-cuda.json benchmarks/results/editing-cuda.json "$OUT"/ 2>/dev/null || true
fi
exit "$status"
