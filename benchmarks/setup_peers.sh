#!/usr/bin/env bash
# Each peer lives in its own virtual environment, never in dinokit's nor in another peer's:
#   .bench-venv-lightly   lightly (DINO parts, DINOv2 parts)
#   .bench-venv-spt       stable-pretraining (methods.DINO / DINOv2 / DINOv3)
#   .bench-venv-nidl      nidl (estimators.ssl.DINO)
#   .bench-venv-lightly-train  lightly-train (AGPL; distillation, benchmarks/distill.py; about 6 GB)
# Usage: bash benchmarks/setup_peers.sh [lightly] [spt] [nidl] [lightly-train]
#   (default: the three of quality.py; lightly-train only when named)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
declare -A PACKAGES=([lightly]="lightly timm" [spt]="stable-pretraining timm" [nidl]="nidl timm" [lightly-train]="lightly-train timm")
peers=("$@")
[ ${#peers[@]} -gt 0 ] || peers=(lightly spt nidl)
status=0
for peer in "${peers[@]}"; do
    [ -n "${PACKAGES[$peer]:-}" ] || { echo "unknown peer $peer (lightly, spt, nidl, lightly-train)" >&2; exit 2; }
    venv=".bench-venv-$peer"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    # torch from the local pip cap; the peer and its own dependencies as it pins them
    if "$venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 ${PACKAGES[$peer]} 2> >(grep -v "is ignored" >&2); then
        "$venv/bin/pip" list 2>/dev/null | grep -iE "^(lightly|lightly.train|stable.pretraining|nidl|timm|torch|lightning) "
    else
        echo "$peer failed to install into $venv" >&2
        status=1
    fi
done
exit $status
