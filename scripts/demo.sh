#!/usr/bin/env bash
# The README's main job: set up .venv, pretrain the `demo_cnn` preset on a small real dataset
# (Fashion-MNIST from Debian's dataset-fashion-mnist, else scikit-learn's digits), then print
# the k-NN / linear-probe table and write the pictures. Extra arguments are config overrides
# (key=value).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[demo] installing Debian's dataset-fashion-mnist (falls back to digits if this fails)"
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || true
  fi
fi
exec .venv/bin/dinokit demo "$@"
