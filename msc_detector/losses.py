"""Training objectives: the mean-shifted contrastive loss and the paper's baselines.

Each loss has a functional core taking the two views' L2-normalised features
``z1, z2`` of shape ``(B, D)`` and the fixed centre ``c`` of shape ``(D,)``, plus a
small :class:`torch.nn.Module` wrapper. All of them return a scalar tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOSSES",
    "AngularCenterLoss",
    "CenterLoss",
    "ContrastiveLoss",
    "MeanShiftedContrastiveLoss",
    "angular_center_loss",
    "center_loss",
    "make_loss",
    "mean_shifted_contrastive_loss",
    "nt_xent_loss",
]


def nt_xent_loss(u1: torch.Tensor, u2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (InfoNCE) over two views, with the other ``2B - 2`` views as negatives.

    Parameters
    ----------
    u1, u2 : torch.Tensor of shape (B, D)
        L2-normalised vectors of the first and second view of each image.
    temperature : float
        Softmax temperature.

    Returns
    -------
    torch.Tensor
        Scalar: the mean over all ``2B`` views of ``-log softmax`` of the positive pair.
    """
    batch = u1.shape[0]
    u = torch.cat([u1, u2], dim=0)  # (2B, D)
    logits = (u @ u.T) / temperature  # (2B, 2B) cosine similarities / T
    self_mask = torch.eye(2 * batch, dtype=torch.bool, device=u.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # a view is not its own negative
    twin = torch.arange(2 * batch, device=u.device).roll(batch)  # i <-> i + B
    return F.cross_entropy(logits, twin)


def _shift(z: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    return F.normalize(z - center, dim=1)


def mean_shifted_contrastive_loss(
    z1: torch.Tensor, z2: torch.Tensor, center: torch.Tensor, temperature: float = 0.25
) -> torch.Tensor:
    """NT-Xent on features shifted by the centre and re-normalised.

    Parameters
    ----------
    z1, z2 : torch.Tensor of shape (B, D)
        L2-normalised features of the two views.
    center : torch.Tensor of shape (D,)
        Mean of the normalised pretrained features of the training set.
    temperature : float, default=0.25

    Returns
    -------
    torch.Tensor
    """
    return nt_xent_loss(_shift(z1, center), _shift(z2, center), temperature)


def angular_center_loss(z1: torch.Tensor, z2: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Squared distance of both views to the normalised centre, averaged over the batch.

    Parameters
    ----------
    z1, z2 : torch.Tensor of shape (B, D)
    center : torch.Tensor of shape (D,)
        Normalised inside this function.

    Returns
    -------
    torch.Tensor
    """
    c = F.normalize(center, dim=0)
    return ((z1 - c) ** 2).sum(dim=1).mean() + ((z2 - c) ** 2).sum(dim=1).mean()


def center_loss(z1: torch.Tensor, z2: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """PANDA-style compactness: mean squared distance of the features to the centre.

    Parameters
    ----------
    z1, z2 : torch.Tensor of shape (B, D)
    center : torch.Tensor of shape (D,)
        Used as it is (the mean of normalised features, not re-normalised).

    Returns
    -------
    torch.Tensor
    """
    z = torch.cat([z1, z2], dim=0)
    return ((z - center) ** 2).sum(dim=1).mean()


class MeanShiftedContrastiveLoss(nn.Module):
    """Module form of :func:`mean_shifted_contrastive_loss`, optionally plus the angular term.

    Parameters
    ----------
    temperature : float, default=0.25
    angular : bool, default=False
        Add :func:`angular_center_loss` ("MSC + angular").
    """

    def __init__(self, temperature: float = 0.25, angular: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.angular = angular

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """Return the loss for one batch of two views."""
        loss = mean_shifted_contrastive_loss(z1, z2, center, self.temperature)
        if self.angular:
            loss = loss + angular_center_loss(z1, z2, center)
        return loss


class AngularCenterLoss(MeanShiftedContrastiveLoss):
    """MSC plus the angular centre loss."""

    def __init__(self, temperature: float = 0.25) -> None:
        super().__init__(temperature, angular=True)


class ContrastiveLoss(nn.Module):
    """Standard SimCLR loss on the unshifted features (the centre is ignored).

    Parameters
    ----------
    temperature : float, default=0.25
    """

    def __init__(self, temperature: float = 0.25) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """Return the loss for one batch of two views."""
        return nt_xent_loss(z1, z2, self.temperature)


class CenterLoss(nn.Module):
    """Module form of :func:`center_loss`.

    Parameters
    ----------
    temperature : float, default=0.25
        Unused; accepted so that every loss is built the same way.
    """

    def __init__(self, temperature: float = 0.25) -> None:
        super().__init__()

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """Return the loss for one batch of two views."""
        return center_loss(z1, z2, center)


LOSSES: dict[str, type[nn.Module]] = {
    "msc": MeanShiftedContrastiveLoss,
    "msc_angular": AngularCenterLoss,
    "contrastive": ContrastiveLoss,
    "center": CenterLoss,
}


def make_loss(name: str, temperature: float) -> nn.Module:
    """Build the loss module called ``name`` (a key of :data:`LOSSES`)."""
    try:
        return LOSSES[name](temperature=temperature)
    except KeyError:
        raise ValueError(
            f"Unknown loss {name!r}; choose one of {sorted(LOSSES)} or None."
        ) from None
