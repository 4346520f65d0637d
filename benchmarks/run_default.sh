#!/usr/bin/env bash
# The default MSCDetector() on Fashion-MNIST: all 10 classes, each class's full training
# set (6,000 images), the full 10,000-image test set, seed 0. Resumable.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python -m benchmarks.one_class --dataset fashion-mnist --name fashion_mnist_default
