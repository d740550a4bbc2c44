#!/usr/bin/env bash
# Fetch the wheels bench/gpu_check.sh installs on the GPU machine, which has PyTorch, numpy, Pillow and pytest
# but no network. Run it here first (needs PyPI and `make test`'s .venv); it writes .whl/ (git-ignored), which
# travels with the working tree. The versions are the ones .venv was tested with.
#   bash bench/gpu_wheels.sh            # for the GPU machine's Python 3.12
#   PY_VERSION=3.11 bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NEEDED='av|pydantic|pydantic[-_]core|pydantic[-_]settings|python[-_]dotenv|annotated[-_]types|typing[-_]inspection'
pins=$(.venv/bin/python -m pip freeze | grep -i -E "^($NEEDED)==")
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086  # one argument per pin
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pins
ls .whl
