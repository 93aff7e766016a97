"""Test set-up: run Triton kernels through the interpreter when no GPU is present, and make the
shared helpers importable (``from helpers import oracle``) from every test folder.

TRITON_INTERPRET must be set before triton is imported anywhere.
"""
import os
import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:  # tests/helpers/ is a package under tests/
    sys.path.insert(0, TESTS_DIR)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_report_header(config):
    return (f"torch {torch.__version__}; cuda={torch.cuda.is_available()}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")


# property-based tests (tests/test_properties.py): a small, repeatable profile for CI (default),
# a larger random one for local runs: LRP_HYPOTHESIS_PROFILE=dev
settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("LRP_HYPOTHESIS_PROFILE", "ci"))
