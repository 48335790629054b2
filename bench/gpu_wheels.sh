#!/usr/bin/env bash
# Wheels the GPU machine lacks (it cannot reach a network), downloaded here into .whl/ (git-ignored) for
# bench/gpu.sh: transformers 4.57 (what the tests compare against; the machine has 5.x) with the
# tokenizers and huggingface_hub it accepts. Python 3.12, x86-64 manylinux. Then run the device with
# carry [".whl"] and `bash bench/gpu.sh`.
set -eu
cd "$(dirname "$0")/.."
plat=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  plat="$plat --platform $p"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
  -d .whl "transformers==4.57.6" "tokenizers>=0.22,<0.23" "huggingface_hub>=0.34,<1.0"
ls -la .whl
