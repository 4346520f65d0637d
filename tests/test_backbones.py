"""Backbone factory: names, weight sources and their errors, the frozen-layer policy."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import conftest
import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file

from msc_detector import MSCDetector, backbones
from msc_detector.backbones import (
    BUNDLED_WEIGHTS,
    BackboneSpec,
    PreprocessConfig,
    create_backbone,
    default_frozen_stages,
    freeze_stages,
    load_state_dict_file,
    rebuild_backbone,
    resolve_architecture,
    resolve_preprocess,
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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # else "auto" would try to download
    with pytest.raises(FileNotFoundError) as info:
        create_backbone("resnet18")
    message = str(info.value)
    assert "weights='/path/to/resnet18.pth'" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "timm/resnet18" in message
    assert "HF_HUB_OFFLINE is set" in message


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


# ------------------------------------------------ weights="auto" downloads through timm

# The tiny timm test architecture served by the loopback hub, and its Hugging Face repo.
TINY = "test_resnet"
TINY_REPO = timm.create_model(TINY, pretrained=False).pretrained_cfg["hf_hub_id"]


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """Answers as the Hugging Face Hub does for ``/<repo>/resolve/<revision>/<file>``."""

    server: _LoopbackHub

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        self.server.requests.append(f"{self.command} {path}")
        data = self.server.files.get(path)
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", "0123456789abcdef" * 2 + "01234567")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class _LoopbackHub(http.server.ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 only, serving ``files`` (URL path -> bytes)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.files = files
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextlib.contextmanager
def loopback_hub(files: dict[str, bytes], seconds: float = 300.0) -> Iterator[_LoopbackHub]:
    """Serve ``files`` until the block ends, or ``seconds`` pass, whichever is first."""
    server = _LoopbackHub(files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    stop = threading.Timer(seconds, server.shutdown)
    stop.daemon = True
    thread.start()
    stop.start()
    try:
        yield server
    finally:
        stop.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def hub_env(tmp_path: Path, endpoint: str, offline: bool = False) -> dict[str, str]:
    """Environment of a process whose Hugging Face Hub is ``endpoint``, caches in tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TORCH_HOME"))}
    env.update(
        HF_ENDPOINT=endpoint,  # read when huggingface_hub is imported: hence a subprocess
        HF_HOME=str(tmp_path / "hf"),
        TORCH_HOME=str(tmp_path / "torch"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_ETAG_TIMEOUT="5",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


CREATE_AUTO = """
import sys
from safetensors.torch import save_file
from msc_detector.backbones import create_backbone
try:
    backbone = create_backbone({name!r})
except FileNotFoundError as exc:
    print(exc)
    sys.exit(3)
save_file(backbone.model.state_dict(), {out!r})
print(backbone.weights_source)
"""


def create_in_subprocess(env: dict[str, str], out: Path) -> subprocess.CompletedProcess[str]:
    code = CREATE_AUTO.format(name=TINY, out=str(out))
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240
    )


@pytest.fixture(scope="module")
def hub_weights(tmp_path_factory) -> tuple[bytes, dict[str, torch.Tensor]]:
    """The tiny model's full state dict (classifier included), as the hub would serve it."""
    torch.manual_seed(7)
    state = {k: v.contiguous() for k, v in timm.create_model(TINY).state_dict().items()}
    path = tmp_path_factory.mktemp("hub") / "model.safetensors"
    save_file(state, str(path))
    return path.read_bytes(), state


def test_auto_weights_download_through_the_hub_then_come_from_the_cache(
    tmp_path: Path, hub_weights
) -> None:
    data, state = hub_weights
    files = {f"/{TINY_REPO}/resolve/main/model.safetensors": data}
    out = tmp_path / "loaded.safetensors"
    with loopback_hub(files) as hub:
        done = create_in_subprocess(hub_env(tmp_path, hub.url), out)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip().splitlines()[-1] == f"hf-hub:{TINY_REPO}"
        assert any(r.startswith("GET ") and r.endswith("model.safetensors") for r in hub.requests)
    loaded = load_file(str(out))
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}  # headless
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    # The hub is gone and the process is offline: the download is found in the local cache.
    out.unlink()
    again = create_in_subprocess(hub_env(tmp_path, hub.url, offline=True), out)
    assert again.returncode == 0, again.stdout + again.stderr
    source = again.stdout.strip().splitlines()[-1]
    assert source.startswith(str(tmp_path / "hf")) and source.endswith("model.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in load_file(str(out)).items())


def test_offline_auto_weights_name_the_file_and_download_nothing(tmp_path: Path) -> None:
    with loopback_hub({}) as hub:
        done = create_in_subprocess(hub_env(tmp_path, hub.url, offline=True), tmp_path / "x")
        assert hub.requests == []
    assert done.returncode == 3, done.stdout + done.stderr
    assert "HF_HUB_OFFLINE is set" in done.stdout
    assert f"weights='/path/to/{TINY}.pth'" in done.stdout and TINY_REPO in done.stdout


@pytest.mark.slow  # huggingface_hub retries refused connections for about 45 seconds
def test_an_unreachable_hub_gives_the_error_naming_the_file(tmp_path: Path) -> None:
    with loopback_hub({}) as hub:  # a port that was just closed: connections are refused
        endpoint = hub.url
    done = create_in_subprocess(hub_env(tmp_path, endpoint), tmp_path / "x")
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"downloading them from hf-hub:{TINY_REPO} failed" in done.stdout
    assert f"weights='/path/to/{TINY}.pth'" in done.stdout


def test_a_hub_without_the_file_gives_the_error_naming_the_file(tmp_path: Path) -> None:
    with loopback_hub({}) as hub:  # answers 404 to everything
        done = create_in_subprocess(hub_env(tmp_path, hub.url), tmp_path / "x")
        assert hub.requests
    assert done.returncode == 3, done.stdout + done.stderr
    assert "failed" in done.stdout and f"weights='/path/to/{TINY}.pth'" in done.stdout


def test_offline_set_after_import_is_honoured(monkeypatch) -> None:
    model = timm.create_model(TINY, pretrained=False, num_classes=0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(backbones.timm, "create_model", no_download)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        backbones._download_pretrained(TINY, TINY, model, {})


# ------------------------------------------------------ weights under a leading prefix


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


# ----------------------------------------------------------------- preprocessing


def test_preprocess_overrides_the_backbones_own_in_part() -> None:
    own = create_backbone("resnet18", weights=None).spec.preprocess
    spec = create_backbone(
        "resnet18", weights=None, preprocess={"mean": (0, 0, 0), "std": [1, 1, 1]}
    ).spec
    assert spec.preprocess == PreprocessConfig(
        own.input_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), own.interpolation, own.crop_pct
    )
    whole = PreprocessConfig(64, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bilinear", 1.0)
    assert resolve_preprocess(whole, own) == whole
    assert resolve_preprocess(None, own) == own


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"mean": (0, 0, 0), "sdt": (1, 1, 1)}, r"unknown keys \['sdt'\]"),
        ({"std": (1, 0, 1)}, "std must be 3 positive numbers"),
        ({"mean": (0, 0)}, "mean must be 3 finite numbers"),
        ({"mean": (0, float("nan"), 0)}, "mean must be 3 finite numbers"),
        ({"mean": "0.5"}, "mean must be 3"),
        ({"input_size": 8}, r"input_size must be an int in \[16, 4096\]"),
        ({"input_size": 224.0}, "input_size must be an int"),
        ({"interpolation": "lanczos"}, "interpolation must be one of"),
        ({"crop_pct": 0}, r"crop_pct must be a number in \(0, 1\]"),
    ],
)
def test_invalid_preprocess_is_refused_naming_the_key(override, message) -> None:
    own = PreprocessConfig(224, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)
    with pytest.raises(ValueError, match=message):
        resolve_preprocess(override, own)


# ------------------------------------------------------------------- module backbones


def small_module() -> torch.nn.Module:
    """The shared small module, 12 features wide."""
    return conftest.small_module(width=12)


def test_a_module_backbone_is_copied_and_measured() -> None:
    module = small_module().train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    backbone = create_backbone(module, preprocess=conftest.MODULE_PRE)
    assert backbone.model is not module and not backbone.model.training
    assert module.training  # the user's module is left as it was
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    spec = backbone.spec
    assert spec.num_features == 12 and spec.is_module and spec.frozen_stages == 0
    assert spec.architecture == "module:torch.nn.modules.container.Sequential"
    assert spec.preprocess == PreprocessConfig(32, (0.5,) * 3, (0.25,) * 3, "bilinear", 0.875)
    assert backbone.weights_source == spec.architecture
    assert BackboneSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        rebuild_backbone(spec, backbone.model.state_dict())


def test_a_module_backbone_keeps_parameters_its_owner_froze() -> None:
    module = small_module()
    module[0].requires_grad_(False)
    model = create_backbone(module, preprocess=conftest.MODULE_PRE).model
    assert [p.requires_grad for p in model.parameters()] == [
        p.requires_grad for p in module.parameters()
    ]


def test_a_module_backbone_needs_its_preprocessing() -> None:
    with pytest.raises(ValueError, match="missing: input_size, mean, std"):
        create_backbone(small_module())
    with pytest.raises(ValueError, match="missing: std"):
        create_backbone(small_module(), preprocess={"input_size": 32, "mean": (0, 0, 0)})


def test_a_module_backbone_takes_only_its_own_weights(tmp_path: Path) -> None:
    for weights in (None, tmp_path / "w.pth"):
        with pytest.raises(ValueError, match="brings its own weights, so weights must be 'auto'"):
            create_backbone(small_module(), weights=weights, preprocess=conftest.MODULE_PRE)


def test_a_module_without_feature_info_freezes_no_stages() -> None:
    spec = create_backbone(small_module(), frozen_stages=0, preprocess=conftest.MODULE_PRE).spec
    assert spec.frozen_stages == 0
    with pytest.raises(ValueError, match=r"frozen_stages=2 needs the stages.*feature_info"):
        create_backbone(small_module(), frozen_stages=2, preprocess=conftest.MODULE_PRE)


def test_a_timm_module_with_feature_info_can_freeze_stages() -> None:
    module = timm.create_model("resnet18", pretrained=False, num_classes=0)
    backbone = create_backbone(
        module, frozen_stages=3, preprocess={"input_size": 64, "mean": (0,) * 3, "std": (1,) * 3}
    )
    frozen = {n.split(".")[0] for n, p in backbone.model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1", "layer2"}
    assert all(p.requires_grad for p in module.parameters())  # the given module is not touched


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (
            torch.nn.Conv2d(3, 4, 3),
            r"must map \(n, 3, H, W\) images to \(n, d\).*\(2, 4, 30, 30\)",
        ),
        (torch.nn.Linear(5, 4), r"failed on a batch of shape \(2, 3, 32, 32\): RuntimeError"),
    ],
)
def test_a_module_that_is_not_headless_is_refused(module, message) -> None:
    with pytest.raises(ValueError, match=message):
        create_backbone(module, preprocess=conftest.MODULE_PRE)
