"""The contract every op file of ``tests/ops/`` runs on its own cases: :class:`OpContract`.

An op file subclasses it once, naming its cases (:data:`helpers.cases.OPS`) and its bad-input
table, and keeps its op-specific tests next to it as plain functions::

    class TestSoftmax(OpContract):
        \"\"\"Runs the common op contract (helpers/contract.py) on NAMES; the functions below are this op's own tests.\"\"\"
        NAMES = OPS["softmax"]
        BAD_INPUTS = [...]  # (call on a view module, exception type, words the message must contain)

Each test method below then runs on that op's cases (the ``name`` parameter: all of them, or
those the check applies to, ``with_module`` / ``with_triton`` / ``conservative``) times its own
parameters. A test with nothing to run for an op (no Triton kernel, no conservative case) is not
a test of that op's class: it is left out, not reported as a skip. The checks themselves are in
:mod:`helpers.cases`. (``OpContract`` does not start with ``Test``: pytest collects only the
subclasses.)
"""
from __future__ import annotations

from typing import Callable, ClassVar

import pytest
import torch

import lrp_kernels.functional as F
import lrp_kernels.grad as G

from .cases import (BACKENDS, DTYPES, LAYOUTS, TRITON, TRITON_VIEWS, check_bad_input_raises_clear_error,
                    check_conservation_eps_to_zero, check_cuda_matches_cpu_reference, check_forward_equals_plain_op,
                    check_single_op_views_agree, check_view_matches_oracle, conservative, cuda, with_module,
                    with_triton)


def per_op(argname: str, values: Callable[[type], list]):
    """Parametrize a contract test's ``argname`` with ``values(op_class)``, for each op class."""
    def mark(test):
        test.per_op_param = (argname, values)
        return test
    return mark


def cases(select: Callable[[list], list] = list):
    """Run a contract test on ``select(NAMES)``: the op's cases that the check applies to."""
    return per_op("name", lambda op: select(op.NAMES))


def every_dtype_layout_backend(test):
    """The drop-ins' grid: every dtype x layout x backend (test ids: name-dtype-layout-backend)."""
    test = pytest.mark.parametrize("dtype", DTYPES, ids=str)(test)
    test = pytest.mark.parametrize("layout", LAYOUTS)(test)
    return pytest.mark.parametrize("backend", BACKENDS)(test)


class OpContract:
    """The tests every op runs on its cases; subclasses set ``NAMES`` and ``BAD_INPUTS``."""

    NAMES: ClassVar[list[str]] = []
    BAD_INPUTS: ClassVar[list] = []   # (call on a view module, exception type, words of the message)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for attr, test in vars(OpContract).items():
            if hasattr(test, "per_op_param") and not list(test.per_op_param[1](cls)):
                setattr(cls, attr, None)  # nothing to run it on for this op: not one of its tests

    def pytest_generate_tests(self, metafunc):
        """pytest's hook, for this class's tests: the ``per_op`` parameter of each, for this op."""
        argname, values = getattr(metafunc.function, "per_op_param", (None, None))
        if argname is not None:
            metafunc.parametrize(argname, list(values(type(self))))

    # ---- every view x every backend vs the oracle ------------------------------------------------

    @every_dtype_layout_backend
    @cases()
    def test_relevance_matches_oracle(self, name, dtype, layout, backend):
        check_view_matches_oracle(name, dtype, layout, backend, "R")

    @every_dtype_layout_backend
    @cases()
    def test_gradient_view_matches_oracle(self, name, dtype, layout, backend):
        check_view_matches_oracle(name, dtype, layout, backend, "G")

    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("view", ["MR", "MG"])
    @cases(with_module)
    def test_module_matches_oracle(self, name, view, backend):
        """The module (both views) on each backend, float64: the dtypes are the drop-ins' (same rule)."""
        check_view_matches_oracle(name, torch.float64, "transposed", backend, view)

    @pytest.mark.parametrize("backend", [TRITON])
    @pytest.mark.parametrize("view,layout", TRITON_VIEWS)
    @cases(with_triton)
    def test_triton_backend_matches_oracle(self, name, view, layout, backend):
        check_view_matches_oracle(name, torch.float32, layout, backend, view)

    # ---- the rule's properties ------------------------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @cases()
    def test_forward_equals_plain_op(self, name, dtype):
        check_forward_equals_plain_op(name, dtype)

    @pytest.mark.parametrize("view", ["R", "G"])
    @cases(conservative)
    def test_conservation_eps_to_zero(self, name, view):
        check_conservation_eps_to_zero(name, view)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
    @cases()
    def test_single_op_views_agree(self, name, dtype):
        check_single_op_views_agree(name, dtype)

    # ---- bad input: clear errors ----------------------------------------------------------------

    @pytest.mark.parametrize("view", [F, G], ids=["R", "G"])
    @per_op("idx", lambda op: range(len(op.BAD_INPUTS)))
    def test_bad_input_raises_clear_error(self, idx, view):
        check_bad_input_raises_clear_error(self.BAD_INPUTS[idx], view)

    # ---- CUDA (run by the GPU job: pytest -m gpu) ----------------------------------------------

    @pytest.mark.gpu
    @cuda
    @pytest.mark.parametrize("view", ["R", "G"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @cases()
    def test_cuda_matches_cpu_reference(self, name, dtype, view):
        check_cuda_matches_cpu_reference(name, dtype, view)
