"""Training views and the evaluation transform, as batched tensor operations.

The training augmentation follows the SimCLR / MoCo-v2 recipe of the reference
(random resized crop with scale 0.2-1, colour jitter 0.4/0.4/0.4/0.1 with p=0.8,
grayscale p=0.2, Gaussian blur sigma 0.1-2 with p=0.5, horizontal flip), but every
step runs on a whole batch at once, on whatever device the batch lives on, with
independent random parameters per image:

* the crops of all images are cut and resized in one ``roi_align`` call;
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

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

__all__ = ["AugmentConfig", "TwoViewAugment", "center_crop_normalize", "normalize"]

# RGB -> luma weights (ITU-R 601), as in torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ, used for hue rotation.
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


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


class TwoViewAugment:
    """Batched SimCLR-style augmentation with independent parameters per image.

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
        self, batch: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return two independently augmented, normalised views of a uint8 batch.

        Parameters
        ----------
        batch : torch.Tensor
            ``uint8`` ``(B, 3, H, W)``, on any device.
        generator : torch.Generator
            CPU generator drawing every random parameter (reproducibility).

        Returns
        -------
        tuple of torch.Tensor
            Two ``float32`` tensors ``(B, 3, size, size)``.
        """
        x = batch.float().div_(255.0)
        return self.view(x, generator), self.view(x, generator)

    def view(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One augmented, normalised view of a float batch in [0, 1]."""
        out = self._crop(x, generator)
        out = self._flip(out, generator)
        out = self._jitter(out, generator)
        out = self._grayscale(out, generator)
        out = self._blur(out, generator)
        return normalize(out, self.mean, self.std)

    def _draw(
        self, p: float, n: int, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        return (torch.rand(n, generator=generator) < p).to(device).view(n, 1, 1, 1)

    def _crop(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random resized crop: 10 tries per image, falling back to the whole image."""
        n, _, h, w = x.shape
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
        boxes = torch.stack([torch.arange(n, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1)
        return roi_align(
            x, boxes.to(x.device, x.dtype), output_size=self.size, sampling_ratio=-1, aligned=True
        ).clamp_(0.0, 1.0)

    def _flip(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mask = self._draw(self.config.flip_p, x.shape[0], generator, x.device)
        return torch.where(mask, x.flip(-1), x)

    def _jitter(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        b, c, s, hue = self.config.jitter
        apply = self._draw(self.config.jitter_p, n, generator, x.device)

        def factor(strength: float) -> torch.Tensor:
            f = _uniform(n, max(0.0, 1 - strength), 1 + strength, generator)
            return f.to(x.device, x.dtype).view(n, 1, 1, 1)

        fb, fc, fs = factor(b), factor(c), factor(s)
        angle = (_uniform(n, -hue, hue, generator) * 2 * math.pi).to(x.device, x.dtype)
        y = (x * fb).clamp(0, 1)
        mean = _gray(y).mean(dim=(2, 3), keepdim=True)
        y = ((y - mean) * fc + mean).clamp(0, 1)
        gray = _gray(y)
        y = ((y - gray) * fs + gray).clamp(0, 1)
        y = self._rotate_hue(y, angle).clamp(0, 1)
        return torch.where(apply, y, x)

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

    def _grayscale(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mask = self._draw(self.config.grayscale_p, x.shape[0], generator, x.device)
        return torch.where(mask, _gray(x).expand_as(x), x)

    def _blur(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, ch, h, w = x.shape
        apply = self._draw(self.config.blur_p, n, generator, x.device)
        scale = self.size / 224.0
        sigma = _uniform(n, *self.config.blur_sigma, generator) * scale
        radius = max(1, math.ceil(2 * float(self.config.blur_sigma[1]) * scale))
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1)) ** 2)
        kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.device, x.dtype)  # (n, k)
        kernel = kernel.repeat_interleave(ch, dim=0)  # one kernel per (image, channel)
        k = kernel.shape[1]
        flat = x.reshape(1, n * ch, h, w)
        flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
        flat = F.conv2d(flat, kernel.view(n * ch, 1, k, 1), groups=n * ch)
        flat = F.conv2d(flat, kernel.view(n * ch, 1, 1, k), groups=n * ch)
        return torch.where(apply, flat.view(n, ch, h, w), x)
