#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root and install dinokit with its dev tools and its
# optional groups (onnx, hf, geo: the tests exercise them) into it.
# Torch is pinned to the release this project is tested with; override with DINOKIT_TORCH, e.g.
#   DINOKIT_TORCH="torch torchvision" bash scripts/bootstrap.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[bootstrap] installing torch (${DINOKIT_TORCH:-torch==2.14.1 torchvision==0.29.1})"
  # shellcheck disable=SC2086
  "${pip[@]}" install ${DINOKIT_TORCH:-torch==2.14.1 torchvision==0.29.1}
fi
stamp=.venv/.dinokit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[bootstrap] installing dinokit and its dependencies"
  "${pip[@]}" install -e ".[dev,onnx,hf,geo]"
  touch "$stamp"
fi
