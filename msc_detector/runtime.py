"""Device and numeric-precision choices: which device, which autocast, which memory format.

The fast path on CPUs with native bf16 (AVX-512 BF16 or AMX) and on CUDA GPUs is
``channels_last`` plus autocast; features and distances stay in fp32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["Precision", "cpu_supports_bf16", "resolve_device", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn a device specification into a :class:`torch.device` that exists here.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        If the requested device is not available on this machine.
    """
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a valid torch device string.") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available; use 'cpu' or 'auto'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist."
            )
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError(f"device={device!r} but MPS is not available; use 'cpu' or 'auto'.")
    return dev


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), per oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


@dataclass(frozen=True)
class Precision:
    """The numeric set-up for one device.

    Attributes
    ----------
    name : {"fp32", "bf16", "fp16"}
        Autocast precision (``"fp32"`` means no autocast).
    device_type : str
        ``"cpu"``, ``"cuda"`` or ``"mps"``.
    channels_last : bool
        Whether models and inputs use the ``channels_last`` memory format.
    """

    name: str
    device_type: str
    channels_last: bool

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for fp32."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast context for the forward pass (a no-op for fp32)."""
        if self.dtype is None:
            yield
        else:
            with torch.autocast(device_type=self.device_type, dtype=self.dtype):
                yield

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Put an input batch in the memory format the model expects."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """Choose autocast precision and memory format for ``device``.

    Parameters
    ----------
    precision : {"auto", "fp32", "bf16", "fp16"}
        ``"auto"``: bf16 on CPUs with native bf16 and on CUDA devices that support it,
        fp16 on other CUDA devices, fp32 otherwise.
    device : torch.device

    Returns
    -------
    Precision

    Raises
    ------
    ValueError
        For fp16 on a CPU, or bf16 on a device without it.
    """
    kind = device.type
    if precision == "auto":
        if kind == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif kind == "cpu" and cpu_supports_bf16():
            name = "bf16"
        else:
            name = "fp32"
    else:
        name = precision
    if name == "fp16" and kind == "cpu":
        raise ValueError("precision='fp16' is not supported on the CPU; use 'bf16' or 'fp32'.")
    if name == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("This CUDA device has no bf16 support; use precision='fp16'.")
    channels_last = kind == "cuda" or (kind == "cpu" and name == "bf16")
    return Precision(name=name, device_type=kind, channels_last=channels_last)
