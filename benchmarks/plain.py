"""A plain reference of the MSC method, written the way the paper's research script works.

* fp32, NCHW, no autocast, no BatchNorm folding;
* every image goes through torchvision (v1) PIL transforms one at a time, inside a
  ``Dataset`` behind a plain ``DataLoader``: ``Resize`` + ``CenterCrop`` to embed, the
  SimCLR augmentation (random resized crop, colour jitter, grey, blur, flip) to train;
* the mean-shifted contrastive loss written out here, in the reference's form
  (features shifted by the training centre, re-normalised, NT-Xent with ``exp``);
* an exact ``faiss.IndexFlatL2`` of the L2-normalised training features; an image's
  anomaly score is the sum of its squared distances to the ``n_neighbors`` nearest.

Only the network comes from the package (:func:`msc_detector.backbones.create_backbone`),
so that both sides can start from the same weights. The network stays in eval mode
while training (fixed BatchNorm statistics), as the detector's does.

``benchmarks.speed`` times it against :class:`msc_detector.MSCDetector`, and the tests
use it as an oracle (``tests/test_plain_oracle.py``): without fine-tuning, its scores
are the detector's.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


class PILGaussianBlur:
    """Blur a PIL image with a Gaussian of random sigma (SimCLR / MoCo-v2 style)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, image: Any) -> Any:
        from PIL import ImageFilter

        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class PILImages(torch.utils.data.Dataset):
    """uint8 arrays (grey or RGB) served as RGB PIL images through a per-image transform."""

    def __init__(self, images: np.ndarray, transform: Callable[[Any], Any], views: int = 1):
        self.images = images
        self.transform = transform
        self.views = views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        image = Image.fromarray(self.images[i]).convert("RGB")
        if self.views == 1:
            return self.transform(image)
        return tuple(self.transform(image) for _ in range(self.views))


def msc_loss(
    z1: torch.Tensor, z2: torch.Tensor, center: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean-shifted contrastive loss of two views' L2-normalised features ``(B, D)``.

    Each feature is shifted by the centre and re-normalised; then every view's positive
    is the other view of its image and its negatives are the other ``2B - 2`` views.
    """
    u1 = F.normalize(z1 - center, dim=1)
    u2 = F.normalize(z2 - center, dim=1)
    n = u1.shape[0]
    u = torch.cat([u1, u2])
    similarity = torch.exp(u @ u.T / temperature)
    others = ~torch.eye(2 * n, dtype=torch.bool, device=u.device)
    denominator = similarity.masked_select(others).view(2 * n, -1).sum(dim=1)
    positive = torch.exp((u1 * u2).sum(dim=1) / temperature).repeat(2)
    return -torch.log(positive / denominator).mean()


class PlainMSC:
    """The MSC recipe, written plainly: fp32, NCHW, PIL transforms per image.

    Parameters are the detector's of the same names; ``epochs=0`` is kNN on the
    network's features (the detector's ``loss=None``). ``workers`` is the number of
    ``DataLoader`` processes (the research script uses 2). ``seed`` seeds torch's and
    Python's global generators, which the random initialisation (``weights=None``), the
    shuffling and the PIL augmentation draw from.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        weights: str | os.PathLike[str] | None = "auto",
        *,
        frozen_stages: int | str = "auto",
        image_size: int = 224,
        crop_pct: float = 1.0,
        min_crop_area: float = 0.2,
        epochs: int = 1,
        batch_size: int = 64,
        lr: float = 1e-4,
        weight_decay: float = 5e-5,
        temperature: float = 0.25,
        n_neighbors: int = 2,
        device: str = "cpu",
        workers: int = 0,
        seed: int = 0,
    ) -> None:
        from torchvision import transforms as T

        from msc_detector.backbones import create_backbone

        torch.manual_seed(seed)
        random.seed(seed)
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.temperature = temperature
        self.n_neighbors = n_neighbors
        self.workers = workers
        self.seed = seed
        self.device = torch.device(device)
        built = create_backbone(backbone, weights, frozen_stages)
        self.model = built.model.to(self.device).eval()
        pre = built.spec.preprocess
        interpolation = T.InterpolationMode(pre.interpolation)
        normalize = T.Normalize(pre.mean, pre.std)
        blur = image_size / 224  # sigma 0.1-2 pixels at 224: the same share of the image
        load_size = max(image_size, round(image_size / crop_pct))
        self.eval_transform = T.Compose(
            [
                T.Resize(load_size, interpolation=interpolation),
                T.CenterCrop(image_size),
                T.ToTensor(),
                normalize,
            ]
        )
        self.train_transform = T.Compose(
            [
                T.RandomResizedCrop(
                    image_size, scale=(min_crop_area, 1.0), interpolation=interpolation
                ),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.RandomApply([PILGaussianBlur((0.1 * blur, 2.0 * blur))], p=0.5),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                normalize,
            ]
        )
        self.index: Any = None
        self.epoch_seconds: list[float] = []
        self.losses: list[float] = []

    def _loader(self, dataset: PILImages, batch: int, **kw: Any) -> Any:
        workers = self.workers if len(dataset) > batch else 0
        return torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, **kw)

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised fp32 features."""
        self.model.eval()
        loader = self._loader(PILImages(images, self.eval_transform), self.batch_size)
        out = [F.normalize(self.model(x.to(self.device)), dim=1).cpu().numpy() for x in loader]
        return np.concatenate(out)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def fit(self, images: np.ndarray) -> PlainMSC:
        """Fine-tune for ``epochs`` epochs, then index the training images' features."""
        import faiss

        features = self.embed(images)
        if self.epochs > 0:
            self._train(images, torch.from_numpy(features.mean(axis=0)).to(self.device))
            features = self.embed(images)
        self.index = faiss.IndexFlatL2(features.shape[1])
        self.index.add(features)
        return self

    def _train(self, images: np.ndarray, center: torch.Tensor) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        loader = self._loader(
            PILImages(images, self.train_transform, views=2),
            min(self.batch_size, len(images)),
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),
        )
        for epoch in range(self.epochs):
            self.model.eval()  # BatchNorm statistics stay fixed, as in the detector
            start = time.perf_counter()
            total = 0.0
            for view1, view2 in loader:
                z = F.normalize(self.model(torch.cat([view1, view2]).to(self.device)), dim=1)
                n = view1.shape[0]
                loss = msc_loss(z[:n], z[n:], center, self.temperature)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
            self._synchronize()
            self.epoch_seconds.append(time.perf_counter() - start)
            self.losses.append(total / max(len(loader), 1))
            print(f"[plain] epoch {epoch + 1}: {self.epoch_seconds[-1]:.1f}s")

    def anomaly_scores(self, images: np.ndarray) -> np.ndarray:
        """The sum of squared distances to the ``n_neighbors`` nearest training features."""
        dists, _ = self.index.search(self.embed(images), self.n_neighbors)
        return dists.sum(axis=1, dtype=np.float64)

    def score_samples(self, images: np.ndarray) -> np.ndarray:
        """Normality, as the detector's ``score_samples``: minus :meth:`anomaly_scores`."""
        return -self.anomaly_scores(images)
