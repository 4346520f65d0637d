#!/usr/bin/env bash
# The paper's finding on our code: every objective on Fashion-MNIST, all 10 classes, with
# the same backbone and budget (500 training images per class, 3 epochs of SGD at
# lr 1e-3, a fixed random 2,000-image test subset), ROC-AUC after each epoch for the
# trained ones. Resumable: re-running skips finished classes. About 45 min on one core.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
common=(--dataset fashion-mnist --train-size 500 --test-size 2000 --epochs 3 --lr 1e-3)
for loss in none msc contrastive center msc_angular; do
    python benchmarks/one_class.py "${common[@]}" --loss "$loss" --per-epoch \
        --name "finding_$loss"
done
python benchmarks/compare.py benchmarks/results/finding_{none,contrastive,center,msc,msc_angular}.json \
    --name finding
