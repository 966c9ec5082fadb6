#!/usr/bin/env bash
# Download, into .whl/, the wheels the GPU benchmark machine needs to run hf_slim with the pinned versions
# (that machine has torch and an older transformers preinstalled and reaches no package registry).
# Usage (repo root):  bash scripts/device_wheels.sh
# Then, on the GPU machine (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   python scripts/bench_attention.py --check --graph && python scripts/bench_decode.py
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info && { grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; }
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  transformers==5.23.0 tokenizers==0.23.3 huggingface_hub==2.4.0 safetensors==0.8.0 accelerate==1.15.0 \
  hf-xet httpx2 typer
ls -la .whl
