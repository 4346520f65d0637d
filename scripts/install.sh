#!/usr/bin/env bash
# Set up msc-detector on a fresh Debian machine (run as root from the repository root).
#
# 1. Debian packages, when they are missing and apt-get exists (one `apt-get update`
#    for all). Best effort: a package that cannot be installed is reported and the
#    script goes on.
#    - dataset-fashion-mnist: Fashion-MNIST for the quickstart, examples, tests and
#      benchmarks; without it the quickstart uses scikit-learn's digits instead.
#    - opencv-doc: OpenCV's handwritten digits (examples/data/digits.png) for the
#      opencv-digits benchmark; its smoke test fails without it.
#    - chromium: a headless browser in which tests/test_report.py opens the HTML report
#      of `msc-detector report`; that test fails without it.
# 2. The package in editable mode with its test, docs and bench extras, which also
#    installs the msc-detector command.
#
# Safe to run again: each step only does work that is still missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

FASHION_MNIST_DIR="/usr/share/datasets/fashion-mnist"
OPENCV_DIGITS="/usr/share/doc/opencv-doc/examples/data/digits.png"
PYTHON="${PYTHON:-python}"

have_fashion_mnist() { [ -d "$FASHION_MNIST_DIR" ]; }
have_opencv_digits() { [ -f "$OPENCV_DIGITS" ] || [ -f "$OPENCV_DIGITS.gz" ]; }
have_chromium() {
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 ||
        command -v google-chrome >/dev/null 2>&1
}

# What is lost without each package.
without() {
    case "$1" in
        dataset-fashion-mnist) echo "the quickstart will use scikit-learn's digits instead" ;;
        opencv-doc) echo "the opencv-digits benchmark and its smoke test need $OPENCV_DIGITS" ;;
        chromium) echo "the report's browser test (tests/test_report.py) will fail" ;;
    esac
}

missing=()
if have_fashion_mnist; then
    echo "install.sh: Fashion-MNIST found in $FASHION_MNIST_DIR"
else
    missing+=(dataset-fashion-mnist)
fi
if have_opencv_digits; then
    echo "install.sh: OpenCV's digits found at $OPENCV_DIGITS"
else
    missing+=(opencv-doc)
fi
if have_chromium; then
    echo "install.sh: a Chromium browser found"
else
    missing+=(chromium)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        for package in "${missing[@]}"; do
            echo "install.sh: note: no apt-get here, so no $package; $(without "$package")" >&2
        done
    elif ! apt-get update -q; then
        for package in "${missing[@]}"; do
            echo "install.sh: note: apt-get update failed, so no $package;" \
                "$(without "$package")" >&2
        done
    else
        for package in "${missing[@]}"; do
            echo "install.sh: installing Debian's $package"
            if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$package"; then
                echo "install.sh: note: could not install $package; $(without "$package")" >&2
            fi
        done
        if [[ " ${missing[*]} " == *" opencv-doc "* ]] && ! have_opencv_digits; then
            echo "install.sh: note: opencv-doc is installed but $OPENCV_DIGITS is not there" \
                "(does dpkg exclude /usr/share/doc here?); $(without opencv-doc)" >&2
        fi
    fi
fi

echo "install.sh: installing msc-detector with the test, docs, bench and dask extras"
"$PYTHON" -m pip install -e ".[test,docs,bench,dask]"
echo "install.sh: installing defect-synthesis (benchmarks/defects.py) without its opencv-python"
"$PYTHON" -m pip install --no-deps "defect-synthesis==0.1.0"
echo "install.sh: done"
