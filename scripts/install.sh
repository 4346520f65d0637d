#!/usr/bin/env bash
# Set up msc-detector on a fresh Debian machine (run as root from the repository root).
#
# 1. Fashion-MNIST for the quickstart, from Debian's dataset-fashion-mnist package, when it
#    is missing and apt-get exists. Best effort: without it the quickstart uses
#    scikit-learn's digits instead.
# 2. The package in editable mode with its test, docs and bench extras.
#
# Safe to run again: each step only does work that is still missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

FASHION_MNIST_DIR="/usr/share/datasets/fashion-mnist"
PYTHON="${PYTHON:-python}"

if [ -d "$FASHION_MNIST_DIR" ]; then
    echo "install.sh: Fashion-MNIST found in $FASHION_MNIST_DIR"
elif command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: installing Debian's dataset-fashion-mnist"
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; }; then
        echo "install.sh: note: could not install dataset-fashion-mnist;" \
            "the quickstart will use scikit-learn's digits instead" >&2
    fi
else
    echo "install.sh: note: no apt-get here, so no Fashion-MNIST;" \
        "the quickstart will use scikit-learn's digits instead" >&2
fi

echo "install.sh: installing msc-detector with the test, docs and bench extras"
"$PYTHON" -m pip install -e ".[test,docs,bench]"
echo "install.sh: done"
