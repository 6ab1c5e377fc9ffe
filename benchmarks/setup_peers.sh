#!/usr/bin/env bash
# The peers live in their own virtual environment, .bench-venv, never in dinokit's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .bench-venv/bin/python ] || python3 -m venv .bench-venv
.bench-venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.bench-venv/bin/pip install -q lightly stable-pretraining nidl timm || echo "some peers failed to install"
.bench-venv/bin/pip list 2>/dev/null | grep -iE "^(lightly|stable.pretraining|nidl|timm|torch) "
