#!/usr/bin/env bash
# Download, here (with network), the wheels the GPU machine needs to run `make gpu-check`
# against requirements.lock: the locked transformers and what it needs that the machine (no
# network; /work/.library/device/KINDS.md lists its packages: torch 2.11, transformers 5.17,
# huggingface_hub 1.x, tokenizers 0.23.2) lacks or has in another version. torch, numpy and
# the rest stay the machine's (the check prints both versions of each). Into .whl/ (ignored,
# about 25 MB); the check installs them into /tmp/site there. Versions come from
# requirements.lock, so they follow it.
#
#   scripts/gpu_wheels.sh            # then: run tool, carry [".whl"], bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NAMES=(transformers huggingface_hub tokenizers hf-xet httpx2 httpcore2 truststore click regex
       lightning lightning-utilities)
specs=()
for name in "${NAMES[@]}"; do
  line=$(grep -i -E "^${name//[-_]/[-_]}==" requirements.lock) || { echo "$name not in requirements.lock" >&2; exit 1; }
  specs+=("$line")
done
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${specs[@]}"
ls .whl
du -sh .whl
