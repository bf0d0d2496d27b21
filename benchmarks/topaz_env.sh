#!/usr/bin/env bash
# Install Topaz (topaz-em 0.3.20) into its own virtual environment, as docs/topaz.md describes, so it runs
# beside our CPU torch without pulling a CUDA build into the project's environment.
#
#   bash benchmarks/topaz_env.sh [VENV_DIR]      # default: $TOPAZ_VENV or ~/.cache/cryopick-bench/topaz-0.3.20
#   TOPAZ_TORCH="torch==2.13.0 --index-url URL" bash benchmarks/topaz_env.sh DIR   # e.g. a CUDA build for --gpu
#
# Prints the path of the working `topaz` executable on its last line. Idempotent: a venv whose
# `topaz --help` already works is reused (the marker file is written only after that check passes).
set -euo pipefail

VENV="${1:-${TOPAZ_VENV:-$HOME/.cache/cryopick-bench/topaz-0.3.20}}"
MARKER="$VENV/.cryopick-topaz-ok"
PY="${PYTHON:-python3}"

if [[ -f "$MARKER" && -x "$VENV/bin/topaz" ]] && "$VENV/bin/topaz" --help >/dev/null 2>&1; then
    echo "$VENV/bin/topaz"
    exit 0
fi

rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
# shellcheck disable=SC2086  # TOPAZ_TORCH may carry pip options
"${PIP[@]}" ${TOPAZ_TORCH:-torch==2.13.0}                     # the CPU wheel on local disk
"${PIP[@]}" --no-deps topaz-em==0.3.20 torchvision==0.28.0     # --no-deps: no CUDA torch pulled in
"${PIP[@]}" "tqdm>=4.65.0" "h5py>=3.7.0" numpy pandas "psutil>=5.8.0" scikit-learn scipy pillow future

# torchvision's CUDA ops cannot load beside a CPU torch; guard the two fake-op registrations that
# fail at import (topaz only uses torchvision's rotate/flip, never torchvision.ops).
PYVER="$("$VENV/bin/python" -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')"
F="$VENV/lib/$PYVER/site-packages/torchvision/_meta_registrations.py"
sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' "$F"

"$VENV/bin/topaz" --help >/dev/null
touch "$MARKER"
echo "$VENV/bin/topaz"
