"""The losses against naive loop implementations, plus their invariances."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msc_detector.losses import (
    LOSSES,
    angular_center_loss,
    center_loss,
    make_loss,
    mean_shifted_contrastive_loss,
    nt_xent_loss,
)


def naive_nt_xent(u1: torch.Tensor, u2: torch.Tensor, t: float) -> float:
    """One view at a time: -log(exp(sim(i, twin)/t) / sum over all other views)."""
    views = list(u1) + list(u2)
    n = len(views)
    total = 0.0
    for i in range(n):
        twin = (i + n // 2) % n
        denom = sum(math.exp(float(views[i] @ views[j]) / t) for j in range(n) if j != i)
        total += -math.log(math.exp(float(views[i] @ views[twin]) / t) / denom)
    return total / n


def unit(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=1)


@pytest.mark.parametrize("t", [0.1, 0.25, 1.0])
def test_nt_xent_matches_naive_loop(t: float) -> None:
    u1, u2 = unit((5, 7), 0), unit((5, 7), 1)
    assert float(nt_xent_loss(u1, u2, t)) == pytest.approx(naive_nt_xent(u1, u2, t), rel=1e-10)


def test_nt_xent_is_symmetric_in_the_views() -> None:
    u1, u2 = unit((6, 4), 2), unit((6, 4), 3)
    assert float(nt_xent_loss(u1, u2, 0.25)) == pytest.approx(float(nt_xent_loss(u2, u1, 0.25)))


def test_nt_xent_is_invariant_to_batch_order() -> None:
    u1, u2 = unit((6, 4), 4), unit((6, 4), 5)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    assert float(nt_xent_loss(u1[perm], u2[perm], 0.5)) == pytest.approx(
        float(nt_xent_loss(u1, u2, 0.5))
    )


def test_nt_xent_is_lower_for_aligned_views() -> None:
    u1 = unit((8, 16), 6)
    aligned = nt_xent_loss(u1, u1, 0.25)
    random = nt_xent_loss(u1, unit((8, 16), 7), 0.25)
    assert aligned < random


def test_msc_is_nt_xent_on_shifted_renormalised_features() -> None:
    z1, z2 = unit((5, 6), 8), unit((5, 6), 9)
    c = torch.cat([z1, z2]).mean(0)
    u1 = [(z - c) / torch.linalg.norm(z - c) for z in z1]
    u2 = [(z - c) / torch.linalg.norm(z - c) for z in z2]
    expected = naive_nt_xent(torch.stack(u1), torch.stack(u2), 0.25)
    assert float(mean_shifted_contrastive_loss(z1, z2, c, 0.25)) == pytest.approx(expected)


def test_msc_with_zero_center_is_the_standard_contrastive_loss() -> None:
    z1, z2 = unit((4, 5), 10), unit((4, 5), 11)
    zero = torch.zeros(5, dtype=torch.float64)
    assert float(mean_shifted_contrastive_loss(z1, z2, zero, 0.25)) == pytest.approx(
        float(make_loss("contrastive", 0.25)(z1, z2, zero))
    )


def test_msc_depends_on_the_center() -> None:
    z1, z2 = unit((4, 5), 12), unit((4, 5), 13)
    c = torch.cat([z1, z2]).mean(0)
    assert float(mean_shifted_contrastive_loss(z1, z2, c)) != pytest.approx(
        float(mean_shifted_contrastive_loss(z1, z2, torch.zeros_like(c)))
    )


def test_angular_center_loss_matches_loop() -> None:
    z1, z2 = unit((3, 4), 14), unit((3, 4), 15)
    c = torch.tensor([0.5, 0.1, -0.2, 0.3], dtype=torch.float64)
    cn = c / torch.linalg.norm(c)
    expected = (
        sum(float(((z - cn) ** 2).sum()) for z in z1) / 3
        + sum(float(((z - cn) ** 2).sum()) for z in z2) / 3
    )
    assert float(angular_center_loss(z1, z2, c)) == pytest.approx(expected)


def test_msc_angular_is_msc_plus_angular_term() -> None:
    z1, z2 = unit((4, 5), 16), unit((4, 5), 17)
    c = torch.cat([z1, z2]).mean(0)
    combined = make_loss("msc_angular", 0.25)(z1, z2, c)
    parts = mean_shifted_contrastive_loss(z1, z2, c, 0.25) + angular_center_loss(z1, z2, c)
    assert float(combined) == pytest.approx(float(parts))


def test_center_loss_matches_loop_and_vanishes_at_the_center() -> None:
    z1, z2 = unit((3, 4), 18), unit((3, 4), 19)
    c = torch.cat([z1, z2]).mean(0)
    expected = sum(float(((z - c) ** 2).sum()) for z in torch.cat([z1, z2])) / 6
    assert float(center_loss(z1, z2, c)) == pytest.approx(expected)
    same = c.expand(3, 4)
    assert float(center_loss(same, same, c)) == pytest.approx(0.0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_gives_finite_gradients(name: str) -> None:
    z = torch.randn(8, 16, requires_grad=True)
    zn = F.normalize(z, dim=1)
    c = zn.detach().mean(0)
    loss = make_loss(name, 0.25)(zn[:4], zn[4:], c)
    loss.backward()
    assert loss.ndim == 0
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_unknown_loss_names_the_choices() -> None:
    with pytest.raises(ValueError, match="msc_angular"):
        make_loss("simclr", 0.25)
