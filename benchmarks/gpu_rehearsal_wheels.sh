#!/usr/bin/env bash
# Wheels benchmarks/gpu_rehearsal.py needs that the device image lacks (it has Python 3.12, torch 2.11,
# transformers 5.17, accelerate 1.15), downloaded here into .device_wheels/ (git-ignored, ~31 MB) to carry:
#   - transformers 5.23.0: the version the toolkit is pinned to and was read against (flash-attention
#     kwargs, masking utilities); installed --no-deps over the image's 5.17
#   - datatrove and the dependencies the image lacks (dill, humanize, loguru, multiprocess):
#     toolkit.token_shards imports it
#   - liger-kernel: the Liger rows of part (a) (triton comes with torch's CUDA wheels)
#   - psutil: toolkit's memory figures
# Not available as wheels: flash-attn (PyPI has only its source; without it the rehearsal measures
# sdpa and flex_attention and records that flash was not importable), deepspeed (source only; the
# rehearsal does not use it). Part (b) also needs SmolLM2-135M, which cannot travel (README).
# On the device:  pip install --no-deps --no-index .device_wheels/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device_wheels
python3 -m pip download --python-version 3.12 --only-binary=:all: --no-deps \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .device_wheels \
    transformers==5.23.0 datatrove==0.10.1 liger-kernel==0.8.5 psutil dill humanize loguru multiprocess
du -sh .device_wheels
