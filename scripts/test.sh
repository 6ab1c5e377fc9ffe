#!/usr/bin/env bash
# The README's test command: set up .venv, lint, run the whole test suite on the CPU, build the docs
# site in strict mode (a broken link or API reference fails).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
echo "[test] ruff"
.venv/bin/ruff check src tests $(test -d benchmarks && echo benchmarks)
echo "[test] pytest"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MPLBACKEND=Agg
.venv/bin/python -m pytest -q -n "${DINOKIT_TEST_WORKERS:-2}" --dist loadfile "$@"
echo "[test] docs"
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet
