"""The ``msc-detector`` command line: argument parsing, output conventions, error handling.

argparse rather than click or typer: it is in the standard library, so the command line
adds no dependency, and it does all this tool needs (subcommands, typed options, help).
Its one habit that does not fit is printing the usage before an error; the parser here
prints one line instead.

Conventions, shared by every command:

* ``--help`` on the tool and on each command; ``--version``.
* ``-v`` adds log messages (``-vv`` debug ones) and a traceback to an error; ``-q``
  hides progress bars and status lines. Progress bars show only where stderr is a
  terminal: a log file or a pipe gets no bar updates. Warnings print as one line each.
* Exit status 0 on success, 1 on an error in the input (a missing folder, a damaged
  model file, an unwritable output...), 2 on a wrong option, 130 when interrupted. An
  error prints one line to stderr, ``msc-detector: error: ...``, without a traceback.
* Output piped to a reader that stops early (``| head``) ends the command quietly with
  status 141, as it ends the shell's own tools (128 + SIGPIPE).
* Ctrl-C stops a command with status 130 and the one line ``msc-detector: interrupted``,
  having written no output (see :mod:`~msc_detector.cli.interrupts`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn, TextIO

from msc_detector._version import __version__
from msc_detector.cli import commands, interrupts
from msc_detector.cli.errors import UserError
from msc_detector.persistence import ModelFileError

__all__ = ["build_parser", "main"]

PROG = "msc-detector"
# Errors that say what is wrong with the input: one line, no traceback.
_EXPECTED: tuple[type[BaseException], ...] = (UserError, ModelFileError, ValueError, TypeError)
_EXPECTED += (OSError, FloatingPointError)
_LOSSES = ("msc_angular", "msc", "contrastive", "center", "none")
_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class _UsageError(Exception):
    """A wrong command line, raised by the parser instead of printing usage and exiting."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


# ------------------------------------------------------------------- option types


def _integer(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _number(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"must be in {bracket}{low:g}, {high:g}], got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _image_size(text: str) -> int | str | None:
    if text in ("auto", "native"):
        return None if text == "native" else "auto"
    size = _integer(16)(text)
    if size > 4096:
        raise argparse.ArgumentTypeError(f"must be at most 4096, got {size}")
    return size


# ------------------------------------------------------------------------- parser


def _scoring_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--neighbors",
        type=_integer(0),
        default=3,
        metavar="K",
        help="nearest normal training images to list per image (default: 3)",
    )
    parser.add_argument(
        "--threshold",
        type=_finite,
        metavar="T",
        help="flag images scoring below T instead of below the model's threshold (offset_)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="where the network runs: auto (default: the fitted device if present, else the "
        "CPU), cpu, cuda, cuda:1, mps",
    )
    parser.add_argument(
        "--batch-size",
        type=_integer(1),
        metavar="N",
        help="images per batch (default: the model's)",
    )
    parser.add_argument(
        "--num-workers",
        type=_integer(0),
        metavar="N",
        help="processes decoding image files (default: up to 4)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``msc-detector`` command line."""
    verbosity = _Parser(add_help=False)
    group = verbosity.add_mutually_exclusive_group()
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more messages (-vv: debug), and a traceback with an error",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars or status lines; errors and warnings only",
    )

    parser = _Parser(
        prog=PROG,
        parents=[verbosity],
        description="Image anomaly detection with the Mean-Shifted Contrastive method: fit a "
        "detector on folders of normal images, score new images, and make an HTML report.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    images_help = (
        "folders (searched recursively), glob patterns, image files, or .txt/.csv files "
        "listing image paths"
    )

    fit = sub.add_parser(
        "fit",
        parents=[verbosity],
        help="fit a detector on normal images and save it",
        description="Fit a detector on images of normal items only, and save it to a model "
        "file. It prints where the model went and its threshold.",
    )
    fit.add_argument("train", nargs="+", metavar="TRAIN", help=f"the normal images: {images_help}")
    fit.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="MODEL",
        help="model file to write, e.g. model.msc",
    )
    fit.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="timm model name (default: efficientnet_lite0, bundled)",
    )
    fit.add_argument(
        "--weights",
        default="auto",
        help="auto (default: as MSCDetector finds them; bundled for efficientnet_lite0), a "
        "weights file, or none (random initialisation, for tests)",
    )
    fit.add_argument(
        "--epochs",
        type=_integer(0),
        default=1,
        metavar="N",
        help="fine-tuning passes (default: 1)",
    )
    fit.add_argument(
        "--image-size",
        type=_image_size,
        default=None,
        metavar="PX",
        help="network input side in pixels, 'auto' (smaller for small images) or 'native' "
        "(default: the backbone's own, 224 for EfficientNet-Lite0)",
    )
    fit.add_argument(
        "--crop-mode",
        choices=("squash", "center"),
        default="squash",
        help="how a non-square image becomes square: squash (default: resized whole, none of "
        "it lost) or center (cut to its centre square, aspect kept)",
    )
    fit.add_argument(
        "--batch-size",
        type=_integer(2),
        default=64,
        metavar="N",
        help="images per batch (default: 64)",
    )
    fit.add_argument(
        "--lr", type=_number(0, float("inf")), default=1e-4, help="learning rate (default: 1e-4)"
    )
    fit.add_argument(
        "--loss",
        choices=_LOSSES,
        default="msc_angular",
        help="fine-tuning loss (default: msc_angular)",
    )
    fit.add_argument(
        "--n-neighbors",
        type=_integer(1),
        default=2,
        metavar="K",
        help="neighbours summed in a score (default: 2)",
    )
    fit.add_argument(
        "--contamination",
        type=_number(0, 0.5, low_open=True),
        default=0.1,
        metavar="SHARE",
        help="expected share of anomalies: the threshold flags this share of the training "
        "images (default: 0.1)",
    )
    fit.add_argument(
        "--device",
        default="auto",
        help="auto (default: CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps",
    )
    fit.add_argument(
        "--precision",
        choices=_PRECISIONS,
        default="auto",
        help="autocast precision (default: auto)",
    )
    fit.add_argument(
        "--num-workers",
        type=_integer(0),
        metavar="N",
        help="processes decoding image files (default: up to 4)",
    )
    fit.add_argument(
        "--random-state",
        type=_integer(0),
        metavar="SEED",
        help="seed, for a reproducible fit on the CPU",
    )
    fit.set_defaults(run=commands.fit)

    score = sub.add_parser(
        "score",
        parents=[verbosity],
        help="score images and write one row per image",
        description="Score images with a fitted model. Writes one row per image: path, score "
        "(higher is more normal), decision (score minus the threshold), label (normal or "
        "anomaly), false_alarm_rate (the share of training images scoring as low or "
        "lower), the nearest normal training images and their distances, error (why a "
        "file could not be read; other files are still scored), and path_quoted (the path's "
        "bytes percent-encoded: it leads back to a file whose name is not UTF-8, which path "
        "shows with U+FFFD).",
    )
    score.add_argument("model", metavar="MODEL", help="model file written by 'fit'")
    score.add_argument(
        "images", nargs="+", metavar="IMAGES", help=f"the images to score: {images_help}"
    )
    score.add_argument(
        "-o",
        "--output",
        default="-",
        metavar="FILE",
        help="table to write: .csv, .jsonl or .parquet (needs pyarrow); '-' (default): CSV on "
        "standard output",
    )
    score.add_argument(
        "--format",
        choices=("csv", "jsonl", "parquet"),
        help="override the format the extension implies",
    )
    _scoring_options(score)
    score.set_defaults(run=commands.score)

    report = sub.add_parser(
        "report",
        parents=[verbosity],
        help="score images and write a self-contained HTML report",
        description="Score images and write one HTML file that opens offline: the score "
        "histogram with the threshold; with labels, ROC and precision-recall curves and a table "
        "of thresholds; the most anomalous images beside their nearest normal training images; "
        "the most normal images; the training history.",
    )
    report.add_argument("model", metavar="MODEL", help="model file written by 'fit'")
    report.add_argument(
        "images", nargs="*", metavar="IMAGES", help=f"the images to score: {images_help}"
    )
    report.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="HTML",
        help="report file to write, e.g. report.html",
    )
    report.add_argument(
        "--labels",
        metavar="CSV",
        help="CSV file with 'path' and 'label' columns (normal/good/0 or anomaly/bad/1); without "
        "IMAGES, its paths are the images",
    )
    report.add_argument(
        "--good", nargs="+", metavar="DIR", help="images known to be normal (scored and labelled)"
    )
    report.add_argument(
        "--bad",
        nargs="+",
        metavar="DIR",
        help="images known to be anomalies (scored and labelled)",
    )
    report.add_argument(
        "--top",
        type=_integer(1),
        default=12,
        metavar="N",
        help="images shown as most anomalous and most normal (default: 12)",
    )
    _scoring_options(report)
    report.set_defaults(run=commands.report)

    inspect = sub.add_parser(
        "inspect",
        parents=[verbosity],
        help="print a model file's metadata as JSON",
        description="Verify a model file and print its metadata (parameters, fitted values, "
        "library versions, checksums) as JSON. Does not load the network.",
    )
    inspect.add_argument("model", metavar="MODEL", help="model file written by 'fit'")
    inspect.set_defaults(run=commands.inspect)
    return parser


# ------------------------------------------------------------------------- console


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.strerror}: {exc.filename!r}"
    return text or type(exc).__name__


@contextlib.contextmanager
def _console(verbose: int) -> Iterator[None]:
    """Route log records and warnings to stderr as one line each, for this call only."""
    logger = logging.getLogger("msc_detector")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (False for a file, a pipe or a capture)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):  # closed, or no isatty
        return False


def _silence_standard_output() -> None:
    """Point standard output at the null device once its reader is gone.

    Python's final flush of what is left in its buffer would print another error.
    """
    with contextlib.suppress(OSError, ValueError):  # not a file descriptor (a capture)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    verbose: int = getattr(args, "verbose", 0)
    args.quiet = getattr(args, "quiet", False)
    args.progress = not args.quiet and _is_terminal(sys.stderr)
    run: Callable[[argparse.Namespace], int] = args.run
    with _console(verbose), interrupts.handle_ctrl_c():
        try:
            status = run(args)
            interrupts.check()  # a Ctrl-C that Python could not raise where it landed
            return status
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # before _EXPECTED, which holds OSError
            _silence_standard_output()
            return 128 + signal.SIGPIPE
        except _EXPECTED as exc:
            if verbose:
                traceback.print_exc()
            print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
            return 1
