"""The HTML report: its charts, its threshold table, its escaping, and how it renders.

The last test opens a report made by the command line in a real headless Chromium
(Debian's ``chromium``, which scripts/install.sh installs), driven over the DevTools
protocol through a pipe: it takes a screenshot and checks that it is not blank, that
every embedded image loaded, that the page logged no error and does not overflow.
"""

from __future__ import annotations

import base64
import fcntl
import html
import io
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from msc_detector.cli import evaluation, main, svg
from msc_detector.cli.report import ReportData, render_report
from msc_detector.cli.thumbnails import make_thumbnail

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FAST = ["--weights", "none", "--image-size", "32", "--epochs", "2", "--batch-size", "8"]
FAST += ["--random-state", "0", "--num-workers", "0"]
HOSTILE = "<img src=x onerror=alert(1)> & \"quotes\" 'too'.png"


# ------------------------------------------------------------------------ charts


def test_nice_ticks_are_round_and_cover_the_range() -> None:
    assert svg.nice_ticks(0.0, 1.0, 5) == [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
    ticks = svg.nice_ticks(-2.63, -0.21, 6)
    assert ticks == pytest.approx([-2.5, -2.0, -1.5, -1.0, -0.5])
    assert svg.nice_ticks(3.0, 3.0) == [3.0]
    assert svg.nice_ticks(float("nan"), 1.0) == []


def test_charts_escape_their_text() -> None:
    series = svg.Series("<script>", np.array([0.1, 0.2, 0.2]), "#123456")
    chart = svg.histogram([series], title="a & b", xlabel="<x>")
    assert "<script>" not in chart
    assert "&lt;script&gt;" in chart
    assert "<title>a &amp; b</title>" in chart
    line = svg.Line("<l>", [0, 1], [0, 1], "#000", dots=True)
    chart = svg.line_chart([line], title="t", xlabel="x", ylabel="y", integer_x=True)
    assert "&lt;l&gt;" in chart
    assert chart.count("<circle") == 2


# -------------------------------------------------------------------- thresholds


def _labelled_scores(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    is_anomaly = rng.random(200) < 0.3
    scores = np.round(rng.normal(size=200) - 1.5 * is_anomaly, 1)  # rounded: ties
    return scores, is_anomaly


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_table_matches_a_brute_force_count(seed: int) -> None:
    scores, is_anomaly = _labelled_scores(seed)
    model_threshold = float(np.percentile(scores, 30))
    points = evaluation.candidate_points(
        scores, is_anomaly, model_threshold, "the threshold in use"
    )
    assert [p.threshold for p in points] == sorted(p.threshold for p in points)
    assert sum("the threshold in use" in p.names for p in points) == 1
    pos, neg = is_anomaly.sum(), (~is_anomaly).sum()
    for point in points:
        flagged = scores < point.threshold
        tp, fp = (flagged & is_anomaly).sum(), (flagged & ~is_anomaly).sum()
        assert point.flagged == flagged.sum()
        assert point.recall == pytest.approx(tp / pos)
        assert point.false_positive_rate == pytest.approx(fp / neg)
        assert point.precision == pytest.approx(tp / max(tp + fp, 1))
    model = next(p for p in points if "the threshold in use" in p.names)
    assert model.threshold == model_threshold
    # Each recall target has a row: the fewest flagged images that meet it, named by the
    # strongest target that row meets.
    distinct = np.unique(scores)
    recalls = np.array([(is_anomaly & (scores <= u)).sum() / pos for u in distinct])
    for target in evaluation.RECALL_TARGETS:
        cut = distinct[np.argmax(recalls >= target)]
        row = next(p for p in points if p.flagged == (scores <= cut).sum() and p.recall >= target)
        claims = [float(n.split()[1].rstrip("%")) / 100 for n in row.names if "catches" in n]
        assert claims and max(claims) >= target
    best = next(p for p in points if "best F1" in p.names)
    assert all(best.f1 >= p.f1 - 1e-12 for p in points)


def test_curves_match_sklearn() -> None:
    scores, is_anomaly = _labelled_scores()
    curves = evaluation.curves(scores, is_anomaly)
    assert curves is not None
    assert curves.roc_auc == pytest.approx(roc_auc_score(is_anomaly, -scores))
    assert curves.average_precision == pytest.approx(average_precision_score(is_anomaly, -scores))
    assert evaluation.curves(scores, np.zeros(200, bool)) is None


# ------------------------------------------------------------------------- HTML


def _report_data(tmp_path: Path, **changes: Any) -> ReportData:
    """A report over real PNG files, some with hostile names, without a model."""
    rng = np.random.default_rng(0)
    files = []
    for i, name in enumerate(["a.png", HOSTILE, "b.png", "c.png", "d.png", "e.png"]):
        path = tmp_path / "images" / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), np.uint8)).save(path)
        files.append(str(path))
    train = []
    for i in range(4):
        path = tmp_path / "train" / f"t<{i}>.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (300, 400), np.uint8)).save(path)  # a JPEG thumb
        train.append(str(path))
    files.append(str(tmp_path / "images" / "gone.png"))
    data = ReportData(
        model_path=str(tmp_path / "m<1>.msc"),
        metadata={
            "params": {"epochs": 1},
            "versions": {"msc_detector": "<v>"},
            "fitted": {"image_score_": "combined"},
        },
        threshold=-0.5,
        threshold_source="the model's offset_",
        paths=files,
        scores=np.array([-0.9, -0.8, -0.3, -0.2, -0.1, -0.6, np.nan]),
        neighbors=np.array([[0, 1]] * 6 + [[-1, -1]]),
        distances=np.full((7, 2), 0.5, np.float32),
        errors={6: "no such file <here>"},
        labels=np.array([1, 1, 0, 0, 0, -1, -1], np.int8),
        train_paths=train,
        train_scores=np.array([-0.4, -0.3, -0.2, -0.6]),
        history=[
            {"epoch": 1, "loss": 4.2, "seconds": 1.0},
            {"epoch": 2, "loss": 4.0, "seconds": 1.0},
        ],
        top=3,
    )
    for key, value in changes.items():
        setattr(data, key, value)
    return data


def test_report_escapes_names_and_embeds_everything(tmp_path: Path) -> None:
    document = render_report(_report_data(tmp_path))
    assert "<img src=x" not in document
    assert html.escape(HOSTILE)[:30] in document
    assert "t&lt;0&gt;.png" in document and "m&lt;1&gt;.msc" in document
    assert "no such file &lt;here&gt;" in document
    assert "msc-detector &lt;v&gt;" in document
    sources = re.findall(r'<img src="([^"]*)"', document)
    assert len(sources) >= 3 + 3 * 2 + 3  # anomalies, their neighbours, most normal
    assert all(re.fullmatch(r"data:image/(png|jpeg);base64,[A-Za-z0-9+/=]+", s) for s in sources)
    assert "data:image/jpeg" in document  # the large training images
    assert not re.search(r"(src|href)=\"(https?:|//|file:)", document)
    assert "default-src 'none'" in document and "<script" not in document
    for section in ("scores", "labels", "anomalies", "normal", "unreadable", "training"):
        assert f'id="{section}"' in document
    assert "ROC-AUC" in document and "best F1" in document


@pytest.mark.parametrize("mode", ["combined", "global", "patch"])
def test_the_report_says_what_the_models_score_is(tmp_path: Path, mode: str) -> None:
    data = _report_data(tmp_path)
    data.metadata["fitted"]["image_score_"] = mode
    text = " ".join(re.sub(r"<[^>]+>", " ", render_report(data)).split())
    scores = text.split("The score of an image is ")[1]
    assert ("nearest normal training images" in scores.split("higher is more normal")[0]) is (
        mode != "patch"
    )
    assert ("anomaly map" in scores.split("higher is more normal")[0]) is (mode != "global")


def test_report_without_labels_history_or_training_files(tmp_path: Path) -> None:
    data = _report_data(
        tmp_path,
        labels=np.full(7, -1, np.int8),
        history=[],
        train_paths=None,
        errors={},
        scores=np.array([-0.9, -0.8, -0.3, -0.2, -0.1, -0.6, -0.7]),
    )
    document = render_report(data)
    assert "No labels were given" in document
    assert "ROC-AUC" not in document
    assert "no training history" in document
    assert "fitted on arrays: no file to show" in document
    assert 'id="unreadable"' not in document


def test_report_with_one_class_of_labels(tmp_path: Path) -> None:
    document = render_report(_report_data(tmp_path, labels=np.array([0] * 7, np.int8)))
    assert "Curves need both normal and anomalous labelled images" in document
    assert "<h3>Thresholds</h3>" in document


def test_thumbnails(tmp_path: Path) -> None:
    sixteen = np.full((10, 12), 65535, np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "16.png")
    thumb = make_thumbnail(str(tmp_path / "16.png"))
    assert not isinstance(thumb, str)
    assert thumb.uri.startswith("data:image/png;base64,") and thumb.source_size == (12, 10)
    with Image.open(io.BytesIO(base64.b64decode(thumb.uri.split(",")[1]))) as small:
        assert small.convert("L").getpixel((0, 0)) == 255  # scaled to 8 bits, not clipped
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 800, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": the detector turns it upright, and so does the thumbnail
    photo.save(tmp_path / "photo.jpg", exif=exif)
    thumb = make_thumbnail(str(tmp_path / "photo.jpg"))
    assert not isinstance(thumb, str)
    assert thumb.uri.startswith("data:image/jpeg") and (thumb.width, thumb.height) == (180, 240)
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert make_thumbnail(str(tmp_path / "bad.png")).startswith("cannot read")
    assert make_thumbnail(str(tmp_path / "none.png")) == "file not found"


# ------------------------------------------------------------------ the browser


def _chromium() -> str:
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    pytest.fail(
        "The report's browser test needs Chromium, which is not installed: run "
        "'apt-get install -y chromium' (scripts/install.sh installs it)."
    )


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (no extra package)."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._id = 0
        self._buffer = b""

    def __enter__(self) -> Chromium:
        self._profile = tempfile.TemporaryDirectory()
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def pipes() -> None:  # the protocol's fixed descriptors: 3 reads, 4 writes
            # Out of the way first, so that neither dup2 clobbers the other's source.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_read, replies_write)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [
                _chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                "--remote-debugging-pipe", "--hide-scrollbars", "--no-first-run",
                f"--user-data-dir={self._profile.name}", "about:blank",
            ],
            pass_fds=(3, 4),  # closing the others comes after preexec_fn
            preexec_fn=pipes,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(commands_read)
        os.close(replies_write)
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        attached = self.send("Target.attachToTarget", targetId=target, flatten=True)
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=True)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.send("Browser.close")
            self.process.wait(timeout=10)
        except Exception:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._replies)
        self._profile.cleanup()

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._id += 1
        command: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            command["sessionId"] = self.session
        os.write(self._commands, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._message(deadline)
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, event: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._message(deadline))

    def evaluate(self, expression: str) -> Any:
        reply = self.send(
            "Runtime.evaluate", session=True, expression=expression, returnByValue=True
        )
        return reply["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries (CSP, failed loads)."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:300])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in (
                "error",
                "assert",
            ):
                found.append(json.dumps(params.get("args"))[:300])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(params["entry"].get("text", "")[:300])
        return found


def render_in_chromium(page: Path, screenshot: Path, width: int = 1280) -> dict[str, Any]:
    """Open ``page``, take a full-page screenshot, and return what the page reports."""
    with Chromium() as browser:
        browser.send("Emulation.setDeviceMetricsOverride", session=True, width=width,
                     height=900, deviceScaleFactor=1, mobile=False)  # fmt: skip
        browser.send("Page.navigate", session=True, url=page.resolve().as_uri())
        browser.wait_for("Page.loadEventFired")
        images = browser.evaluate(
            "[...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, alt: i.alt}))"
        )
        overflow = browser.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        height = browser.evaluate("document.documentElement.scrollHeight")
        browser.send("Emulation.setDeviceMetricsOverride", session=True, width=width,
                     height=height, deviceScaleFactor=1, mobile=False)  # fmt: skip
        shot = browser.send("Page.captureScreenshot", session=True, format="png")
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return {"images": images, "overflow": overflow, "errors": browser.errors()}


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report made by the command line, on folders of real images (one hostile name)."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("report")
    digits = load_digits()
    images = np.kron(
        np.round(digits.images * 255 / 16).astype(np.uint8), np.ones((4, 4), np.uint8)
    )
    sevens, others = images[digits.target == 7], images[digits.target != 7]
    for folder, chosen in (("train", sevens[:20]), ("good", sevens[20:26]), ("bad", others[:6])):
        (root / folder).mkdir()
        for i, image in enumerate(chosen):
            Image.fromarray(image).save(root / folder / f"{folder}_{i}.png")
    Image.fromarray(others[7]).save(root / "bad" / HOSTILE)
    (root / "bad" / "broken.png").write_bytes(b"not an image")
    model = root / "model.msc"
    assert main(["fit", str(root / "train"), "-o", str(model), *FAST, "-q"]) == 0
    page = root / "report.html"
    args = ["report", str(model), "--good", str(root / "good"), "--bad", str(root / "bad")]
    assert main([*args, "-o", str(page), "--top", "5", "-q"]) == 0
    return page


@pytest.mark.parametrize("width", [1280, 760])
def test_report_renders_in_chromium(report_page: Path, tmp_path: Path, width: int) -> None:
    screenshot = tmp_path / "report.png"
    seen = render_in_chromium(report_page, screenshot, width)
    assert seen["errors"] == []
    assert len(seen["images"]) >= 5 + 5 * 3 + 5  # anomalies, neighbours, most normal
    assert [i["alt"] for i in seen["images"] if not i["ok"]] == []
    assert seen["overflow"] <= 0, "the page is wider than the window"
    with Image.open(screenshot) as shot:
        assert shot.width == width and shot.height > 2000
        pixels = np.asarray(shot.convert("L"), dtype=float)
    assert pixels.std() > 20  # not blank
    assert (pixels < 128).mean() > 0.05  # dark pixels: text, charts, thumbnails
