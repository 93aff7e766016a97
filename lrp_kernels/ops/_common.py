"""Shared pieces of every rule: the stabiliser, input checks, the forward-time backend pin and
the (near-free when inactive) hooks of the conservation check mode (:mod:`lrp_kernels.tools.check`)."""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

DEFAULT_EPSILON = 1e-6


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (docs/math.md: stabilise in fp32 or higher)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def stabilize(z: torch.Tensor, epsilon: float = DEFAULT_EPSILON, *, clip: bool = False,
              norm_scale: bool = False, dim: Optional[Union[int, Sequence[int]]] = None) -> torch.Tensor:
    """The stabiliser: keep ``z`` away from zero without flipping its sign (``sgn(0) = +1``).

    * default: ``stab(z) = z + eps * sgn(z)`` (docs/math.md, "Stabiliser"), what every rule uses;
    * ``clip=True``: ``sgn(z) * max(|z|, eps)`` (only values within ``eps`` of zero change);
    * ``norm_scale=True``: ``eps`` is multiplied by the root mean square of ``z`` over ``dim``
      (all dims when ``None``), making it relative to the scale of ``z``.

    Computed and returned in float32 or higher, whatever the dtype of ``z``. The Triton kernels
    use the same formula (``lrp_kernels.backends.triton.stabilize``).
    """
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    check_epsilon(epsilon)
    z = z.to(compute_dtype(z))
    if not clip and not norm_scale:
        # sign() is 0 at 0; adding (z == 0) makes it +1. About 2x faster on CPU than torch.where.
        return z.sign().add_(z == 0).mul_(epsilon).add_(z)
    eps: Union[float, torch.Tensor] = epsilon
    if norm_scale:
        dims = tuple(range(z.dim())) if dim is None else dim
        eps = epsilon * z.pow(2).mean(dim=dims, keepdim=True).sqrt()
    sign = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    if clip:
        return sign * torch.maximum(z.abs(), torch.as_tensor(eps, dtype=z.dtype, device=z.device))
    return z + eps * sign


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


def check_epsilon(epsilon: float, name: str = "epsilon") -> None:
    """A finite number >= 0 (NaN would make every relevance NaN, inf every relevance 0);
    the error names the argument ``name``."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {epsilon!r}")


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
    dispatch.check_backend(backend)
    return backend


def check_forced_backend(op: str, backend: Optional[str], *args) -> None:
    """A forced backend that has a kernel for ``op`` but cannot take these inputs is an error
    *now*, in the forward, with the reason (not later, inside the backward). ``args`` are the
    kernel op's arguments, output-shaped ones may be stand-ins (:func:`stand_in`)."""
    if backend not in (None, "auto", "torch"):
        from ..backends import dispatch
        dispatch.chosen_backend(op, *args, backend=backend)


def stand_in(like: torch.Tensor, shape) -> torch.Tensor:
    """A tensor with ``like``'s dtype and device and the given shape, backed by one element."""
    return like.new_empty(()).expand(tuple(shape))


# ---- hook for the conservation check mode (lrp_kernels.tools.check) ------------------------
# The active recorder is process-wide, not thread-local: CUDA backward passes run on autograd
# worker threads. When no check is active (the normal case) each hook costs one global read.
# Only set_recorder() writes it.
_RECORDER = None


def set_recorder(recorder) -> object:
    """Make ``recorder`` (or None) the active one; returns the previous one."""
    global _RECORDER
    previous, _RECORDER = _RECORDER, recorder
    return previous


def recording() -> bool:
    """True while a conservation check records (:func:`lrp_kernels.check.conservation`)."""
    return _RECORDER is not None


@contextlib.contextmanager
def recording_suspended() -> Iterator[None]:
    """No recording inside the block (a rule's own internal VJPs are not rule applications)."""
    previous = set_recorder(None)
    try:
        yield
    finally:
        set_recorder(previous)


def record_forward(ctx, op: str, inputs: tuple, output: torch.Tensor) -> None:
    """Forward: remember (detached) inputs and output for the check mode, only while active."""
    rec = _RECORDER
    ctx.lrp_check = None if rec is None else rec.on_forward(op, inputs, output)


def record_backward(ctx, input_grads: tuple, output_grad: torch.Tensor, relevance: bool,
                    expected) -> None:
    """Backward: hand the rule's result to the check mode (read only; changes nothing).

    ``input_grads`` align with the ``inputs`` given to :func:`record_forward` (``None`` for
    inputs that get no relevance); ``expected`` (bool or zero-argument callable, evaluated
    only when recording) says whether docs/math.md promises conservation for this application.
    """
    token = getattr(ctx, "lrp_check", None)
    rec = _RECORDER
    if token is not None and rec is not None:
        rec.on_backward(token, input_grads, output_grad, relevance, expected)


_Tensors = Union[torch.Tensor, Sequence[Optional[torch.Tensor]], None]


def _as_seq(t: _Tensors) -> tuple:
    if t is None:
        return ()
    if isinstance(t, torch.Tensor):
        return (t,)
    return tuple(t)


def record(op_name: str, inputs: _Tensors, input_grads: _Tensors, outputs: _Tensors, output_grads: _Tensors,
           relevance_view: bool, expected: Union[bool, Callable[[], bool]]):
    """Record one rule application from a backward (for rules outside :mod:`lrp_kernels.ops`).

    ``inputs`` / ``input_grads`` and ``outputs`` / ``output_grads`` pair up (a tensor or a
    sequence; ``None`` grads are skipped; in the relevance view the values are not needed and
    ``inputs`` / ``outputs`` may be None); ``relevance_view`` says what the grads are;
    ``expected`` whether docs/math.md promises conservation (a callable is evaluated only when a check
    is active). Does nothing and returns None when no check is active, else the
    :class:`lrp_kernels.tools.check.Record`. Never changes tensors.
    """
    rec = _RECORDER
    if rec is None:
        return None
    input_grads, output_grads = _as_seq(input_grads), _as_seq(output_grads)
    inputs, outputs = _as_seq(inputs), _as_seq(outputs)
    if relevance_view:  # sums of the grads alone: the values may be left out
        inputs = inputs or (None,) * len(input_grads)
        outputs = outputs or (None,) * len(output_grads)
    return rec.add(op_name, inputs, input_grads, outputs, output_grads, relevance_view, expected)


def record_module(op: str, fn, inputs: Sequence[torch.Tensor], expected, then=None) -> torch.Tensor:
    """``then(fn(*inputs))`` (``then`` defaults to the identity); while a check records, also one
    record of the rule applied, from the gradient ``fn``'s output receives (before ``then``, which
    may rescale it through a hook) and the gradients its *own* inputs receive (through fresh
    views, so gradients reaching an input from other consumers are not counted). Gradient view.
    ``fn`` must return one tensor."""
    then = then or (lambda t: t)
    rec = _RECORDER
    if rec is None or not any(x.requires_grad for x in inputs):
        return then(fn(*inputs))
    own = tuple(x.view_as(x) if x.requires_grad else x for x in inputs)
    y = fn(*own)
    token = rec.on_forward(op, tuple(inputs), y)
    seen = {}

    def on_output(grad):
        seen["g"] = grad

    def on_inputs(grads):  # once per backward, None for inputs that got no gradient
        if "g" in seen and _RECORDER is rec:
            it = iter(grads)
            full = tuple(next(it) if x.requires_grad else None for x in own)
            rec.on_backward(token, full, seen.pop("g"), False, expected)

    y.register_hook(on_output)  # first: it sees the gradient before then's rescaling
    torch.autograd.graph.register_multi_grad_hook([x for x in own if x.requires_grad], on_inputs)
    return then(y)


# ---- which modules a gradient-view patch owns (relevance-view rules there would mix views) ----
_GRADIENT_VIEW_OWNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def claim_gradient_view(module, owner) -> None:
    """``module`` belongs to ``owner`` (an active gradient-view patch) until released."""
    _GRADIENT_VIEW_OWNERS[module] = owner


def release_gradient_view(module) -> None:
    _GRADIENT_VIEW_OWNERS.pop(module, None)


def gradient_view_owner(module):
    """The active gradient-view patch owning ``module``, or None."""
    owner = _GRADIENT_VIEW_OWNERS.get(module)
    return owner if owner is not None and getattr(owner, "active", True) else None


_VIEW_MARK = "_lrp_kernels_gradient_view_owner"


def mark_gradient_view_output(t: torch.Tensor, owner) -> None:
    """``t`` is the output of a model patched in the gradient view (``owner``): a relevance-view
    drop-in applied to it would hand the model a relevance where it expects a gradient."""
    setattr(t, _VIEW_MARK, owner)


def refuse_gradient_view_inputs(op: str, tensors) -> None:
    """Raise when a relevance-view drop-in gets the output of an active gradient-view patch."""
    for t in tensors:
        owner = getattr(t, _VIEW_MARK, None) if isinstance(t, torch.Tensor) else None
        if owner is not None and getattr(owner, "active", False):
            raise ValueError(
                f"lrp_kernels.functional.{op} (relevance view) got the output of a model patched in the "
                f"gradient view ({owner!r}): its backward would pass a relevance where the model expects "
                f"a gradient. Use lrp_kernels.grad.{op} (same rule, gradient view), or patch the model "
                f"with view='relevance'")


def is_zero(t: Optional[torch.Tensor]) -> bool:
    """None or all zeros (a bias that absorbs no relevance)."""
    return t is None or not bool(t.detach().any())
