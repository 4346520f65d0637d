"""Patch embeddings from a network's intermediate stages, and anomaly maps built from them.

A global embedding says whether an image as a whole looks normal; a small scratch
barely moves it. Patch-level scoring (the PatchCore family, Roth et al., CVPR 2022)
instead describes every location of a mid-level feature grid: the outputs of a
stride-8 and a stride-16 stage, each averaged over its 3x3 neighbourhood (so a patch
sees a little context), the coarser one upsampled to the finer grid, joined along the
channels. A test patch far from every normal training patch marks an anomaly there.

:class:`StageTap` records the chosen stages' outputs during the same network call that
computes an image's global embedding (see :class:`~msc_detector.embedding.Embedder`),
so the two kinds of evidence cost one pass, and joins them into the grid.
:func:`grid_to_maps` turns per-patch distances into smooth maps at the network's input
side, and :func:`map_to_image` places such a map back on an image of any size.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msc_detector.data import resized_sides

__all__ = [
    "StageTap",
    "gaussian_blur",
    "grid_to_maps",
    "map_reach",
    "map_to_image",
    "network_positions",
    "resolve_stages",
]

# Gaussian smoothing of a map, in pixels of a 224-pixel network input (PatchCore's
# sigma); scaled with the input side.
SIGMA_AT_224 = 4.0
# Strides of the stages that "auto" picks: mid-level detail with some context.
AUTO_STRIDES = (8, 16)


def _find_module(network: nn.Module, name: str) -> nn.Module | None:
    """Return the submodule ``name`` (timm writes some stage names with "_" for ".")."""
    for form in (name, name.replace("_", ".")):
        try:
            return network.get_submodule(form)
        except AttributeError:
            continue
    return None


def _probe_children(network: nn.Module, input_size: int) -> list[tuple[str, int]]:
    """(name, stride) of each top-level child whose output is a 4-D feature map."""
    found: list[tuple[str, int]] = []
    hooks = []
    for name, child in network.named_children():

        def record(module: nn.Module, inputs: Any, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[-1] > 0:
                found.append((name, max(1, round(input_size / out.shape[-1]))))

        hooks.append(child.register_forward_hook(record))
    param = next(iter(network.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with torch.no_grad():
            network(torch.zeros((1, 3, input_size, input_size), device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return found


def resolve_stages(
    network: nn.Module, stages: str | Sequence[int], input_size: int
) -> tuple[str, ...]:
    """Names of the modules whose outputs make the patch embedding.

    Parameters
    ----------
    network : torch.nn.Module
        The headless network.
    stages : "auto" or sequence of int
        ``"auto"``: the stride-8 and stride-16 stages (EfficientNet-Lite0:
        ``blocks.2`` and ``blocks.4``; ResNets: ``layer2`` and ``layer3``). Integers:
        positions in timm's ``feature_info`` or, for a network without it, among its
        top-level children that output feature maps.
    input_size : int
        The network's input side, used to find the strides of a network without
        ``feature_info``.

    Returns
    -------
    tuple of str
        Module names, in the order the network runs them.
    """
    info = list(getattr(network, "feature_info", None) or [])
    if info:
        entries = [(str(entry["module"]), int(entry["reduction"])) for entry in info]
        where = "timm feature stages"
    else:
        entries = _probe_children(network, input_size)
        where = "top-level children with feature-map outputs"
    if not entries:
        raise ValueError(
            f"{type(network).__name__} has no stage that outputs a feature map "
            "(n, C, h, w), so it gives no patches; pass patch_memory=None."
        )
    if isinstance(stages, str):
        by_stride: dict[int, str] = {}
        for name, stride in entries:
            if stride <= max(AUTO_STRIDES):
                by_stride[stride] = name  # the last module at each stride
        wanted = [by_stride[s] for s in AUTO_STRIDES if s in by_stride]
        if len(wanted) < len(AUTO_STRIDES):  # small networks: the two deepest available
            wanted = [by_stride[s] for s in sorted(by_stride)[-len(AUTO_STRIDES) :]]
        if not wanted:
            raise ValueError(
                f"{type(network).__name__} has no feature map at stride <= 16; pass "
                "patch_stages as a tuple of stage positions, or patch_memory=None."
            )
        names = wanted
    else:
        bad = [s for s in stages if not 0 <= int(s) < len(entries)]
        if bad or not stages:
            raise ValueError(
                f"patch_stages must be 'auto' or positions in [0, {len(entries) - 1}] among "
                f"the {len(entries)} {where} ({[n for n, _ in entries]}); got {tuple(stages)!r}."
            )
        names = [entries[int(s)][0] for s in sorted(set(stages))]
    for name in names:
        if _find_module(network, name) is None:
            raise ValueError(f"Cannot locate the stage module {name!r}; pass patch_stages.")
    return tuple(names)


class StageTap:
    """Records the outputs of chosen stages while a network runs, for patch embeddings.

    The tap hooks the stages only inside :meth:`recording`, and records only the calls
    made from the thread that opened it (other threads may run the same network) and
    only the first output of each stage (a second pass, such as a mirrored one, is
    ignored).

    Parameters
    ----------
    network : torch.nn.Module
        The module that runs (for example the BatchNorm-folded compute form).
    stages : sequence of str
        Module names, from :func:`resolve_stages`.
    """

    def __init__(self, network: nn.Module, stages: Sequence[str]) -> None:
        self.stages = tuple(stages)
        self.modules = [_find_module(network, name) for name in self.stages]
        if any(module is None for module in self.modules):
            raise RuntimeError(f"The network has no stages {self.stages}.")

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[int, torch.Tensor]]:
        """Yield a dict of ``position -> output`` that the hooked stages fill."""
        outputs: dict[int, torch.Tensor] = {}
        thread = threading.get_ident()

        def hook(position: int) -> Any:
            def record(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
                if threading.get_ident() == thread and position not in outputs:
                    outputs[position] = out

            return record

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(self.modules) if m]
        try:
            yield outputs
        finally:
            for handle in handles:
                handle.remove()

    def join(self, outputs: dict[int, torch.Tensor]) -> torch.Tensor:
        """Join recorded outputs into patch embeddings, ``(n, h, w, d)`` float32 on the CPU.

        Each stage is averaged over 3x3 neighbourhoods, the coarser grids upsampled to
        the finest, and the channels joined.
        """
        if len(outputs) != len(self.stages):
            raise RuntimeError(f"The network did not run the stages {self.stages}.")
        grids = [
            F.avg_pool2d(outputs[i].float(), 3, stride=1, padding=1, count_include_pad=False)
            for i in range(len(self.stages))
        ]
        h = max(g.shape[-2] for g in grids)
        w = max(g.shape[-1] for g in grids)
        grids = [
            g
            if g.shape[-2:] == (h, w)
            else F.interpolate(g, size=(h, w), mode="bilinear", align_corners=False)
            for g in grids
        ]
        return torch.cat(grids, dim=1).permute(0, 2, 3, 1).contiguous().cpu()


def _gaussian(sigma: float, side: int) -> tuple[int, torch.Tensor]:
    """Radius and normalised taps of a Gaussian for a side of ``side`` pixels."""
    radius = max(1, min(math.ceil(3 * sigma), side - 1))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    return radius, kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Smooth ``(n, H, W)`` maps with a separable Gaussian (reflected borders)."""
    if sigma <= 0:
        return maps
    radius, kernel = _gaussian(sigma, min(maps.shape[-2:]))
    kernel = kernel.to(maps.device)
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


@functools.lru_cache(maxsize=32)
def _map_operator(size: int, cells: int) -> torch.Tensor:
    """Return the ``(size, cells)`` matrix of :func:`grid_to_maps` along one side.

    Bilinear upsampling and the Gaussian are both linear and act on rows and columns
    separately, so a map is ``A_rows @ grid @ A_cols.T``. The matrix is made by running
    the two operations on the identity, so it is exactly what they do.
    """
    x = F.interpolate(
        torch.eye(cells)[:, None, :], size=size, mode="linear", align_corners=False
    )  # (cells, 1, size): cell c's weight at each pixel
    sigma = SIGMA_AT_224 * size / 224.0
    if sigma > 0:
        radius, kernel = _gaussian(sigma, size)
        x = F.conv1d(F.pad(x, (radius, radius), mode="reflect"), kernel.view(1, 1, -1))
    return x[:, 0, :].T.contiguous()


def grid_to_maps(distances: torch.Tensor, size: int) -> torch.Tensor:
    """Per-patch distances ``(n, h, w)`` -> smooth maps ``(n, size, size)`` (float32).

    Upsampled bilinearly to the network's input side and smoothed with a Gaussian of
    ``SIGMA_AT_224 * size / 224`` pixels (as two small matrix products per map).
    """
    h, w = distances.shape[-2:]
    rows, cols = (_map_operator(size, n).to(distances.device) for n in (h, w))
    return rows @ distances.float() @ cols.T


def map_reach(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the grid cells that each pixel of a map is made from, along one side.

    Pixel ``p`` of a map's ``size``-pixel side (see :func:`grid_to_maps`) is a weighted
    sum of cells ``first[p]`` to ``last[p]`` along that side.

    Returns
    -------
    first, last : ndarray of shape (size,), int64
    """
    used = (_map_operator(size, cells) != 0).numpy()
    first = used.argmax(axis=1)
    last = cells - 1 - used[:, ::-1].argmax(axis=1)
    return first.astype(np.int64), last.astype(np.int64)


def network_positions(
    n: int, other: int, load_size: int, size: int, squash: bool = False
) -> torch.Tensor:
    """Positions, in network-input pixels, of the centres of an image side's ``n`` pixels.

    The image (this side ``n`` pixels, the other ``other``) was resized so that its
    shorter side is ``load_size`` and centre-cropped to a square (with ``squash``: both
    sides resized to ``load_size``), then centre-cropped to ``size`` (see
    :func:`msc_detector.data.resize_square` and
    :func:`msc_detector.augment.center_crop_normalize`). Positions outside
    ``[0, size]`` were never seen by the network.
    """
    resized = resized_sides(n, other, load_size, squash)[0]
    start = (resized - load_size) // 2 + (load_size - size) // 2  # first input pixel
    return (torch.arange(n, dtype=torch.float64) + 0.5) * (resized / n) - start


def map_to_image(
    network_map: torch.Tensor,
    height: int,
    width: int,
    load_size: int,
    size: int,
    squash: bool = False,
) -> np.ndarray:
    """Place a map over the network's input back on the image it came from.

    Each image pixel takes the map's bilinear value at its position in the network
    input (:func:`network_positions`); pixels the network never saw are NaN.

    Parameters
    ----------
    network_map : torch.Tensor of shape (size, size)
    height, width : int
        The image's own size.
    load_size, size : int
        The resize side and the network's input side.
    squash : bool, default=False
        Whether the image was resized whole to the square (see :func:`network_positions`).

    Returns
    -------
    ndarray of shape (height, width), float32
    """
    gy = network_positions(height, width, load_size, size, squash) / size * 2 - 1
    gx = network_positions(width, height, load_size, size, squash) / size * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).float()
    out = F.grid_sample(
        network_map.float()[None, None].cpu(),
        grid[None],
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )[0, 0]
    out[(grid.abs() > 1).any(dim=-1)] = float("nan")
    return out.numpy().astype(np.float32, copy=False)
