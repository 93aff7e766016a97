"""The ``lrp-kernels`` command line.

Each subcommand lives in its own module of this package and exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` whose parser sets ``func(args) -> int``.

Exit codes: 0 success, 1 a check failed (``compare``), 2 a user mistake, 130 interrupted.
A user mistake (bad argument, missing path, unusable model folder, bad ``LRP_KERNELS_BACKEND``)
is reported as exactly one line on stderr, ``lrp-kernels COMMAND: error: ...``, never a
traceback; subcommands raise :class:`CLIError` for them. Anything else is a bug and keeps its
traceback. Warnings are printed as one line each, ``lrp-kernels COMMAND: warning: ...``.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
import warnings
from typing import Callable, Optional, Sequence

# module name (in this package) per subcommand, in --help order
# (a name whose module is absent is skipped, so a subcommand can be listed before it lands)
SUBCOMMANDS = ("explain", "explain_image", "sources", "batch", "faithfulness", "compare", "profile",
               "build_ext", "info")


class CLIError(Exception):
    """A user mistake: reported as one line and a non-zero exit."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``, exit 2.

    (argparse's default prints the usage block first; subparsers inherit this class.)"""

    def error(self, message):  # type: ignore[override]
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- argparse types: the error names the option (argparse adds "argument --name:") -------------

def int_at_least(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """argparse type: an integer ``>= low`` (and ``<= high`` when given)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else \
                ("a positive integer" if low == 1 else f"an integer >= {low}")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    parse.__name__ = "int"
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (an LRP stabiliser of 0 gives 0/0 = NaN)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


positive_float.__name__ = "float"


def add_model_options(p: argparse.ArgumentParser, *, rules: bool = True,
                      backend_help: str = "kernel backend (default: auto)",
                      device_help: str = "cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)") -> None:
    """The options every command that loads and explains a causal LM shares: ``--model``,
    ``--tokenizer``, ``--rules`` (unless ``rules=False``), ``--backend``, ``--dtype``, ``--device``."""
    p.add_argument("--model", default=None,
                   help="local model folder or Hugging Face hub id (default: the shipped "
                        "recall-llama model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path or id (default: --model)")
    if rules:
        p.add_argument("--rules", default="attnlrp", choices=("attnlrp", "cp-lrp", "gradient"),
                       help="attnlrp (default), cp-lrp or plain gradient x input")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "cpp", "triton"),
                   help=backend_help)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default: float32)")
    p.add_argument("--device", default=None, help=device_help)


def read_text_lines(path: str, name: str) -> list:
    """The lines of a UTF-8 text file the user named (``name``: how the messages call it, e.g.
    ``"--prompts"``); a missing, unreadable or non-UTF-8 file is a one-line :class:`CLIError`."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        raise CLIError(f"{name} {path!r} does not exist") from None
    except IsADirectoryError:
        raise CLIError(f"{name} {path!r} is a folder, expected a file") from None
    except OSError as err:
        raise CLIError(f"cannot read {name} {path!r}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise CLIError(f"{name} {path!r} is not UTF-8 text") from None


def _check_backend_env() -> Optional[str]:
    """The problem with ``LRP_KERNELS_BACKEND``, or ``None`` when it is unset or valid."""
    from ..backends.dispatch import current_backend
    try:
        current_backend()
    except ValueError as err:
        return str(err)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lrp-kernels",
        description="Layer-wise Relevance Propagation (AttnLRP) for PyTorch transformers: "
                    "explain model outputs, compare backends, profile long contexts.",
        epilog="exit codes: 0 success, 1 a check failed (compare), 2 a user mistake (one line "
               "on stderr), 130 interrupted")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{__name__}.{name}":
                continue  # subcommand not part of this build
            raise
        module.add_parser(sub)
    return parser


def _one_line_warnings(command: str):
    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        print(f"lrp-kernels {command}: warning: {text}", file=sys.stderr)
    return show


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (argparse's exits included)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as err:  # --help (0) or a usage error (2, already printed as one line)
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 2)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if args.command != "info":  # info reports it among everything else
            problem = _check_backend_env()
            if problem:
                raise CLIError(f"{problem} (unset it or pick a valid backend)")
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(args.command)
            return int(args.func(args) or 0)
    except CLIError as err:
        text = " ".join(str(err).split())
        print(f"lrp-kernels {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lrp-kernels: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
