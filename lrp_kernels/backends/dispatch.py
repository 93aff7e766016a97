"""Backend dispatch: every rule computes through here.

Each rule (``lrp_kernels/ops/*.py``) names a few *kernel ops* (for example
``"linear_epsilon_backward"``) and registers its pure-PyTorch implementation under the
``torch`` backend. Faster backends (``cpp``, ``triton``) register the same op names with the
same signature; they differ only in how they compute it.

Choosing a backend, most specific first:

1. ``backend=`` passed to a public function (per call),
2. ``with lrp_kernels.use_backend("torch"):`` (per block, thread-local),
3. the ``LRP_KERNELS_BACKEND`` environment variable (process-wide),
4. ``"auto"``: the first available backend in ``AUTO_ORDER`` that implements the op for the
   tensors' device and dtype (and was not registered with ``auto=False``), else ``torch``.
   ``auto`` never picks the Triton interpreter. A kernel registered with ``auto="measured"``
   (two implementations of one rule whose order depends on the device and the shape, such as
   the fused Triton epsilon-linear vs rescale + the platform GEMM) is auto's choice only where
   it was *measured* faster than ``torch``: the first call of each (op, device, dtype, shape
   class) times both on the actual arguments, once per process, and caches the winner
   (:func:`measured_choices`; :func:`set_timer` injects timings in tests).

Forcing a backend that is unavailable raises :class:`BackendUnavailableError` with the reason.
Forcing an available backend for an op it has no kernel for falls back to ``torch`` (every
rule has a torch implementation; a backend accelerates a subset of ops), and so does forcing it
for a *variant* its kernel does not cover (its ``supports`` returns a :class:`NoKernel` reason,
e.g. an activation the fused gated-product kernel cannot recompute).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch

BACKENDS = ("torch", "cpp", "triton")
AUTO_ORDER = ("triton", "cpp", "torch")
_ENV_VAR = "LRP_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """Raised when a forced backend cannot run here; the message says why."""


class NoKernel(str):
    """A ``supports`` reason meaning "this backend has no kernel for this variant of the op"
    (not "cannot run here"): a forced backend then falls back to ``torch``, as for an op it does
    not implement, instead of raising."""


@dataclass
class _Impl:
    fn: Callable
    # returns None when the impl can take these tensors, else a short reason
    supports: Optional[Callable[..., Optional[str]]]
    # False: only used when forced (measured slower than the torch path it would replace);
    # "measured": auto picks it where it times faster than torch (per device / dtype / shape class)
    auto: Union[bool, str] = True


# op name -> backend name -> implementation
_REGISTRY: dict[str, dict[str, _Impl]] = {}
# backend name -> probe() -> (available, reason)
_PROBES: dict[str, Callable[[], tuple[bool, str]]] = {}
# backend name -> module that registers its kernels when imported (lazy: triton is heavy)
_LOADERS: dict[str, str] = {
    "cpp": "lrp_kernels.backends.cpp",
    "triton": "lrp_kernels.backends.triton",
}
_loaded: set[str] = set()
_state = threading.local()


def register_probe(backend: str, probe: Callable[[], tuple[bool, str]]) -> None:
    """Register the availability check of ``backend`` (returns ``(ok, reason)``)."""
    _check_name(backend, allow_auto=False)
    _PROBES[backend] = probe


def register(
    op: str,
    backend: str,
    fn: Callable,
    supports: Optional[Callable[..., Optional[str]]] = None,
    auto: Union[bool, str] = True,
) -> None:
    """Register ``fn`` as the ``backend`` implementation of kernel op ``op``.

    ``supports(*args, **kwargs)`` (same arguments as ``fn``) returns ``None`` if ``fn`` can
    run on those inputs, else a short reason (used by ``auto`` to skip, and in errors).
    ``auto=False``: ``auto`` never picks it (a kernel measured slower than the torch path it
    would replace); ``auto="measured"``: ``auto`` picks it where it times faster than ``torch``
    (see the module docstring); forcing the backend still runs it either way.
    """
    _check_name(backend, allow_auto=False)
    if auto not in (True, False, "measured"):
        raise ValueError(f"auto must be True, False or 'measured', got {auto!r}")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, supports, auto)


def _check_name(backend: str, allow_auto: bool = True) -> None:
    names = BACKENDS + (("auto",) if allow_auto else ())
    if backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")


def _ensure_loaded(backend: str) -> None:
    if backend in _loaded or backend not in _LOADERS:
        return
    _loaded.add(backend)
    import importlib

    try:
        importlib.import_module(_LOADERS[backend])
    except ModuleNotFoundError as err:  # backend not written (yet) or its deps missing
        if err.name and _LOADERS[backend].startswith(err.name):
            _PROBES.setdefault(backend, lambda: (False, f"module {_LOADERS[backend]} not present"))
        else:
            reason = f"import of {_LOADERS[backend]} failed: {err}"
            _PROBES.setdefault(backend, lambda r=reason: (False, r))


def backend_status(backend: str) -> tuple[bool, str]:
    """``(available, reason)`` for one backend."""
    _check_name(backend, allow_auto=False)
    if backend == "torch":
        return True, f"pure PyTorch {torch.__version__}, always available"
    _ensure_loaded(backend)
    probe = _PROBES.get(backend)
    if probe is None:
        return False, "no implementation registered"
    try:
        return probe()
    except Exception as err:  # a probe must never crash the caller
        return False, f"availability check failed: {err}"


def check_backend(backend: str) -> None:
    """``backend`` is a name this dispatcher knows (or ``"auto"``) and, if forced, can run here.

    Raises ``ValueError`` naming the choices, or :class:`BackendUnavailableError` with the reason.
    """
    _check_name(backend)
    if backend not in ("auto", "torch"):
        ok, why = backend_status(backend)
        if not ok:
            raise BackendUnavailableError(f"backend {backend!r} is not available: {why}")


def available_backends() -> dict[str, dict[str, object]]:
    """What is usable here and why (not): ``{name: {"available": bool, "reason": str}}``."""
    out = {}
    for name in BACKENDS:
        ok, why = backend_status(name)
        out[name] = {"available": ok, "reason": why}
    return out


def forced_backend() -> Optional[str]:
    """The innermost ``use_backend`` choice of this thread, or ``None`` outside any block."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


def current_backend() -> str:
    """The backend selected by ``use_backend`` or ``LRP_KERNELS_BACKEND`` (default ``auto``)."""
    forced = forced_backend()
    if forced:
        return forced
    env = os.environ.get(_ENV_VAR, "auto").strip().lower() or "auto"
    if env not in BACKENDS + ("auto",):
        raise ValueError(f"{_ENV_VAR} must be one of {BACKENDS + ('auto',)}, got {env!r}")
    return env


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Force ``backend`` for every rule computed inside the block (thread-local).

    Raises at entry if the backend is unavailable, with the reason.
    """
    _check_name(backend)
    if backend != "auto":
        ok, why = backend_status(backend)
        if not ok:
            raise BackendUnavailableError(f"backend {backend!r} is not available: {why}")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(backend)
    try:
        yield
    finally:
        stack.pop()


def resolve(op: str, *args, backend: Optional[str] = None, **kwargs) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for these arguments: ``(backend_name, fn)``."""
    if op not in _REGISTRY or "torch" not in _REGISTRY[op]:
        raise KeyError(f"unknown kernel op {op!r}")
    choice = backend or current_backend()
    _check_name(choice)
    impls = _REGISTRY[op]
    if choice == "auto":
        for name in AUTO_ORDER:
            if name == "torch":
                break
            if not backend_status(name)[0] or name not in impls:
                continue
            if _interpreted(name, args):
                continue
            impl = impls[name]
            if not impl.auto or (impl.supports is not None and impl.supports(*args, **kwargs) is not None):
                continue
            if impl.auto == "measured" and _measured_winner(op, name, impl, impls["torch"], args, kwargs) != name:
                continue
            return name, impl.fn
        return "torch", impls["torch"].fn
    if choice != "torch":
        ok, why = backend_status(choice)
        if not ok:
            raise BackendUnavailableError(f"backend {choice!r} is not available: {why}")
        impl = impls.get(choice)
        if impl is not None:
            reason = impl.supports(*args, **kwargs) if impl.supports else None
            if isinstance(reason, NoKernel):
                return "torch", impls["torch"].fn
            if reason is not None:
                raise BackendUnavailableError(f"backend {choice!r} cannot run {op}: {reason}")
            return choice, impl.fn
    return "torch", impls["torch"].fn


# ---- measured choice ------------------------------------------------------------------------
_MEASURED: dict[tuple, str] = {}
_MEASURE_LOCK = threading.Lock()


def _bucket(n: int) -> int:
    """Shape classes: the next power of two (a 3000-row and a 4000-row call share one)."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@functools.lru_cache(maxsize=None)
def _device_key(device: torch.device) -> str:
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def shape_class(args: tuple) -> tuple:
    """The key a measurement is cached under: per tensor argument its device (the GPU's name),
    dtype and the power-of-two classes of its rows (all leading dimensions) and last dimension."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            last = a.shape[-1] if a.dim() else 1
            out.append((_device_key(a.device), str(a.dtype).replace("torch.", ""),
                        _bucket(a.numel() // max(last, 1)), _bucket(last)))
        else:
            out.append(None)
    return tuple(out)


def _timing_args(args: tuple) -> tuple:
    """The arguments to time on: stand-ins (one element expanded to a shape, as a forward pass
    asks which backend its backward will use) become random tensors of their shape, so the
    kernels are timed on real memory traffic."""
    def real(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel() > 1 and 0 in a.stride():
            return torch.randn(a.shape, dtype=a.dtype, device=a.device)
        return a
    return tuple(real(a) for a in args)


def _default_timer(fn: Callable, args: tuple, kwargs: dict) -> float:
    """Best of three runs after a warm-up (which includes a Triton compile), in seconds."""
    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn(*args, **kwargs)
    sync()
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


_timer: Callable[[Callable, tuple, dict], float] = _default_timer


def set_timer(timer: Optional[Callable[[Callable, tuple, dict], float]]) -> None:
    """Replace how measured choices time an implementation (``timer(fn, args, kwargs) ->
    seconds``); ``None`` restores the default. Clears the cached choices."""
    global _timer
    _timer = _default_timer if timer is None else timer
    _MEASURED.clear()


def measured_choices() -> dict[tuple, str]:
    """The cached measured choices of this process: ``{(op, backend, shape class): winner}``."""
    return dict(_MEASURED)


def _measured_winner(op: str, name: str, impl: _Impl, torch_impl: _Impl, args: tuple, kwargs: dict) -> str:
    key = (op, name, shape_class(args))
    with _MEASURE_LOCK:
        winner = _MEASURED.get(key)
        if winner is None:
            with torch.no_grad():
                timed = _timing_args(args)
                fast, base = _timer(impl.fn, timed, kwargs), _timer(torch_impl.fn, timed, kwargs)
            winner = _MEASURED[key] = name if fast < base else "torch"
    return winner


def _interpreted(backend: str, args: tuple) -> bool:
    """True when ``backend`` would run through the Triton interpreter (auto never does)."""
    if backend != "triton":
        return False
    return not any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)


def chosen_backend(op: str, *args, backend: Optional[str] = None, **kwargs) -> str:
    """The backend :func:`call` would run ``op`` on for these arguments (nothing is computed)."""
    return resolve(op, *args, backend=backend, **kwargs)[0]


def call(op: str, *args, backend: Optional[str] = None, **kwargs):
    """Run ``op`` on the chosen backend."""
    _, fn = resolve(op, *args, backend=backend, **kwargs)
    return fn(*args, **kwargs)


def implementations(op: str) -> list[str]:
    """Backends that registered a kernel for ``op``."""
    for b in BACKENDS:
        _ensure_loaded(b)
    return sorted(_REGISTRY.get(op, {}))


def ops() -> list[str]:
    """All registered kernel op names."""
    return sorted(_REGISTRY)
