"""Test set-up: run Triton kernels through the interpreter when no GPU is present, and make the
shared helpers importable (``from helpers import oracle``) from every test folder.

TRITON_INTERPRET must be set before triton is imported anywhere.
"""
import os
import sys
from pathlib import Path

import torch

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:  # tests/helpers/ is a package under tests/
    sys.path.insert(0, TESTS_DIR)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_report_header(config):
    return (f"torch {torch.__version__}; cuda={torch.cuda.is_available()}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")
