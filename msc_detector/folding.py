"""Fold eval-mode BatchNorm into the convolution before it, for training and inference.

The method keeps every BatchNorm layer in eval mode, so each one is a fixed per-channel
affine map ``y = (x - mean) / sqrt(var + eps) * gamma + beta`` of its convolution's
output. :func:`fold_batchnorm` builds a *view* of a network in which each such
convolution computes ``conv(x, W * s) + b`` directly (``s = gamma / sqrt(var + eps)``,
``b = beta - mean * s``) and the BatchNorm layer keeps only its activation. On the
CPU this removes a pass over every activation tensor (forward and backward) and the
dtype casts around it. Convolutions with TensorFlow "same" padding (timm's ``tf_``
models) are computed without padding a copy of their input (:func:`conv2d_same`).

The view shares every parameter and buffer with the original network, so

* the folded weights are recomputed from ``W``, ``gamma`` and ``beta`` at each forward
  pass that records gradients, and autograd gives exactly the gradients of the
  unfolded network (an optimiser over the original parameters trains both);
* without gradients (inference, or layers whose parameters are all frozen) the folded
  weights are cached and recomputed only when one of their tensors has changed;
* the original network, its ``state_dict`` and its parameter names stay as they were.

Pairs are found by running the network once on an example and matching each
BatchNorm's input to the convolution that produced it. The view is checked against
the original on that example; if they disagree (a convolution output used elsewhere as
well, an unusual layer), the original network is returned unchanged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = ["FoldedConv", "conv2d_same", "fold_batchnorm"]

# Largest relative output difference (to the output's largest magnitude) accepted
# between the folded view and the original network, in fp32.
_TOLERANCE = 1e-4

# Identity, storage and version of each tensor a folded weight was computed from.
_CacheKey = tuple[tuple[int, int, int], ...]


class FoldedConv(nn.Module):
    """A convolution followed by an eval-mode BatchNorm, computed as one convolution.

    Parameters
    ----------
    conv : torch.nn.Conv2d
        The convolution (any subclass, e.g. timm's ``Conv2dSame``), shared, not copied.
    bn : torch.nn.BatchNorm2d
        The BatchNorm whose affine map is folded in, shared, not copied.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self._cache: tuple[_CacheKey, torch.Tensor, torch.Tensor] | None = None

    def _tensors(self) -> list[torch.Tensor]:
        candidates = (
            self.conv.weight,
            self.conv.bias,
            self.bn.weight,
            self.bn.bias,
            self.bn.running_mean,
            self.bn.running_var,
        )
        return [t for t in candidates if t is not None]

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the folded weight and bias (cached where no gradient is recorded)."""
        tensors = self._tensors()
        cacheable = not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)
        if not cacheable:
            return self._fold()
        key = tuple((id(t), t.data_ptr(), t._version) for t in tensors)
        if self._cache is None or self._cache[0] != key:
            # Ordinary tensors even under inference_mode, so that a later training
            # pass may use the cache of frozen layers.
            with torch.inference_mode(False), torch.no_grad():
                weight, bias = self._fold()
            self._cache = (key, weight, bias)
        return self._cache[1], self._cache[2]

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn, conv = self.bn, self.conv
        assert bn.running_mean is not None and bn.running_var is not None
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
        bias = -bn.running_mean * scale
        if bn.bias is not None:
            bias = bias + bn.bias
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` with the folded weight and bias."""
        weight, bias = self.folded()
        conv = self.conv
        if type(conv) is nn.Conv2d:
            return conv._conv_forward(x, weight, bias)
        if _is_dynamic_same(conv):
            stride = cast(tuple[int, int], conv.stride)
            dilation = cast(tuple[int, int], conv.dilation)
            return conv2d_same(x, weight, bias, stride, dilation, conv.groups)
        # Other subclasses keep their own forward.
        return functional_call(conv, {"weight": weight, "bias": bias}, (x,))


def _is_dynamic_same(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is timm's ``Conv2dSame`` (TensorFlow "same" padding per call)."""
    return (
        type(conv).__name__ == "Conv2dSame"
        and tuple(conv.padding) == (0, 0)
        and conv.padding_mode == "zeros"
    )


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after) of one spatial dimension."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def conv2d_same(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """2-D convolution with TensorFlow "same" padding, without padding a copy of ``x``.

    "Same" padding is asymmetric when its total is odd (one more zero after than
    before). Padding the *input* for that copies the whole activation, which costs
    more than the (memory-bound) depthwise convolution itself on a CPU. With dilation
    1 the same result comes from symmetric padding ``after`` and a kernel one larger,
    whose extra first row/column is zero.

    Parameters
    ----------
    x : torch.Tensor of shape (N, C, H, W)
    weight : torch.Tensor of shape (C_out, C / groups, kH, kW)
    bias : torch.Tensor, optional
    stride, dilation : tuple of int
    groups : int

    Returns
    -------
    torch.Tensor
        What timm's ``Conv2dSame`` returns for these arguments.
    """
    (top, bottom), (left, right) = (
        _same_padding(n, k, s, d)
        for n, k, s, d in zip(x.shape[-2:], weight.shape[-2:], stride, dilation, strict=True)
    )
    if dilation == (1, 1):
        if (top, left) != (bottom, right):
            weight = F.pad(weight, (right - left, 0, bottom - top, 0))
        return F.conv2d(x, weight, bias, stride, (bottom, right), 1, groups)
    x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, weight, bias, stride, 0, dilation, groups)


def _foldable_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm whose eval-mode forward we can reproduce."""
    if not isinstance(module, nn.BatchNorm2d) or module.running_var is None:
        return False
    if type(module) is nn.BatchNorm2d:
        return True
    # timm's BatchNormAct2d: BatchNorm, then ``drop`` and ``act`` modules.
    return type(module).__name__ == "BatchNormAct2d" and hasattr(module, "act")


def _after_norm(norm: nn.Module) -> nn.Module:
    """Return what remains of a BatchNorm layer once its affine map is folded away."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    return nn.Sequential(norm.drop, norm.act)  # type: ignore[arg-type]


def _conv_norm_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """Names of (convolution, BatchNorm) pairs where the norm reads the conv's output."""
    names = {id(m): name for name, m in model.named_modules()}
    # Outputs are kept alive, so that no other tensor can reuse their ids.
    producer: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []
    seen: set[int] = set()

    def after_conv(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        producer[id(output)] = (module, output)

    def before_norm(module: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
        conv, output = producer.get(id(inputs[0]), (None, None))
        if conv is None or output is not inputs[0] or id(conv) in seen or id(module) in seen:
            return
        seen.update((id(conv), id(module)))
        pairs.append((names[id(conv)], names[id(module)]))

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros":
            hooks.append(module.register_forward_hook(after_conv))
        elif _foldable_norm(module):
            hooks.append(module.register_forward_pre_hook(before_norm))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return pairs


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Return a view of an eval-mode network with its BatchNorm layers folded away.

    Parameters
    ----------
    model : torch.nn.Module
        The network, in eval mode. It is not modified.
    example : torch.Tensor
        An input batch of the shape the network takes (one image is enough), on the
        network's device; used to find the pairs and to check the view.

    Returns
    -------
    torch.nn.Module
        A network computing the same function in eval mode, sharing the parameters
        and buffers of ``model``; ``model`` itself where nothing can be folded or the
        check fails.
    """
    if model.training or not any(_foldable_norm(m) for m in model.modules()):
        return model
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    view = copy.deepcopy(model, shared)
    try:
        pairs = _conv_norm_pairs(view, example)
    except RuntimeError:
        return model
    if not pairs:
        return model
    for conv_name, norm_name in pairs:
        conv = view.get_submodule(conv_name)
        norm = view.get_submodule(norm_name)
        view.set_submodule(conv_name, FoldedConv(conv, norm))  # type: ignore[arg-type]
        view.set_submodule(norm_name, _after_norm(norm))
    with torch.no_grad():
        expected = model(example).float()
        got = view(example).float()
    if got.shape != expected.shape:
        return model
    scale = float(expected.abs().max()) or 1.0
    if float((got - expected).abs().max()) > _TOLERANCE * scale:
        return model
    return view
