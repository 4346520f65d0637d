#!/usr/bin/env bash
# The peer libraries' environment for `python -m benchmarks.peers` (anomalib 2.7.0,
# PyOD), kept outside the repository and outside msc-detector's own dependencies.
#
# The venv sees the main environment's packages (--system-site-packages), so that the
# installed torch, torchvision and timm -- and so the same kernels -- serve both sides;
# a constraints file keeps pip from replacing them with other builds. anomalib's own
# requirements (lightning, kornia, FrEIA, jsonargparse, ...) go into the venv only.
#
#   bash benchmarks/peers_env.sh [VENV]      # default VENV: /opt/peers-venv
set -euo pipefail
VENV=${1:-/opt/peers-venv}
python -m venv --system-site-packages "$VENV"
CONSTRAINTS=$(mktemp)
python - >"$CONSTRAINTS" <<'PY'
from importlib.metadata import version
for name in ("torch", "torchvision", "timm", "numpy", "scikit-learn"):
    print(f"{name}=={version(name)}")
PY
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --constraint "$CONSTRAINTS" anomalib==2.7.0
# PyOD is optional: its EmbeddingOD row is skipped where it is missing.
"$VENV/bin/python" -m pip install --constraint "$CONSTRAINTS" pyod || true
rm -f "$CONSTRAINTS"
"$VENV/bin/python" -c "import anomalib, torch; print('anomalib', anomalib.__version__, 'torch', torch.__version__)"
