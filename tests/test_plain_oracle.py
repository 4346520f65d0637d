"""``benchmarks.plain`` as an oracle for the detector's embedding and kNN scoring.

The plain reference embeds each image through torchvision PIL transforms in fp32, keeps
the network's BatchNorm layers as they are, and scores with an exact
``faiss.IndexFlatL2`` and the sum of squared distances to the k nearest. Without
fine-tuning (``loss=None`` on the detector, ``epochs=0`` on the plain side) and from the
same weights, the two must give the same embeddings and scores, up to fp32 rounding.

Both sides load one random-weight network from a file: ``weights=None`` would give
each side a network drawn from its own seed.

The images are already at the network's input size, so that neither side resizes.
The two resizers are not the same function: PIL's bicubic and the detector's
(``torch.nn.functional.interpolate``) differ by up to 6 grey levels on noise enlarged
from 20 to 32 pixels, and a random network turns that into score differences of a few
percent. Everything after resizing is compared: grey to RGB, scaling and
normalisation, the network (BatchNorm folded on the detector's side), the L2
normalisation, the index and the sum over neighbours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.plain import PlainMSC, msc_loss
from msc_detector import MSCDetector
from msc_detector.backbones import create_backbone
from msc_detector.losses import mean_shifted_contrastive_loss

SIZE = 32  # the network's input side, and the images'


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised EfficientNet-Lite0, saved so that both sides load it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_backbone("efficientnet_lite0", None).model
    path = tmp_path_factory.mktemp("weights") / "random_lite0.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("shape", [(SIZE, SIZE), (SIZE, SIZE, 3)], ids=["grey", "rgb"])
def test_plain_knn_scores_are_the_detectors_without_fine_tuning(
    weights: Path, shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(30, *shape), dtype=np.uint8)
    test = rng.integers(0, 256, size=(20, *shape), dtype=np.uint8)
    detector = MSCDetector(
        weights=str(weights),
        loss=None,
        flip_average=False,
        nearest_view=False,
        image_size=SIZE,
        crop_pct=1.0,
        precision="fp32",
        device="cpu",
        batch_size=8,
        random_state=0,
        image_score="global",  # the oracle has the kNN score only
    ).fit(train)
    with torch.random.fork_rng(devices=[]):  # PlainMSC seeds torch's global generator
        plain = PlainMSC(
            weights=weights,
            epochs=0,
            image_size=SIZE,
            crop_pct=1.0,
            batch_size=8,
            n_neighbors=detector.n_neighbors,
        ).fit(train)

    np.testing.assert_allclose(detector.transform(test), plain.embed(test), rtol=0, atol=1e-5)
    expected = plain.anomaly_scores(test)
    assert expected.min() > 0  # noise is far from noise: the comparison is not 0 == 0
    np.testing.assert_allclose(-detector.score_samples(test), expected, rtol=1e-5, atol=1e-7)


def test_plain_msc_loss_is_the_packages() -> None:
    gen = torch.Generator().manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=1)
    z2 = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=1)
    center = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=1).mean(0)
    torch.testing.assert_close(
        msc_loss(z1, z2, center, 0.25),
        mean_shifted_contrastive_loss(z1, z2, center, 0.25),
        rtol=1e-6,
        atol=1e-6,
    )
