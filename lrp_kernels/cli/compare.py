"""``lrp-kernels compare``: every backend vs a float64 oracle and the torch backend, per op.

The work is in :mod:`lrp_kernels.compare` (also runnable as ``python -m lrp_kernels.compare``).
"""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    from .. import compare

    p = sub.add_parser(
        "compare", help="check every backend against a float64 oracle and the torch backend",
        description="Run each kernel op on every available backend on random inputs and print the "
                    "max abs / relative error vs a float64 oracle of SPEC.md and vs the torch "
                    "backend. Exit 1 on an error beyond the dtype's tolerance. On CPU without CUDA, "
                    "Triton kernels run through the interpreter (TRITON_INTERPRET=1 is set; "
                    "--no-interpret to skip them).")
    compare.add_arguments(p)
    p.set_defaults(func=compare.run)
    return p
