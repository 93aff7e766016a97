"""The ``triton`` backend: fused Triton kernels for the rules' hot ops.

Importing this package (the dispatcher does it lazily, the first time ``triton`` is asked
for) registers the backend's availability probe, then imports every module of the package so
each kernel file registers its ops itself (one file per kernel, Liger-Kernel style).

Available iff ``import triton`` works AND there is a CUDA device or ``TRITON_INTERPRET=1``
(the interpreter runs the same kernels on CPU tensors, slowly; for tests). ``auto`` never
picks the interpreter; force it with ``lrp_kernels.use_backend("triton")``.

Shared helpers for kernel files live here: :func:`interpreting`, :func:`device_reason` (the
``supports`` check every op starts with) and the ``stab`` device function.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import warnings
from typing import Optional

import torch

from .. import dispatch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:  # never crash without triton: the probe says why instead
    import triton
    import triton.language as tl
    _IMPORT_ERROR: Optional[str] = None
except Exception as err:  # ImportError, or a broken install
    triton = tl = None
    _IMPORT_ERROR = f"{type(err).__name__}: {err}"

# modules of this package that failed to import: name -> error (reported by the probe)
IMPORT_FAILURES: dict[str, str] = {}


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def probe() -> tuple[bool, str]:
    """``(available, reason)`` for the triton backend."""
    if triton is None:
        return False, f"triton is not importable ({_IMPORT_ERROR}); pip install 'lrp_kernels[triton]'"
    version = triton.__version__
    broken = f"; kernel modules that failed to import: {IMPORT_FAILURES}" if IMPORT_FAILURES else ""
    if torch.cuda.is_available():
        return True, f"triton {version} on {torch.cuda.get_device_name(0)}{broken}"
    if interpreting():
        return True, (f"triton {version} through the interpreter (TRITON_INTERPRET=1): CPU tensors, "
                      f"slow, for testing; auto never picks it{broken}")
    return False, (f"triton {version} importable but no CUDA device (set TRITON_INTERPRET=1 to run "
                   f"kernels through the interpreter on CPU tensors)")


def device_reason(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """Common ``supports`` check: devices and dtypes every kernel here can take, else why not."""
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        return f"tensors on several devices {sorted(str(d) for d in devices)}"
    for t in present:
        if t.dtype not in SUPPORTED_DTYPES:
            return f"dtype {t.dtype} not supported by the triton kernels (float32, bfloat16, float16)"
        if not t.is_cuda and not interpreting():
            return (f"{t.device.type} tensors need a CUDA device or TRITON_INTERPRET=1 "
                    f"(the Triton interpreter)")
    return None


def linear_reason(grad_z, x, weight, bias, z) -> Optional[str]:
    """``supports`` check shared by the linear-layer kernels (epsilon, gamma): devices, dtypes
    and the shapes of ``z = x @ weight.T + bias``; None if a kernel can take them."""
    reason = device_reason(grad_z, x, weight, bias, z)
    if reason:
        return reason
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        return f"shapes x {tuple(x.shape)}, weight {tuple(weight.shape)} are not a linear layer"
    expected = (*x.shape[:-1], weight.shape[0])
    if tuple(grad_z.shape) != expected:
        return f"grad_z has shape {tuple(grad_z.shape)}, expected {expected}"
    if z is not None and tuple(z.shape) != expected:
        return f"z has shape {tuple(z.shape)}, expected {expected}"
    return None


def alloc_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every launcher allocates its outputs here (``torch.empty``: the kernels write every
    element). Tests replace it with a NaN-filled allocator to prove that."""
    return torch.empty(shape, dtype=dtype, device=device)


if triton is not None:

    @triton.jit
    def stabilize(z, eps):
        """``z + eps * sgn(z)``, ``sgn(0) = +1``; ``z`` float32 (docs/math.md: never zero, never flips)."""
        return z + tl.where(z >= 0, eps, -eps)


dispatch.register_probe("triton", probe)


def _import_kernel_modules() -> None:
    """Import every module of this package: each registers its own kernels."""
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{__name__}.{info.name}")
        except Exception as err:  # one broken kernel file must not take the others down
            IMPORT_FAILURES[info.name] = f"{type(err).__name__}: {err}"
            warnings.warn(f"lrp_kernels.backends.triton.{info.name} failed to import ({err}); its ops fall "
                          f"back to other backends", RuntimeWarning, stacklevel=2)


if triton is not None:
    _import_kernel_modules()
