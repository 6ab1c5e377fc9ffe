#!/usr/bin/env bash
# Wheels for the GPU suite (benchmarks/gpu_suite.sh) on a lent GPU machine, into .whl/ (ignored by
# git): the peers (stable-pretraining, lightly, nidl) and what they and dinokit need beyond that
# machine's image (Python 3.12, x86-64, torch/timm/lightning/transformers/pandas/pyarrow and more
# already there: /work/.library/device/KINDS.md). Every wheel is fetched with --no-deps; the list
# below is the import closure of the suite's peer steps, found by running them with the image's
# packages alone. The machine reaches no registry: it installs from .whl/ (see gpu_suite.sh).
#
#   bash benchmarks/gpu_wheels.sh            # then carry .whl in the device call
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-python3}"
dest=.whl
mkdir -p "$dest"

# name==version, one per line
wheels=(
  # the peers
  stable-pretraining==0.1.8
  lightly==1.6.0
  nidl==0.0.2
  # stable-pretraining's imports beyond the image
  loguru==0.7.3
  omegaconf==2.3.0
  hydra-core==1.3.8
  prettytable==3.19.0
  wcwidth==0.9.5
  kornia==0.9.0
  kornia-rs==0.2.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  requests-cache==1.3.3
  cattrs==26.2.1
  platformdirs==4.14.9
  url-normalize==3.1.0
  # nidl's
  toml==0.10.2
  # dinokit's (streaming shards)
  webdataset==1.0.2
  braceexpand==0.1.7
)
# published as a source archive only: built here into a pure-Python wheel (hydra-core and omegaconf need it)
sdists=(antlr4-python3-runtime==4.9.3)

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dest" "${wheels[@]}"
for s in "${sdists[@]}"; do
  name="${s%%==*}"
  ls "$dest"/"${name//-/_}"-*.whl >/dev/null 2>&1 ||
    "$py" -m pip wheel -q --disable-pip-version-check --no-deps --no-binary=:all: -w "$dest" "$s"
done

# one version of each (two stop the whole install there), and the size against the 64 MiB carry limit
dupes=$(ls "$dest"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "more than one version in $dest of: $dupes (delete the older)" >&2
  exit 1
fi
ls -l "$dest"/*.whl | awk '{printf "%8.1f KiB  %s\n", $5 / 1024, $NF}'
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "$(ls "$dest"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $dest (the carry limit is 64 MiB with the working tree)"
