"""The msc-detector command line: inputs, outputs, per-file errors, exit codes, end to end.

Most tests call ``main`` in this process, where torch is already imported, with tiny
detectors (a random EfficientNet-Lite0 at 32 px). The chain fit -> score -> report and
the checks that need a fresh interpreter (no traceback, no torch for ``inspect``) run
in subprocesses.
"""

from __future__ import annotations

import csv
import gc
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msc_detector import MSCDetector, persistence
from msc_detector import files as scoring
from msc_detector.cli import interrupts, main
from msc_detector.cli.app import build_parser
from msc_detector.cli.errors import UserError
from msc_detector.cli.inputs import expand_images, folder_labels, read_labels
from msc_detector.files import check_readable

REPO = Path(__file__).resolve().parents[1]
# A random network at 32 px: a fit takes about a second.
FAST = ["--weights", "none", "--image-size", "32", "--epochs", "1", "--batch-size", "8"]
# fp32: under bf16 on a CPU with AMX an image's score can depend on its batch (0.3 %),
# and these tests compare scores of the same files scored in different batches.
FAST += ["--random-state", "0", "--num-workers", "0", "--precision", "fp32"]
SUBPROCESS_TIMEOUT = 300


def _labelled_images() -> tuple[np.ndarray, np.ndarray]:
    """Return real grayscale images and whether each is of the normal class."""
    try:
        from msc_detector.datasets import load_fashion_mnist

        images, labels = load_fashion_mnist("test")
        return images[:400], labels[:400] == 7  # sneakers are normal
    except FileNotFoundError:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)
        return np.kron(images[:400], np.ones((3, 3), np.uint8)), digits.target[:400] == 7


def _write(folder: Path, images: np.ndarray, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{stem}_{i:03d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train/`` (normal images in two sub-folders), ``test/good`` and ``test/bad``."""
    root = tmp_path_factory.mktemp("images")
    images, normal = _labelled_images()
    good, bad = images[normal], images[~normal]
    _write(root / "train" / "day1", good[:10], "normal")
    _write(root / "train" / "day2", good[10:20], "normal")
    _write(root / "test" / "good", good[20:26], "good")
    _write(root / "test" / "bad", bad[:6], "bad")
    return root


@pytest.fixture(scope="module")
def model(folders: Path) -> Path:
    path = folders / "model.msc"
    assert main(["fit", str(folders / "train"), "-o", str(path), *FAST, "-q"]) == 0
    return path


def _read_csv(path: Path | str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------------------ end to end


def _readme_commands() -> list[list[str]]:
    """Return the commands of the README's "Command line" section."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## Command line")[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block, "README.md's Command line section has no bash block"
    return [shlex.split(line) for line in block.group(1).strip().splitlines()]


@pytest.mark.slow
def test_the_readme_commands_go_from_two_folders_to_a_report(
    folders: Path, tmp_path: Path
) -> None:
    executable = shutil.which("msc-detector")
    if executable is None:
        pytest.fail("the msc-detector console script is missing: run 'pip install -e .'")
    fit, score, report = _readme_commands()
    assert [fit[:2], score[:2], report[:2]] == [["msc-detector", "fit"]] + [
        ["msc-detector", name] for name in ("score", "report")
    ]
    shutil.copytree(folders / "train", tmp_path / "normal")
    shutil.copytree(folders / "test", tmp_path / "new")

    done = _run(executable, *fit[1:], *FAST, cwd=tmp_path)  # FAST: a random network
    assert done.returncode == 0, done.stderr
    assert "saved the model to model.msc" in done.stdout
    offset = MSCDetector.load(tmp_path / "model.msc").offset_
    assert re.search(r"threshold \(offset_\): (\S+)", done.stdout).group(1) == f"{offset:.6g}"
    assert "epoch 1" not in done.stderr  # no progress bar where stderr is a pipe

    done = _run(executable, *score[1:], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = _read_csv(tmp_path / "scores.csv")
    assert len(rows) == 12
    assert {row["label"] for row in rows} <= {"normal", "anomaly"}
    assert all(Path(row["neighbor_1"]).parent.parent == tmp_path / "normal" for row in rows)
    assert "scoring" not in done.stderr  # no progress bar where stderr is a pipe

    done = _run(executable, *report[1:], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote the report to report.html" in done.stdout
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "No labels were given" in html
    # every image, each one's neighbours, and (the default keeps a patch bank) each one's
    # anomaly map and the training image holding the normal patch nearest to its peak
    assert html.count("<img ") == 12 + 12 * 3 + 12 * 2
    assert html.count(">anomaly map<") == 12


# ----------------------------------------------------------------------- score


def test_scores_match_the_estimator(model: Path, folders: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    assert main(["score", str(model), str(folders / "test"), "-o", str(out), "-q"]) == 0
    rows = _read_csv(out)
    paths = [row["path"] for row in rows]
    assert paths == [str(p) for p in expand_images([str(folders / "test")])]
    detector = MSCDetector.load(model)
    scores = np.array([float(row["score"]) for row in rows])
    np.testing.assert_array_equal(scores, detector.score_samples(paths))
    decisions = np.array([float(row["decision"]) for row in rows])
    np.testing.assert_array_equal(decisions, scores - detector.offset_)
    predicted = np.where(np.array([row["label"] for row in rows]) == "anomaly", -1, 1)
    np.testing.assert_array_equal(predicted, detector.predict(paths))
    distances, indices = detector.kneighbors(paths, n_neighbors=3)
    for row, nearest, dist in zip(rows, indices, distances, strict=True):
        assert [row[f"neighbor_{j}"] for j in (1, 2, 3)] == [
            detector.train_paths_[i] for i in nearest
        ]
        assert [float(row[f"neighbor_{j}_distance"]) for j in (1, 2, 3)] == pytest.approx(dist)
        assert row["error"] == ""


def test_fit_takes_the_crop_mode(folders: Path, tmp_path: Path) -> None:
    out = tmp_path / "center.msc"
    args = ["fit", str(folders / "train"), "-o", str(out), *FAST, "-q"]
    assert main([*args, "--crop-mode", "center"]) == 0
    info = persistence.inspect(out)
    assert info["fitted"]["crop_mode_"] == info["params"]["crop_mode"] == "center"
    assert main([*args, "--crop-mode", "middle"]) == 2


def test_score_writes_jsonl_and_csv_alike(model: Path, folders: Path, tmp_path: Path) -> None:
    images = str(folders / "test" / "bad")
    assert main(["score", str(model), images, "-o", str(tmp_path / "s.csv"), "-q"]) == 0
    assert main(["score", str(model), images, "-o", str(tmp_path / "s.jsonl"), "-q"]) == 0
    from_csv = _read_csv(tmp_path / "s.csv")
    lines = (tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()
    from_json = [json.loads(line) for line in lines]
    assert len(from_json) == len(from_csv) == 6
    for a, b in zip(from_csv, from_json, strict=True):
        assert list(a) == list(b)
        assert float(a["score"]) == b["score"]
        assert a["neighbor_2"] == b["neighbor_2"]
        assert b["error"] is None


def test_score_writes_parquet_or_names_the_package(
    model: Path, folders: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scores.parquet"
    status = main(["score", str(model), str(folders / "test"), "-o", str(out), "-q"])
    if importlib.util.find_spec("pyarrow") is None:
        assert status == 1
        assert "pip install pyarrow" in _one_error_line(capsys.readouterr().err)
        assert not out.exists()
        return
    import pyarrow.parquet as pq

    assert status == 0
    table = pq.read_table(out).to_pylist()
    main(["score", str(model), str(folders / "test"), "-o", str(tmp_path / "s.csv"), "-q"])
    rows = _read_csv(tmp_path / "s.csv")
    assert [r["path"] for r in table] == [r["path"] for r in rows]
    assert [r["score"] for r in table] == [float(r["score"]) for r in rows]


def test_score_to_standard_output(
    model: Path, folders: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["score", str(model), str(folders / "test" / "good")]) == 0
    out, err = capsys.readouterr()
    rows = list(csv.DictReader(out.splitlines()))
    assert len(rows) == 6
    assert "scored 6 images" in err  # the status line keeps out of the data


def test_unreadable_files_are_reported_in_their_rows(
    model: Path,
    folders: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(folders / "test" / "good", mixed)
    (mixed / "not_an_image.png").write_text("hello")
    png = (mixed / "good_000.png").read_bytes()
    (mixed / "truncated.png").write_bytes(png[: len(png) // 2])
    # A truncated JPEG passes PIL's cheap check and fails only when decoded: the chunk
    # fails, and its files are scored one by one.
    buffer = tmp_path / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(buffer)
    whole = buffer.read_bytes()
    (mixed / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    listing = tmp_path / "list.txt"
    listing.write_text(f"# files\n{mixed / 'good_001.png'}\nmissing.png\n")
    out = tmp_path / "scores.csv"
    calls = []
    explain = MSCDetector.explain

    def spy(detector: MSCDetector, paths: list[str], *args: object) -> object:
        calls.append(len(paths))
        return explain(detector, paths, *args)

    monkeypatch.setattr(MSCDetector, "explain", spy)
    status = main(["score", str(model), str(mixed), str(listing), "-o", str(out)])
    assert status == 0
    assert calls == [7] + [1] * 7  # the chunk failed on the JPEG: then file by file
    rows = {Path(row["path"]).name: row for row in _read_csv(out)}
    assert len(rows) == 10
    bad = {"not_an_image.png", "truncated.png", "truncated.jpg", "missing.png"}
    assert {name for name, row in rows.items() if row["error"]} == bad
    assert "cannot read the image" in rows["not_an_image.png"]["error"]
    assert "truncated" in rows["truncated.jpg"]["error"]
    assert rows["missing.png"]["error"] == "no such file"
    assert all(rows[name]["score"] == "" and rows[name]["label"] == "" for name in bad)
    assert all(rows[name]["false_alarm_rate"] == "" for name in bad)
    good = [row for name, row in rows.items() if name not in bad]
    detector = MSCDetector.load(model)
    expected = detector.score_samples([row["path"] for row in good])
    np.testing.assert_allclose([float(row["score"]) for row in good], expected, rtol=1e-5)
    rates = detector.false_alarm_rate([row["path"] for row in good])
    np.testing.assert_allclose([float(row["false_alarm_rate"]) for row in good], rates)
    assert "4 could not be read" in capsys.readouterr().out


def test_threshold_option_moves_labels(model: Path, folders: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    images = str(folders / "test")
    main(["score", str(model), images, "-o", str(out), "-q"])
    scores = sorted(float(row["score"]) for row in _read_csv(out))
    threshold = (scores[3] + scores[4]) / 2
    main(["score", str(model), images, "-o", str(out), "-q", "--threshold", str(threshold)])
    rows = _read_csv(out)
    assert sum(row["label"] == "anomaly" for row in rows) == 4
    for row in rows:
        assert float(row["decision"]) == float(row["score"]) - threshold


def test_neighbours_of_a_detector_fitted_on_arrays_are_indices(
    tmp_path: Path, folders: Path
) -> None:
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), np.uint8)
    detector = MSCDetector(weights=None, image_size=32, epochs=0, batch_size=4).fit(images)
    detector.save(tmp_path / "arrays.msc")
    out = tmp_path / "s.jsonl"
    args = ["score", str(tmp_path / "arrays.msc"), str(folders / "test" / "bad"), "-q"]
    assert main([*args, "-o", str(out), "--neighbors", "9"]) == 0  # at most the 4 there are
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(isinstance(row["neighbor_4"], int) for row in rows)
    assert "neighbor_5" not in rows[0]


def test_no_neighbour_columns_with_zero(model: Path, folders: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    args = ["score", str(model), str(folders / "test" / "bad"), "-o", str(out), "-q"]
    assert main([*args, "--neighbors", "0"]) == 0
    assert list(_read_csv(out)[0]) == [
        "path",
        "score",
        "decision",
        "label",
        "false_alarm_rate",
        "error",
        "path_quoted",
    ]


def test_an_interrupted_score_leaves_no_table(
    model: Path, folders: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> object:
        yield from []
        raise KeyboardInterrupt

    monkeypatch.setattr(scoring, "score_files", interrupted)
    out = tmp_path / "scores.csv"
    assert main(["score", str(model), str(folders / "test"), "-o", str(out)]) == 130
    assert list(tmp_path.iterdir()) == []  # neither the table nor a hidden partial one


def test_report_with_a_labels_file(
    model: Path, folders: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = folders / "labels.csv"
    rows = [f"test/good/{p.name},good" for p in sorted((folders / "test" / "good").iterdir())]
    rows += [f"test/bad/{p.name},bad" for p in sorted((folders / "test" / "bad").iterdir())]
    labels.write_text("path,label\n" + "\n".join(rows) + "\n")
    page = tmp_path / "report.html"
    assert main(["report", str(model), "--labels", str(labels), "-o", str(page), "-q"]) == 0
    text = page.read_text(encoding="utf-8")
    assert "12 labelled images: 6 normal, 6 anomalies" in text
    assert "ROC-AUC" in text
    # Images named on the command line take their labels from the file where it has them.
    args = ["report", str(model), str(folders / "test" / "bad"), "--labels", str(labels)]
    assert main([*args, "-o", str(page), "-q"]) == 0
    assert "6 labelled images: 0 normal, 6 anomalies" in page.read_text(encoding="utf-8")
    args = ["report", str(model), str(folders / "train"), "--labels", str(labels)]
    assert main([*args, "-o", str(page)]) == 1
    assert "none of the images has a label" in _one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------- inputs


def test_folders_are_searched_recursively_for_images(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ("a/1.png", "a/b/2.JPG", "a/b/notes.txt", "a/.3.png", ".hidden/4.png", "5.tif"):
        (tmp_path / name).write_bytes(b"")
    found = [Path(p).relative_to(tmp_path).as_posix() for p in expand_images([str(tmp_path)])]
    assert found == ["5.tif", "a/1.png", "a/b/2.JPG"]


def test_globs_lists_and_duplicates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("x1.png", "x2.png", "y.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "l.txt").write_text("# comment\n\n../y.png\n/abs/z.png\n")
    (tmp_path / "lists" / "l.csv").write_text("id,path\n1,../x2.png\n")
    (tmp_path / "lists" / "bare.csv").write_text("../x1.png,extra\n")
    monkeypatch.chdir(tmp_path)
    found = expand_images(["x*.png", "lists/l.txt", "lists/l.csv", "lists/bare.csv", "y.png"])
    assert [Path(p).name for p in found] == ["x1.png", "x2.png", "y.png", "z.png"]
    assert found[2] == str(Path("lists") / "../y.png")  # relative to the list's folder


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing", "no such file or folder: 'missing'"),
        ("empty", "no image files in the folder 'empty'"),
        ("*.bmp", "no image files match '*.bmp'"),
        ("columns.csv", "has no column named path"),
    ],
)
def test_input_errors(
    spec: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "columns.csv").write_text("a,b\n1,2\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=re.escape(message)):
        expand_images([spec])


def test_labels_files(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.png,good\nsub/b.png,Anomaly\nc.png,0\nd.png,1\n")
    paths, known = read_labels(str(labels))
    assert paths == [str(tmp_path / n) for n in ("a.png", "sub/b.png", "c.png", "d.png")]
    assert [known[os.path.abspath(p)] for p in paths] == [False, True, False, True]
    labels.write_text("path,label\na.png,maybe\n")
    with pytest.raises(UserError, match="label 'maybe' is neither normal"):
        read_labels(str(labels))
    labels.write_text("file,y\na.png,-1\n")
    with pytest.raises(UserError, match=r"labels\.csv:2: label '-1'"):
        read_labels(str(labels))
    labels.write_text("name,kind\n")
    with pytest.raises(UserError, match="columns 'path' and 'label'"):
        read_labels(str(labels))


def test_folder_labels_refuse_a_file_in_both(folders: Path) -> None:
    good = str(folders / "test" / "good")
    files, labels = folder_labels([good], [str(folders / "test" / "bad")])
    assert len(files) == 12 and sum(labels.values()) == 6
    with pytest.raises(UserError, match="both under --good and under --bad"):
        folder_labels([good], [good])


def test_check_readable(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    assert check_readable(str(tmp_path / "ok.png")) is None
    assert check_readable(str(tmp_path / "bad.png")).startswith("cannot read the image")
    assert check_readable(str(tmp_path / "none.png")) == "no such file"
    assert check_readable(str(tmp_path)) == "is a folder, not an image file"


# ------------------------------------------------------- errors and conventions


@pytest.fixture
def workdir(tmp_path: Path, folders: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "empty").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "fake.msc").write_text("not a model")
    (tmp_path / "labels.csv").write_text("path,label\nx.png,perhaps\n")
    _write(tmp_path / "two", np.zeros((2, 8, 8), np.uint8), "img")
    _write(tmp_path / "three", np.zeros((3, 8, 8), np.uint8), "img")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["fit", "nowhere", "-o", "m.msc"], 1, "no such file or folder: 'nowhere'"),
        (["fit", "empty", "-o", "m.msc"], 1, "no image files in the folder 'empty'"),
        (["fit", "two", "-o", "no/such/dir/m.msc"], 1, "the folder 'no/such/dir' does not exist"),
        (["fit", "two", "-o", "out"], 1, "the output 'out' is a folder"),
        (["fit", "two", "-o", "m.msc", *FAST], 1, "fit needs at least n_neighbors + 1 = 3"),
        (["fit", "three", "-o", "m.msc", "--weights", "nope.pt"], 1, "nope.pt"),
        (["fit", "two", "-o", "m.msc", "--epochs", "-1"], 2, "--epochs: must be at least 0"),
        (["fit", "two", "-o", "m.msc", "--image-size", "big"], 2, "expected an integer"),
        (["fit", "two", "-o", "m.msc", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["fit", "two"], 2, "the following arguments are required: -o/--output"),
        ([], 2, "the following arguments are required: COMMAND"),
        (["score", "absent.msc", "two"], 1, "no such model file: 'absent.msc'"),
        (["score", "fake.msc", "two"], 1, "fake.msc is not a usable model file"),
        (["score", "fake.msc", "two", "-o", "s.xlsx"], 1, "cannot tell the format of 's.xlsx'"),
        (["report", "fake.msc", "two", "-o", "r.html"], 1, "is not a usable model file"),
        (["report", "fake.msc", "-o", "r.html"], 1, "name the images to report on"),
        (["report", "fake.msc", "--labels", "labels.csv", "-o", "r.html"], 1, "'perhaps'"),
        (["report", "fake.msc", "--labels", "l.csv", "--good", "two", "-o", "r"], 1, "not both"),
        (["inspect", "fake.msc"], 1, "it is not a zip archive"),
        (["inspect", "absent.msc"], 1, "no such model file"),
    ],
)
def test_user_errors_print_one_line(
    args: list[str],
    status: int,
    message: str,
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(args) == status
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert line.startswith("msc-detector")
    assert ": error: " in line
    assert message in line
    assert "Traceback" not in captured.out


def test_errors_have_no_traceback_in_a_fresh_process(workdir: Path) -> None:
    for args, status in ((["fit", "nowhere", "-o", "m.msc"], 1), (["score", "--nope"], 2)):
        result = _run(sys.executable, "-m", "msc_detector", *args, cwd=workdir)
        assert result.returncode == status
        _one_error_line(result.stderr)


def test_help_on_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ([], ["fit"], ["score"], ["report"], ["inspect"]):
        assert main([*command, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: msc-detector {' '.join(command)}".rstrip())
    result = _run(sys.executable, "-m", "msc_detector", "--help")
    assert result.returncode == 0
    assert all(word in result.stdout for word in ("fit", "score", "report", "inspect"))


def test_docs_describe_every_option() -> None:
    text = (REPO / "docs" / "cli.rst").read_text(encoding="utf-8")
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, sub in commands.items():
        assert f"msc-detector {name}" in text
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--"):
                    assert f"``{option}" in text, f"docs/cli.rst does not describe {name} {option}"


def test_quiet_and_verbose(
    folders: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, images = tmp_path / "m.msc", str(folders / "test" / "bad")
    assert main(["fit", images, "-o", str(out), *FAST, "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""
    assert main(["fit", images, "-o", str(out), *FAST, "--epochs", "0", "-v"]) == 0
    captured = capsys.readouterr()
    assert "msc-detector: Embedding 6 training images" in captured.err  # a log record
    assert "saved the model to" in captured.out


def test_a_note_where_the_threshold_flags_most_of_many_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    flat = rng.integers(120, 136, (8, 32, 32, 3), np.uint8)  # the normal images
    MSCDetector(weights=None, image_size=32, epochs=0, random_state=0).fit(flat).save(
        tmp_path / "m.msc"
    )
    folder = tmp_path / "new"
    folder.mkdir()
    for i in range(24):  # noise, unlike every training image
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(folder / f"{i}.png")
    score = ["score", str(tmp_path / "m.msc"), str(folder), "-o", str(tmp_path / "s.csv")]
    assert main(score) == 0
    captured = capsys.readouterr()
    assert "note: 24 of 24 images (100%) are flagged" in captured.err
    assert "--threshold" in captured.err and "note:" not in captured.out
    for quieter in (["--threshold=-1e9"], ["-q"]):  # a threshold given; quiet
        assert main([*score, *quieter]) == 0
        assert "note:" not in capsys.readouterr().err
    few = sorted(folder.iterdir())[: 20 - 1]
    assert main(["score", str(tmp_path / "m.msc"), *map(str, few), "-o", "-"]) == 0
    assert "note:" not in capsys.readouterr().err  # too few images to say


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_show_on_a_terminal_only(
    folders: Path, tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, out = str(folders / "test"), tmp_path / "m.msc"
    for stream, shown in ((_Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert main(["fit", images, "-o", str(out), *FAST]) == 0
        assert main(["score", str(model), images, "-o", str(tmp_path / "s.csv")]) == 0
        bars = stream.getvalue()
        assert ("epoch 1" in bars and "scoring" in bars) is shown, bars
        assert ("\r" in bars) is shown
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert main(["score", str(model), images, "-o", str(tmp_path / "s.csv"), "-q"]) == 0
    assert sys.stderr.getvalue() == ""


def test_inspect_prints_json_without_importing_torch(model: Path) -> None:
    import msc_detector

    code = (
        "import sys\nfrom msc_detector.cli import main\nstatus = main(sys.argv[1:])\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\n"
        "sys.exit(status)\n"
    )
    result = _run(sys.executable, "-c", code, "inspect", str(model))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "no torch"
    assert json.loads(result.stdout) == json.loads(json.dumps(msc_detector.inspect(model)))
    via_module = _run(sys.executable, "-m", "msc_detector", "inspect", str(model))
    assert json.loads(via_module.stdout)["fitted"]["n_train_"] == 20


# ------------------------------------------------------- hardening, round 2


def test_a_labels_file_that_gives_an_image_both_labels_is_refused(
    tmp_path: Path, model: Path, folders: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.csv"
    # the same file, spelt twice, labelled both ways on lines 2 and 5 (4 is blank)
    labels.write_text("path,label\na.png,good\nb.png,bad\n\n./sub/../a.png,bad\n")
    with pytest.raises(UserError) as caught:
        read_labels(str(labels))
    message = str(caught.value)
    assert str(labels) in message
    assert "a.png" in message
    assert "lines 2 and 5" in message
    assert "both normal and an anomaly" in message
    # as --good/--bad overlap is: exit 1, one line, nothing written
    good = [f"{p},good" for p in sorted((folders / "test" / "good").iterdir())]
    labels.write_text("path,label\n" + "\n".join([*good, f"{good[0][:-5]},bad"]) + "\n")
    page = tmp_path / "report.html"
    assert main(["report", str(model), "--labels", str(labels), "-o", str(page)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"{labels}: " in line and "lines 2 and 8" in line
    assert not page.exists()


def test_a_labels_file_may_repeat_an_image_with_the_same_label(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.png,good\nb.png,bad\na.png,normal\nb.png,1\n")
    paths, known = read_labels(str(labels))
    assert paths == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]  # each once
    assert [known[os.path.abspath(p)] for p in paths] == [False, True]


def test_outputs_are_replaced_through_links_keeping_their_mode(
    model: Path, folders: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or fsync(fd))
    (tmp_path / "real").mkdir()
    images = str(folders / "test" / "bad")
    for name in ("scores.csv", "report.html"):
        target = tmp_path / "real" / name
        target.write_text("old")
        target.chmod(0o640)
        link = tmp_path / f"link-{name}"
        link.symlink_to(target)
        command = "score" if name.endswith(".csv") else "report"
        synced.clear()
        assert main([command, str(model), images, "-o", str(link), "-q"]) == 0
        assert link.is_symlink() and link.resolve() == target  # the link stays a link
        assert target.read_text(encoding="utf-8") != "old"  # and its target is new
        assert target.stat().st_mode & 0o777 == 0o640
        assert len(synced) >= 2  # the file, then its folder
        assert sorted(p.name for p in (tmp_path / "real").iterdir()) == sorted(
            [n for n in ("scores.csv", "report.html") if (tmp_path / "real" / n).exists()]
        )  # no hidden file left beside the target
    plain = tmp_path / "plain.csv"  # no link: the mode is kept all the same
    plain.write_text("old")
    plain.chmod(0o600)
    assert main(["score", str(model), images, "-o", str(plain), "-q"]) == 0
    assert plain.stat().st_mode & 0o777 == 0o600 and len(_read_csv(plain)) == 6
    # a dangling link: its target is created, as open() would
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "real" / "new.csv")
    assert main(["score", str(model), images, "-o", str(dangling), "-q"]) == 0
    assert dangling.is_symlink() and len(_read_csv(tmp_path / "real" / "new.csv")) == 6


@pytest.mark.timeout(60)  # two loops never ended: os.walk followed them into an ever longer path
def test_symlink_loops_and_links_list_each_folder_and_image_once(tmp_path: Path) -> None:
    def names(folder: Path) -> list[str]:
        return [Path(p).relative_to(folder).as_posix() for p in expand_images([str(folder)])]

    one = tmp_path / "one"
    (one / "sub").mkdir(parents=True)
    (one / "1.png").write_bytes(b"")
    (one / "sub" / "2.png").write_bytes(b"")
    (one / "sub" / "up").symlink_to("..")
    assert names(one) == ["1.png", "sub/2.png"]  # was 82 rows, paths of 295 characters

    two = tmp_path / "two"
    two.mkdir()
    (two / "1.png").write_bytes(b"")
    (two / "a").symlink_to(".")
    (two / "b").symlink_to(".")
    assert names(two) == ["1.png"]

    # One image reachable by several names: listed once, under its own name; links that
    # lead out of the folder are followed, after the rest.
    links = tmp_path / "links"
    (links / "real").mkdir(parents=True)
    (links / "real" / "x.png").write_bytes(b"")
    (links / "a_alias.png").symlink_to("real/x.png")
    (links / "a_dir").symlink_to("real")
    (links / "b_dir").symlink_to("real")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "y.png").write_bytes(b"")
    (tmp_path / "outside" / "back").symlink_to(links)
    (links / "ext").symlink_to(tmp_path / "outside")
    (links / "z.png").write_bytes(b"")
    assert names(links) == ["z.png", "real/x.png", "ext/y.png"]


@pytest.mark.skipif(sys.platform == "win32", reason="Windows file names are not bytes")
def test_names_that_are_not_utf8_are_shown_with_a_replacement_and_round_trip(
    folders: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from urllib.parse import unquote_to_bytes

    latin = tmp_path / "latin"
    latin.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name, as on many Linux disks
    good = sorted((folders / "test" / "good").iterdir())
    shutil.copy(good[0], latin / name)
    shutil.copy(good[1], latin / "plain.png")
    (latin / os.fsdecode(b"bad\xff.png")).write_text("not an image")  # a row with an error
    # a model whose nearest training images have such a name too
    train = [str(latin / name), *map(str, good[2:6])]
    model = tmp_path / "model.msc"
    MSCDetector(weights=None, image_size=32, epochs=0, batch_size=4).fit(train).save(model)

    real = {os.fsencode(latin / n) for n in os.listdir(latin)}
    shown = {str(latin / "caf\ufffd.png"), str(latin / "bad\ufffd.png"), str(latin / "plain.png")}

    def check(rows: list[dict]) -> None:
        assert len(rows) == 3  # every row written
        assert {row["path"] for row in rows} == shown
        assert {unquote_to_bytes(row["path_quoted"]) for row in rows} == real  # round trip
        cafe = next(row for row in rows if "caf" in row["path"])
        assert not cafe["error"] and cafe["score"] not in ("", None)  # scored
        assert cafe["neighbor_1"] == str(latin / "caf\ufffd.png")  # itself, nearest
        bad = next(row for row in rows if "bad" in row["path"])
        assert bad["error"].startswith("cannot read the image")

    args = ["score", str(model), str(latin), "-q"]
    assert main([*args, "-o", str(tmp_path / "s.csv")]) == 0
    check(_read_csv(tmp_path / "s.csv"))
    assert main([*args, "-o", str(tmp_path / "s.jsonl")]) == 0
    lines = (tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()
    check([json.loads(line) for line in lines])
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow.parquet as pq

        assert main([*args, "-o", str(tmp_path / "s.parquet")]) == 0
        check(pq.read_table(tmp_path / "s.parquet").to_pylist())
    capsys.readouterr()
    assert main(args) == 0  # CSV on standard output
    check(list(csv.DictReader(capsys.readouterr().out.splitlines())))

    page = tmp_path / "report.html"
    assert main(["report", str(model), str(latin), "-o", str(page), "-q"]) == 0
    html = page.read_text(encoding="utf-8")
    assert "caf\ufffd.png" in html and "bad\ufffd.png" in html


# Ctrl-C while DataLoader forks a worker: the signal goes to the whole process group (as a
# terminal sends it), and Python raises KeyboardInterrupt in an at-fork hook, which
# cannot raise: Python printed it as "Exception ignored in ..." and scoring went on.
_CTRL_C_AT_FORK = """
import os, signal, sys
from msc_detector import files as scoring
from msc_detector.cli import main

armed = []


def hook():
    if armed:
        armed.clear()
        os.killpg(0, signal.SIGINT)


os.register_at_fork(after_in_parent=hook)
score_files = scoring.score_files


def chunks(*args, **kwargs):
    for chunk in score_files(*args, **{**kwargs, "chunk_size": 8}):  # 2 batches: workers
        yield chunk
        armed.append(True)  # the next fork is the first worker of the next chunk


scoring.score_files = chunks
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_stops_score_with_130_one_line_and_no_output(
    model: Path, folders: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    for copy in "ab":  # 24 images: 3 chunks of 8 in 2 batches of 4
        shutil.copytree(folders / "test", images / copy)
    out = tmp_path / "out" / "scores.csv"
    out.parent.mkdir()
    args = ["score", str(model), str(images), "-o", str(out), "-q"]
    args += ["--batch-size", "4", "--num-workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def interrupted(run: subprocess.Popen[str]) -> None:
        _, stderr = run.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert (run.returncode, stderr) == (130, "msc-detector: interrupted\n")
        assert [p.name for p in out.parent.iterdir()] == ["scores.csv"]  # no partial file
        assert out.read_text() == "old"  # left as it was

    out.write_text("old")
    command = [sys.executable, "-c", _CTRL_C_AT_FORK, *args]
    # As from a terminal: Ctrl-C handled, even where this test runs with SIGINT ignored
    # (a shell's background job), which the command would inherit and keep.
    popen = {"stderr": subprocess.PIPE, "text": True, "env": env, "start_new_session": True}
    popen["preexec_fn"] = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    interrupted(subprocess.Popen(command, **popen))

    # and an ordinary Ctrl-C, mid-run: once the hidden output file is open
    run = subprocess.Popen([sys.executable, "-m", "msc_detector", *args], **popen)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not list(out.parent.glob(".*.tmp")) and run.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGINT)
    interrupted(run)


@pytest.mark.parametrize("command", ["inspect", "score"])
def test_a_reader_that_stops_early_ends_the_command_quietly_with_141(
    model: Path, folders: Path, command: str
) -> None:
    args = [str(model)] + ([str(folders / "test"), "-q"] if command == "score" else [])
    run = subprocess.Popen(
        [sys.executable, "-m", "msc_detector", command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.stdout is not None
    run.stdout.close()  # as "| head" does once it has its lines: every write now fails
    _, stderr = run.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert (run.returncode, stderr) == (141, "")


class _HalfBuilt:
    """An object whose ``__del__`` reads what ``__init__`` never set, as after Ctrl-C.

    It refers to itself, so only the garbage collector finalises it, possibly after the
    command's last line.
    """

    def __init__(self) -> None:
        self.itself = self

    def __del__(self) -> None:
        self.shutdown  # noqa: B018 (AttributeError, as DataLoader's iterator raises)


def test_ctrl_c_silences_what_it_left_half_built(monkeypatch: pytest.MonkeyPatch) -> None:
    reported: list[type[BaseException]] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_type))
    # a handler Python calls, even where this test runs with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with interrupts.handle_ctrl_c():  # no Ctrl-C: the failure is reported
            _HalfBuilt()
        gc.collect()
        assert reported == [AttributeError]
        reported.clear()
        with interrupts.handle_ctrl_c():
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
            _HalfBuilt()
        assert reported == []
        gc.collect()
        assert reported == []
    finally:
        signal.signal(signal.SIGINT, previous)
