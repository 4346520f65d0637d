"""Batched augmentation: shapes, per-image randomness, reproducibility, each step's effect."""

from __future__ import annotations

import torch

from msc_detector.augment import AugmentConfig, TwoViewAugment, center_crop_normalize, normalize

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def only(**steps: object) -> AugmentConfig:
    """A configuration with every step off (full square crops), except ``steps``."""
    off = {
        "crop_scale": (1.0, 1.0),
        "crop_ratio": (1.0, 1.0),
        "jitter_p": 0.0,
        "grayscale_p": 0.0,
        "blur_p": 0.0,
        "flip_p": 0.0,
    }
    return AugmentConfig(**{**off, **steps})  # type: ignore[arg-type]


def batch(n: int = 6, side: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)


def test_two_views_have_the_output_shape_and_range() -> None:
    aug = TwoViewAugment(24, MEAN, STD)
    v1, v2 = aug(batch(), torch.Generator().manual_seed(0))
    assert v1.shape == v2.shape == (6, 3, 24, 24)
    assert v1.dtype == torch.float32
    assert v1.min() >= -1.0 - 1e-5 and v1.max() <= 1.0 + 1e-5  # [0, 1] normalised by 0.5/0.5
    assert not torch.allclose(v1, v2)


def test_identical_images_get_independent_parameters() -> None:
    same = batch(1).expand(8, -1, -1, -1).contiguous()
    v1, _ = TwoViewAugment(24, MEAN, STD)(same, torch.Generator().manual_seed(1))
    flat = v1.flatten(1)
    distinct = {tuple(row.round(decimals=3).tolist()) for row in flat}
    assert len(distinct) == 8


def test_same_generator_seed_reproduces_views() -> None:
    aug = TwoViewAugment(24, MEAN, STD)
    a = aug(batch(), torch.Generator().manual_seed(7))
    b = aug(batch(), torch.Generator().manual_seed(7))
    c = aug(batch(), torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_with_every_step_off_a_full_crop_is_a_resize() -> None:
    off = only()
    x = batch(3, 24)
    v1, _ = TwoViewAugment(24, MEAN, STD, off)(x, torch.Generator().manual_seed(0))
    assert torch.allclose(v1, normalize(x.float() / 255, MEAN, STD), atol=1e-5)


def test_flip_and_grayscale_always_on() -> None:
    cfg = only(grayscale_p=1.0, flip_p=1.0)
    x = batch(2, 16)
    v1, _ = TwoViewAugment(16, (0, 0, 0), (1, 1, 1), cfg)(x, torch.Generator().manual_seed(0))
    assert torch.allclose(v1[:, 0], v1[:, 1]) and torch.allclose(v1[:, 1], v1[:, 2])
    luma = (x.float() / 255 * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    assert torch.allclose(v1[:, 0], luma.flip(-1), atol=1e-5)


def test_blur_smooths_and_keeps_the_mean() -> None:
    cfg = only(blur_p=1.0, blur_sigma=(2.0, 2.0))
    x = batch(2, 64)
    v1, _ = TwoViewAugment(64, (0, 0, 0), (1, 1, 1), cfg)(x, torch.Generator().manual_seed(0))
    raw = x.float() / 255
    assert v1.std() < raw.std() * 0.8
    assert torch.allclose(v1.mean(), raw.mean(), atol=0.01)


def test_crops_zoom_in() -> None:
    cfg = only(crop_scale=(0.25, 0.25))
    x = torch.zeros(4, 3, 40, 40, dtype=torch.uint8)
    x[..., ::2, :] = 255  # one-pixel stripes: a 2x zoom makes them two pixels wide
    v1, _ = TwoViewAugment(40, (0, 0, 0), (1, 1, 1), cfg)(x, torch.Generator().manual_seed(0))
    rows = v1[:, 0, :, 20]
    changes = (rows[:, 1:] - rows[:, :-1]).abs().gt(0.5).sum(1)
    assert bool((changes < 30).all())  # 39 transitions before zooming


def test_center_crop_normalize() -> None:
    x = batch(2, 30)
    out = center_crop_normalize(x, 24, MEAN, STD)
    assert out.shape == (2, 3, 24, 24)
    assert torch.allclose(out, (x[..., 3:27, 3:27].float() / 255 - 0.5) / 0.5)


def test_cpu_slices_give_the_views_of_one_pass(monkeypatch) -> None:
    import msc_detector.augment as augment

    x = batch(7, 40)
    whole = TwoViewAugment(24, MEAN, STD)(x, torch.Generator().manual_seed(5))
    monkeypatch.setattr(augment, "_CPU_CHUNK_BYTES", 1)  # one image per slice
    sliced = TwoViewAugment(24, MEAN, STD)(x, torch.Generator().manual_seed(5))
    assert torch.allclose(whole[0], sliced[0], atol=1e-6)
    assert torch.allclose(whole[1], sliced[1], atol=1e-6)
