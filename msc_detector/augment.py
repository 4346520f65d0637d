"""Training views and the evaluation transform, as batched tensor operations.

The training augmentation follows the SimCLR / MoCo-v2 recipe of the reference
(random resized crop with scale 0.2-1, colour jitter 0.4/0.4/0.4/0.1 with p=0.8,
grayscale p=0.2, Gaussian blur sigma 0.1-2 with p=0.5, horizontal flip), but every
step runs on many images at once (the whole batch on a GPU, cache-sized slices of it
on a CPU), on whatever device the batch lives on, with independent random parameters
per image:

* the crops are cut and resized in one ``roi_align`` call (per slice);
* flips, jitter and grayscale are masked element-wise blends;
* the blur is one grouped convolution with a different kernel per image.

Colour jitter applies brightness, contrast, saturation and hue in a fixed order
(torchvision shuffles the order per image), and hue is rotated in YIQ space
rather than converted through HSV. Both are documented simplifications that keep
the operation batched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

__all__ = ["AugmentConfig", "TwoViewAugment", "center_crop_normalize", "normalize"]

# RGB -> luma weights (ITU-R 601), as in torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ, used for hue rotation.
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
# Bytes of float images augmented at once on the CPU, so that they stay in cache.
_CPU_CHUNK_BYTES = 3 * 2**20


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of the training augmentation (reference defaults).

    Attributes
    ----------
    crop_scale : tuple of float
        Range of the crop's area as a fraction of the image.
    crop_ratio : tuple of float
        Range of the crop's aspect ratio.
    jitter : tuple of float
        Brightness, contrast, saturation, hue strengths.
    jitter_p, grayscale_p, blur_p, flip_p : float
        Probabilities of each step.
    blur_sigma : tuple of float
        Blur sigma range, in pixels of a 224-pixel image (scaled to the output size).
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Scale a batch in [0, 1] by per-channel ``mean`` and ``std``."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def center_crop_normalize(
    batch: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Centre-crop a pre-resized uint8 batch and normalise it (the evaluation transform).

    Parameters
    ----------
    batch : torch.Tensor
        ``uint8`` of shape ``(n, 3, S, S)``, ``S >= size``.
    size : int
        Output side.
    mean, std : sequence of float

    Returns
    -------
    torch.Tensor
        ``float32`` of shape ``(n, 3, size, size)``.
    """
    side = batch.shape[-1]
    top = (side - size) // 2
    crop = batch[..., top : top + size, top : top + size]
    return normalize(crop.float().div_(255.0), mean, std)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


class _ViewParams(NamedTuple):
    """Random parameters of one view, one row per image (CPU tensors)."""

    boxes: torch.Tensor  # (n, 4): crop x0, y0, x1, y1 in input pixels
    flip: torch.Tensor  # (n,) bool
    jitter: torch.Tensor  # (n,) bool
    factors: torch.Tensor  # (n, 3): brightness, contrast, saturation factors
    hue: torch.Tensor  # (n,): hue rotation, radians
    gray: torch.Tensor  # (n,) bool
    blur: torch.Tensor  # (n,) bool
    sigma: torch.Tensor  # (n,): blur sigma, output pixels

    def rows(self, start: int, stop: int) -> _ViewParams:
        return _ViewParams(*(t[start:stop] for t in self))


def _mask(flags: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return flags.to(x.device).view(-1, 1, 1, 1)


class TwoViewAugment:
    """Batched SimCLR-style augmentation with independent parameters per image.

    All random parameters of a batch are drawn first (from a CPU generator, so they
    do not depend on the device). On the CPU the images are then augmented a few at
    a time, so that the intermediate float images stay in cache: at 224 pixels this
    is about 4x faster than one pass over a batch of 64.

    Parameters
    ----------
    size : int
        Side of the output views.
    mean, std : sequence of float
        Normalisation applied last.
    config : AugmentConfig, optional
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        config: AugmentConfig | None = None,
    ) -> None:
        self.size = size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.config = config or AugmentConfig()

    def __call__(
        self,
        batch: torch.Tensor,
        generator: torch.Generator,
        part: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return two independently augmented, normalised views of a uint8 batch.

        Parameters
        ----------
        batch : torch.Tensor
            ``uint8`` ``(B, 3, H, W)``, on any device.
        generator : torch.Generator
            CPU generator drawing every random parameter (reproducibility).
        part : tuple of int, optional
            ``(start, total)``: ``batch`` is rows ``start`` to ``start + B`` of a batch
            of ``total`` images. The parameters are drawn for all ``total`` images, as
            for the whole batch, and only these rows are augmented; so each process of
            a multi-process job augments its rows of a global batch as one process would.

        Returns
        -------
        tuple of torch.Tensor
            Two ``float32`` tensors ``(B, 3, size, size)``.
        """
        n, _, h, w = batch.shape
        first, total = (0, n) if part is None else part
        params = tuple(self._draw(total, h, w, generator).rows(first, first + n) for _ in range(2))
        step = self._chunk_size(batch)
        parts: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for start in range(0, n, step):
            x = batch[start : start + step].float().div_(255.0)
            for out, p in zip(parts, params, strict=True):
                out.append(self._apply(x, p.rows(start, start + step)))
        return _join(parts[0]), _join(parts[1])

    def view(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One augmented, normalised view of a float batch in [0, 1]."""
        n, _, h, w = x.shape
        params = self._draw(n, h, w, generator)
        step = self._chunk_size(x)
        return _join(
            [
                self._apply(x[start : start + step], params.rows(start, start + step))
                for start in range(0, n, step)
            ]
        )

    def _chunk_size(self, batch: torch.Tensor) -> int:
        """Images augmented at once: the whole batch on GPUs, a cache-sized slice on CPUs."""
        if batch.device.type != "cpu":
            return max(1, batch.shape[0])
        per_image = 3 * 4 * max(batch.shape[-2] * batch.shape[-1], self.size**2)
        return max(1, _CPU_CHUNK_BYTES // per_image)

    def _draw(self, n: int, h: int, w: int, generator: torch.Generator) -> _ViewParams:
        """Draw every random parameter of one view of ``n`` images of ``h x w`` pixels."""
        cfg = self.config
        boxes = self._draw_crops(n, h, w, generator)
        flip = torch.rand(n, generator=generator) < cfg.flip_p
        jitter = torch.rand(n, generator=generator) < cfg.jitter_p
        b, c, s, hue = cfg.jitter
        factors = torch.stack(
            [_uniform(n, max(0.0, 1 - f), 1 + f, generator) for f in (b, c, s)], dim=1
        )
        angle = _uniform(n, -hue, hue, generator) * 2 * math.pi
        gray = torch.rand(n, generator=generator) < cfg.grayscale_p
        blur = torch.rand(n, generator=generator) < cfg.blur_p
        sigma = _uniform(n, *cfg.blur_sigma, generator) * (self.size / 224.0)
        return _ViewParams(boxes, flip, jitter, factors, angle, gray, blur, sigma)

    def _draw_crops(self, n: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
        """Random resized crop boxes: 10 tries per image, falling back to the whole image."""
        tries = 10
        area = h * w * _uniform(n * tries, *self.config.crop_scale, generator)
        log_lo, log_hi = (math.log(r) for r in self.config.crop_ratio)
        ratio = torch.exp(_uniform(n * tries, log_lo, log_hi, generator))
        cw = torch.sqrt(area * ratio).round()
        ch = torch.sqrt(area / ratio).round()
        ok = ((cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)).view(n, tries)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
        pick = first.clamp(min=0) + torch.arange(n) * tries
        cw = torch.where(first >= 0, cw[pick], torch.full((n,), float(w)))
        ch = torch.where(first >= 0, ch[pick], torch.full((n,), float(h)))
        x0 = torch.floor(torch.rand(n, generator=generator) * (w - cw + 1))
        y0 = torch.floor(torch.rand(n, generator=generator) * (h - ch + 1))
        return torch.stack([x0, y0, x0 + cw, y0 + ch], 1)

    def _apply(self, x: torch.Tensor, p: _ViewParams) -> torch.Tensor:
        """Augment and normalise a float batch in [0, 1] with drawn parameters."""
        out = self._crop(x, p.boxes)
        out = torch.where(_mask(p.flip, out), out.flip(-1), out)
        out = self._jitter(out, p)
        out = torch.where(_mask(p.gray, out), _gray(out).expand_as(out), out)
        out = self._blur(out, p.blur, p.sigma)
        return normalize(out, self.mean, self.std)

    def _crop(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        index = torch.arange(x.shape[0], dtype=torch.float32).view(-1, 1)
        rois = torch.cat([index, boxes], dim=1).to(x.device, x.dtype)
        return roi_align(x, rois, output_size=self.size, sampling_ratio=-1, aligned=True).clamp_(
            0.0, 1.0
        )

    def _jitter(self, x: torch.Tensor, p: _ViewParams) -> torch.Tensor:
        n = x.shape[0]
        factors = p.factors.to(x.device, x.dtype)
        fb, fc, fs = (factors[:, i].view(n, 1, 1, 1) for i in range(3))
        y = (x * fb).clamp(0, 1)
        mean = _gray(y).mean(dim=(2, 3), keepdim=True)
        y = ((y - mean) * fc + mean).clamp(0, 1)
        gray = _gray(y)
        y = ((y - gray) * fs + gray).clamp(0, 1)
        y = self._rotate_hue(y, p.hue.to(x.device, x.dtype)).clamp(0, 1)
        return torch.where(_mask(p.jitter, x), y, x)

    @staticmethod
    def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        to_yiq = torch.tensor(_RGB_TO_YIQ, dtype=x.dtype, device=x.device)
        from_yiq = torch.linalg.inv(to_yiq)
        cos, sin = torch.cos(angle), torch.sin(angle)
        n = x.shape[0]
        rot = torch.zeros(n, 3, 3, dtype=x.dtype, device=x.device)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
        rot[:, 2, 1], rot[:, 2, 2] = sin, cos
        m = from_yiq @ rot @ to_yiq  # (n, 3, 3)
        return torch.einsum("nij,njhw->nihw", m, x)

    def _blur(self, x: torch.Tensor, apply: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        n, ch, h, w = x.shape
        radius = max(1, math.ceil(2 * float(self.config.blur_sigma[1]) * self.size / 224.0))
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1)) ** 2)
        kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.device, x.dtype)  # (n, k)
        kernel = kernel.repeat_interleave(ch, dim=0)  # one kernel per (image, channel)
        k = kernel.shape[1]
        flat = x.reshape(1, n * ch, h, w)
        flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
        flat = F.conv2d(flat, kernel.view(n * ch, 1, k, 1), groups=n * ch)
        flat = F.conv2d(flat, kernel.view(n * ch, 1, 1, k), groups=n * ch)
        return torch.where(_mask(apply, x), flat.view(n, ch, h, w), x)


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)
