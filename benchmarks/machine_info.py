"""What a benchmark ran on: hardware, thread settings and library versions."""

from __future__ import annotations

import os
import platform
from typing import Any

# Environment variables that change CPU speed and so belong in a results file.
_ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLIBC_TUNABLES", "LD_PRELOAD")


def machine() -> dict[str, Any]:
    """Describe the CPU, GPU, threads and versions of this process."""
    import faiss
    import numpy as np
    import sklearn
    import timm
    import torch
    import torchvision

    import msc_detector
    from msc_detector.runtime import cpu_supports_bf16

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "cpu_native_bf16": cpu_supports_bf16(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "msc_detector": msc_detector.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "faiss": faiss.__version__,
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
        "environment": {k: os.environ[k] for k in _ENVIRONMENT if k in os.environ},
    }
