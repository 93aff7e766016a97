"""Shared pieces of every rule: the stabiliser and input checks."""
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
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


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


def check_epsilon(epsilon: float) -> None:
    if not isinstance(epsilon, (int, float)) or epsilon < 0:
        raise ValueError(f"epsilon must be a non-negative number, got {epsilon!r}")


def zero_masked(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Exactly 0 where ``x`` is -inf or the dtype's minimum (masked logits); no NaN."""
    masked = torch.isneginf(x) | (x <= torch.finfo(x.dtype).min)
    return torch.where(masked, torch.zeros((), dtype=out.dtype, device=out.device), out)
