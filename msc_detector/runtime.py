"""Device and numeric-precision choices: which device, which autocast, which memory format.

The fast path on CPUs with native bf16 (AVX-512 BF16 or AMX) and on CUDA GPUs is
``channels_last`` plus autocast; features and distances stay in fp32.

One exception while training on the CPU: oneDNN's bf16 *backward* kernels for
depthwise convolutions are far slower than its fp32 ones (measured with oneDNN 3.12 on
an AVX-512 BF16 CPU, per 128 views: weight gradient of a 5x5 depthwise convolution
97-133 ms in bf16 against 18-33 ms in fp32; input gradient of a stride-2 one 73-155 ms
against 3-20 ms), while depthwise convolutions are memory-bound, so fp32 costs them
little in the forward pass. :meth:`Precision.train_autocast` therefore runs trainable
depthwise convolutions in fp32 (a training step of EfficientNet-Lite0 at 112 px: 1.3 s
-> 0.7 s of CPU time for 128 views).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "Precision",
    "Runtime",
    "cpu_supports_bf16",
    "land_device",
    "resolve_device",
    "resolve_precision",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Device types whose autocast, memory formats and transfers the package supports.
_DEVICE_TYPES = ("cpu", "cuda", "mps")


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
    if dev.type not in _DEVICE_TYPES:
        raise ValueError(
            f"device={device!r}: msc-detector runs on {', '.join(_DEVICE_TYPES)} devices, not "
            f"{dev.type!r}; use 'auto', 'cpu', 'cuda' or 'mps'."
        )
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

    @contextlib.contextmanager
    def train_autocast(self) -> Iterator[None]:
        """Autocast context for a training forward pass (see the module docstring).

        Like :meth:`autocast`, except that with bf16 on the CPU the trainable depthwise
        convolutions run in fp32, whose backward kernels are much faster there.
        """
        with self.autocast():
            if self.device_type == "cpu" and self.name == "bf16":
                with _Fp32DepthwiseConvolutions():
                    yield
            else:
                yield

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Put an input batch in the memory format the model expects."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def place(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """Move a network to ``device`` in this set-up's memory format (in place)."""
        model = model.to(device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


class _Fp32DepthwiseConvolutions(TorchFunctionMode):
    """Run ``conv2d`` calls with a trainable depthwise weight in fp32, outside autocast."""

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.conv2d:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
            if (
                isinstance(weight, torch.Tensor)
                and weight.requires_grad
                and weight.ndim == 4
                and weight.shape[1] == 1
                and groups > 1
            ):
                inputs = list(args)
                if inputs:
                    inputs[0] = inputs[0].float()
                else:
                    kwargs["input"] = kwargs["input"].float()
                with torch.autocast(device_type="cpu", enabled=False):
                    return func(*inputs, **kwargs)
        return func(*args, **kwargs)


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


@dataclass(frozen=True)
class Runtime:
    """Where networks run and in which numeric set-up: one object instead of two arguments.

    Attributes
    ----------
    device : torch.device
    precision : Precision
        Autocast and memory format for ``device``.
    """

    device: torch.device
    precision: Precision

    @classmethod
    def resolve(cls, device: str | torch.device, precision: str = "auto") -> Runtime:
        """Build the runtime for a device and a precision specification.

        Parameters
        ----------
        device : str or torch.device
            See :func:`resolve_device`.
        precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
            See :func:`resolve_precision`.
        """
        dev = resolve_device(device)
        return cls(dev, resolve_precision(precision, dev))

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move a network to the device in the memory format of the precision (in place)."""
        return self.precision.place(model, self.device)

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """Copy a CPU batch to the device (pinned and asynchronous on CUDA)."""
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)


def land_device(saved: str, requested: str | torch.device = "auto") -> torch.device:
    """Choose the device a saved or pickled detector lands on: one rule for both.

    With ``requested="auto"`` it is the device the detector was fitted on where that
    exists here, else the CPU, with a warning when a GPU-fitted detector lands on the
    CPU. An explicit ``requested`` device must exist here.

    Parameters
    ----------
    saved : str
        The device the detector was fitted on, e.g. ``"cuda:0"``.
    requested : str or torch.device, default="auto"

    Returns
    -------
    torch.device
    """
    if not (isinstance(requested, str) and requested == "auto"):
        return resolve_device(requested)
    try:
        return resolve_device(saved)
    except ValueError:
        warnings.warn(
            f"This detector was fitted on {saved}, which is not available here; it is loaded "
            "on the CPU. Scores match the GPU's up to floating-point precision.",
            UserWarning,
            stacklevel=3,
        )
        return torch.device("cpu")


def land_runtime(
    saved_device: str, saved_precision: str, precision: str, requested: str | torch.device
) -> Runtime:
    """Build the runtime of a loaded detector: :func:`land_device`, saved precision.

    The saved precision is kept on a device of the type it was fitted on; elsewhere the
    ``precision`` parameter is resolved for the new device (``"auto"`` where it is
    unavailable there, as fp16 is on a CPU).
    """
    device = land_device(saved_device, requested)
    same_type = torch.device(saved_device).type == device.type
    try:
        return Runtime(
            device, resolve_precision(saved_precision if same_type else precision, device)
        )
    except ValueError:
        return Runtime(device, resolve_precision("auto", device))
