"""Backends and the dispatcher: the only code that knows devices, dtypes and backends.

:mod:`~lrp_kernels.backends.dispatch` picks, for every kernel op a rule asks for, the
implementation that runs it: ``torch`` (registered by each rule in :mod:`lrp_kernels.ops`),
``cpp`` (:mod:`~lrp_kernels.backends.cpp`, norms on CPU) or ``triton``
(:mod:`lrp_kernels.backends.triton`, fused GPU kernels). Both accelerated backends load lazily.
"""
from .dispatch import (BACKENDS, BackendUnavailableError, available_backends, backend_status,
                       current_backend, use_backend)

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "backend_status",
           "current_backend", "use_backend"]
