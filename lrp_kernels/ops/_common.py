"""Shared pieces of every rule: the stabiliser, input checks, the forward-time backend pin and
the (near-free when inactive) hooks of the conservation check mode (:mod:`lrp_kernels.tools.check`)."""
from __future__ import annotations

from typing import Optional

import torch

DEFAULT_EPSILON = 1e-6


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (SPEC: stabilise in fp32 or higher)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``stab(z) = z + eps * sgn(z)`` with ``sgn(0) = +1``: never zero, never flips sign.

    Computed in float32 or higher whatever ``z``'s dtype (SPEC.md, "Stabiliser").
    """
    z = z.to(compute_dtype(z))
    # sign() is 0 at 0; adding (z == 0) makes it +1. About 2x faster on CPU than torch.where.
    return z.sign().add_(z == 0).mul_(epsilon).add_(z)


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise a clear error for non-tensors and non-floating tensors."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    """All given tensors on one device, else an error naming them."""
    devs = {k: t.device for k, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        listed = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"expected all tensors on one device, got {listed}")


def check_same_dtype(**tensors: Optional[torch.Tensor]) -> None:
    """All given tensors of one dtype (as the GEMM needs), else an error naming them."""
    dts = {k: t.dtype for k, t in tensors.items() if t is not None}
    if len(set(dts.values())) > 1:
        listed = ", ".join(f"{k} is {d}" for k, d in dts.items())
        raise TypeError(f"expected one dtype for all tensors, got {listed}")


def check_epsilon(epsilon: float) -> None:
    if not isinstance(epsilon, (int, float)) or epsilon < 0:
        raise ValueError(f"epsilon must be a non-negative number, got {epsilon!r}")


def zero_masked(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Exactly 0 where ``x`` is -inf or the dtype's minimum (masked logits); no NaN."""
    masked = torch.isneginf(x) | (x <= torch.finfo(x.dtype).min)
    return torch.where(masked, torch.zeros((), dtype=out.dtype, device=out.device), out)


# ---- backend choice made at forward time ----------------------------------------------------

def pin_backend(backend: Optional[str]) -> Optional[str]:
    """The backend a Function's backward should use, decided at forward time.

    A per-call ``backend`` is validated now (unknown name -> ``ValueError``, unavailable ->
    ``BackendUnavailableError`` with the reason) instead of failing later inside backward.
    Without one, the ``use_backend`` block active at forward time is pinned: ``use_backend``
    is thread-local and autograd runs CUDA backward passes on its own worker threads, which
    would not see it. ``None`` (no choice made) leaves it to ``dispatch`` at backward time.
    """
    from ..backends import dispatch

    if backend is None:
        return dispatch.forced_backend()
    if backend not in dispatch.BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {dispatch.BACKENDS + ('auto',)}, got {backend!r}")
    if backend not in ("auto", "torch"):
        ok, why = dispatch.backend_status(backend)
        if not ok:
            raise dispatch.BackendUnavailableError(f"backend {backend!r} is not available: {why}")
    return backend


# ---- hook for the conservation check mode (lrp_kernels.tools.check) ------------------------------
# The active recorder is process-wide, not thread-local: CUDA backward passes run on autograd
# worker threads. When no check is active (the normal case) each hook costs one global read.
_RECORDER = None


def record_forward(ctx, op: str, inputs: tuple, output: torch.Tensor) -> None:
    """Forward: remember (detached) inputs and output for the check mode, only while active."""
    rec = _RECORDER
    ctx.lrp_check = None if rec is None else rec.on_forward(op, inputs, output)


def record_backward(ctx, input_grads: tuple, output_grad: torch.Tensor, relevance: bool,
                    expected) -> None:
    """Backward: hand the rule's result to the check mode (read only; changes nothing).

    ``input_grads`` align with the ``inputs`` given to :func:`record_forward` (``None`` for
    inputs that get no relevance); ``expected`` (bool or zero-argument callable, evaluated
    only when recording) says whether SPEC promises conservation for this application.
    """
    token = getattr(ctx, "lrp_check", None)
    rec = _RECORDER
    if token is not None and rec is not None:
        rec.on_backward(token, input_grads, output_grad, relevance, expected)


def is_zero(t: Optional[torch.Tensor]) -> bool:
    """None or all zeros (a bias that absorbs no relevance)."""
    return t is None or not bool(t.detach().any())
