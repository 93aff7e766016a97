"""The ``lrp-kernels`` command line.

Each subcommand lives in its own module of this package and exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` whose parser sets ``func(args) -> int``.
User mistakes raise :class:`CLIError`: printed as one line, exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# module name (in this package) per subcommand, in --help order
SUBCOMMANDS = ("explain", "compare", "profile", "build_ext", "info")


class CLIError(Exception):
    """A user mistake: reported as one line and a non-zero exit."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrp-kernels",
        description="Layer-wise Relevance Propagation (AttnLRP) for PyTorch transformers: "
                    "explain model outputs, compare backends, profile long contexts.")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"lrp-kernels {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lrp-kernels: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
