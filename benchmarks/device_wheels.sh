#!/usr/bin/env bash
# Wheels for a lent GPU machine, which has torch, numpy and PIL but no package index: omegaconf (the
# config library m3ae needs) into .whl/, and transformers with its dependencies (for
# `bench check`'s "cpu mae vs hf" stage) into .whl/hf/. Both folders are kept out of git
# (.git/info/exclude) and sent with the device tool's carry: [".whl"].
#   benchmarks/device_wheels.sh [PYTHON_VERSION]   # the device's Python (default 3.12)
# On the device:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl .whl/hf/*.whl
#   PYTHONPATH=/tmp/site:$PWD/src python3 -m m3ae bench check --out /tmp/chk
set -euo pipefail
PYV=${1:-3.12}
PIP=${PIP:-.venv/bin/pip}
cd "$(dirname "$0")/.."
mkdir -p .whl/hf
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platform=(--python-version "$PYV" --only-binary=:all: --platform manylinux2014_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
"$PIP" download -q omegaconf --no-deps "${platform[@]}" -d .whl
"$PIP" download -q transformers -c constraints.txt "${platform[@]}" -d .whl/hf
# The device has its own numpy (and torch); a second numpy in the target folder would shadow it.
rm -f .whl/hf/numpy-*.whl
du -sh .whl
