#!/usr/bin/env bash
# The extra views that "auto" turns on for small images (flip averaging, the nearest
# view), each on and off, on two small-image sets other than Fashion-MNIST: OpenCV's
# 20-pixel handwritten digits (Debian's opencv-doc) and scikit-learn's 8-pixel digits.
# Every other setting is the detector's default (224 px, one epoch of MSC + angular).
# Each run writes its own results file and resumes where it stopped.
set -euo pipefail
# ROC-AUC is what these runs measure; one thread keeps them from thrashing a shared CPU.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
for dataset in opencv-digits digits; do
    stem=${dataset//-/_}
    python -m benchmarks.one_class --dataset "$dataset" --name "${stem}_default"
    python -m benchmarks.one_class --dataset "$dataset" --flip-average off --nearest-view off \
        --name "${stem}_no_extra_views"
    python -m benchmarks.one_class --dataset "$dataset" --flip-average on --nearest-view off \
        --name "${stem}_flip_only"
    python -m benchmarks.one_class --dataset "$dataset" --flip-average off --nearest-view on \
        --name "${stem}_nearest_only"
done
