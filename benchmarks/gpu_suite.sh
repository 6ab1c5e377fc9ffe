#!/usr/bin/env bash
# The GPU suite in one command: benchmarks/gpu_suite.py, its options passed on (--dry-run, --out DIR,
# --parts ..., --methods ...). Where .whl/ holds wheels (benchmarks/gpu_wheels.sh, carried to the GPU
# machine), a full run installs them into /tmp/site first (no index: that machine reaches none) and
# puts them on PYTHONPATH; src/ goes first on it, so the working tree's dinokit is the one measured.
#
#   bash benchmarks/gpu_suite.sh --out "$OUT"        # on the GPU machine, against its own PyTorch
#   bash benchmarks/gpu_suite.sh --dry-run           # here: CPU, toy sizes
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
site="${GPU_SUITE_SITE:-/tmp/site}"
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
if [ "$dry" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  t0=$(date +%s)
  if "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$site" .whl/*.whl; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu_suite.sh] $(ls .whl/*.whl | wc -l) wheels installed into $site in $(($(date +%s) - t0)) s"
  else
    echo "[gpu_suite.sh] the wheels in .whl/ did not install; the parts that need them say so"
  fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" benchmarks/gpu_suite.py "$@"
