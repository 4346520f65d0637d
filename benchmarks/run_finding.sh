#!/usr/bin/env bash
# The paper's finding on our code: the objectives on Fashion-MNIST, all 10 classes, with
# the same backbone and budget (500 training images per class, 3 epochs of SGD at
# lr 1e-3, a fixed random 2,000-image test subset), ROC-AUC after each epoch for the
# trained ones. Resumable: re-running skips finished classes. Flip averaging stays off:
# the comparison is about the training objective, and the committed tables predate it.
#
#   bash benchmarks/run_finding.sh              # 112 px, all five objectives -> finding_*
#                                               # (about 45 min on one core)
#   bash benchmarks/run_finding.sh 224 none msc contrastive
#                                               # 224 px, three objectives -> finding224_*
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
size="${1:-112}"
shift || true
losses=("$@")
if [ "${#losses[@]}" -eq 0 ]; then
    losses=(none msc contrastive center msc_angular)
fi
tag="finding"
if [ "$size" != "112" ]; then
    tag="finding${size}"
fi
common=(--dataset fashion-mnist --train-size 500 --test-size 2000 --epochs 3 --lr 1e-3
    --image-size "$size" --flip-average off --nearest-view off)
files=()
for loss in "${losses[@]}"; do
    python -m benchmarks.one_class "${common[@]}" --loss "$loss" --per-epoch \
        --name "${tag}_$loss"
    files+=("benchmarks/results/${tag}_$loss.json")
done
python -m benchmarks.compare "${files[@]}" --name "$tag"
