#!/usr/bin/env bash
# Set up mtl in ./.venv from the repo's own files: `bash tools/setup.sh` for running, `--test` adds test tools.
# torch is pinned to a release this project is tested with; on a GPU cluster the same wheel is a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --disable-pip-version-check --upgrade pip
pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
pip install -q --disable-pip-version-check -e ".${extras}"
echo "mtl is set up in $(pwd)/.venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
