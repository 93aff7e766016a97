"""Test set-up: run Triton kernels through the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is imported anywhere.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_report_header(config):
    return (f"torch {torch.__version__}; cuda={torch.cuda.is_available()}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")
