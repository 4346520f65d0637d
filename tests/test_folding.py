"""Folding eval-mode BatchNorm into convolutions changes speed, never the function."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from msc_detector import MSCDetector
from msc_detector.backbones import freeze_stages
from msc_detector.folding import FoldedConv, conv2d_same, fold_batchnorm
from msc_detector.runtime import Precision


def _randomise_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


def _networks() -> list[nn.Module]:
    torch.manual_seed(0)
    lite = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    resnet = torchvision.models.resnet18(weights=None)
    resnet.fc = nn.Identity()
    return [_randomise_statistics(lite), _randomise_statistics(resnet)]


@pytest.mark.parametrize("index", [0, 1], ids=["timm-efficientnet-lite0", "torchvision-resnet18"])
def test_view_computes_the_same_function_and_gradients(index: int) -> None:
    model = _networks()[index].double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 64, 64, dtype=torch.double)
    view = fold_batchnorm(model, x[:1])
    assert view is not model
    n_folded = sum(isinstance(m, FoldedConv) for m in view.modules())
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_folded == n_norms  # every BatchNorm in these networks follows a convolution

    grads = []
    for net in (model, view):
        model.zero_grad(set_to_none=True)
        out = net(x)
        out.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if net is model:
            expected = out.detach()
    torch.testing.assert_close(out.detach(), expected, rtol=1e-10, atol=1e-10)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # The original network, its names and its values are untouched.
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_training_the_view_trains_the_original_network() -> None:
    model = _networks()[0].double()  # float64: thread counts cannot change the sums
    freeze_stages(model, 3)
    reference = pickle.loads(pickle.dumps(model))
    x = torch.randn(4, 3, 64, 64, dtype=torch.double)
    view = fold_batchnorm(model, x[:1])
    for net, owner in ((view, model), (reference, reference)):
        params = [p for p in owner.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    # Inference uses the cached folded weights, refreshed after the update.
    with torch.no_grad():
        torch.testing.assert_close(view(x), reference(x), rtol=1e-9, atol=1e-12)


def test_cache_filled_under_inference_mode_serves_training() -> None:
    model = _networks()[0]
    freeze_stages(model, 3)
    x = torch.randn(2, 3, 64, 64)
    view = fold_batchnorm(model, x[:1])
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(0)  # a new version: the caches filled by the check are stale
    with torch.inference_mode():
        view(x)  # caches every layer again, frozen ones included
    view(x.requires_grad_(True)).sum().backward()  # no "inference tensor" error
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_cache_follows_in_place_changes() -> None:
    model = _networks()[1]
    x = torch.randn(2, 3, 64, 64)
    view = fold_batchnorm(model, x[:1])
    with torch.no_grad():
        view(x)  # fills the caches
        model.conv1.weight.mul_(2.0)
        model.bn1.running_var.add_(1.0)
        torch.testing.assert_close(view(x), model(x), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_training_step_matches_unfolded() -> None:
    model = _networks()[0].to(memory_format=torch.channels_last)
    freeze_stages(model, 3)
    precision = Precision("bf16", "cpu", channels_last=True)
    x = torch.randn(8, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    view = fold_batchnorm(model, x[:1])
    losses = []
    for net in (model, view):
        with precision.train_autocast():
            losses.append(float(net(x).detach().float().pow(2).mean()))
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)


@pytest.mark.parametrize("size", [7, 8, 15, 56])
@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "groups"),
    [
        (3, 2, 1, 4),
        (5, 2, 1, 4),
        (3, 1, 1, 1),
        (1, 2, 1, 1),
        (4, 2, 1, 1),
        (3, 2, 2, 4),
    ],
)
def test_conv2d_same_matches_timm(
    size: int, kernel: int, stride: int, dilation: int, groups: int
) -> None:
    torch.manual_seed(size)
    reference = timm.layers.create_conv2d(
        4, 8, kernel, stride=stride, dilation=dilation, padding="same", groups=groups
    ).double()
    if type(reference).__name__ != "Conv2dSame":  # timm pads statically where it can
        reference = timm.layers.Conv2dSame(
            4, 8, kernel, stride=stride, dilation=dilation, groups=groups
        ).double()
    x = torch.randn(2, 4, size, size + 1, dtype=torch.double, requires_grad=True)
    expected = reference(x)
    (expected_dx,) = torch.autograd.grad(expected.sum(), x)
    weight = reference.weight.detach().clone().requires_grad_(True)
    got = conv2d_same(x, weight, reference.bias, (stride, stride), (dilation, dilation), groups)
    dx, dw = torch.autograd.grad(got.sum(), (x, weight))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(dx, expected_dx)
    (expected_dw,) = torch.autograd.grad(reference(x).sum(), reference.weight)
    torch.testing.assert_close(dw, expected_dw)


class _ConvUsedTwice(nn.Module):
    """A convolution whose output feeds a BatchNorm and a skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_unfoldable_networks_are_returned_unchanged() -> None:
    x = torch.randn(1, 3, 16, 16)
    no_norm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    assert fold_batchnorm(no_norm, x) is no_norm
    shared = _randomise_statistics(_ConvUsedTwice())
    assert fold_batchnorm(shared, x) is shared  # folding would change the skip branch
    training = _randomise_statistics(_ConvUsedTwice()).train()
    assert fold_batchnorm(training, x) is training


def test_detector_computes_with_the_folded_view(
    fast_params: dict, images: np.ndarray, tmp_path
) -> None:
    det = MSCDetector(**fast_params).fit(images)
    network, view = det.embedder_._folded[id(det.backbone_)]  # (network, its folded view)
    assert network is det.backbone_
    assert any(isinstance(m, FoldedConv) for m in view.modules())
    assert not any(isinstance(m, FoldedConv) for m in det.backbone_.modules())
    scores = det.score_samples(images)
    # The view is a cache of the embedder: never pickled or saved, rebuilt on demand.
    restored = pickle.loads(pickle.dumps(det))
    assert restored.embedder_._folded == {}
    np.testing.assert_allclose(restored.score_samples(images), scores, rtol=1e-5, atol=1e-6)
    det.save(tmp_path / "model.msc")
    loaded = MSCDetector.load(tmp_path / "model.msc")
    np.testing.assert_allclose(loaded.score_samples(images), scores, rtol=1e-5, atol=1e-6)
