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
   ``auto`` never picks the Triton interpreter.

Forcing a backend that is unavailable raises :class:`BackendUnavailableError` with the reason.
Forcing an available backend for an op it has no kernel for falls back to ``torch`` (every
rule has a torch implementation; a backend accelerates a subset of ops).
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("torch", "cpp", "triton")
AUTO_ORDER = ("triton", "cpp", "torch")
_ENV_VAR = "LRP_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """Raised when a forced backend cannot run here; the message says why."""


@dataclass
class _Impl:
    fn: Callable
    # returns None when the impl can take these tensors, else a short reason
    supports: Optional[Callable[..., Optional[str]]]
    # False: only used when forced (measured slower than the torch path it would replace)
    auto: bool = True


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
    auto: bool = True,
) -> None:
    """Register ``fn`` as the ``backend`` implementation of kernel op ``op``.

    ``supports(*args, **kwargs)`` (same arguments as ``fn``) returns ``None`` if ``fn`` can
    run on those inputs, else a short reason (used by ``auto`` to skip, and in errors).
    ``auto=False``: ``auto`` never picks it (a kernel measured slower than the torch path it
    would replace); forcing the backend still runs it.
    """
    _check_name(backend, allow_auto=False)
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
            if impl.auto and (impl.supports is None or impl.supports(*args, **kwargs) is None):
                return name, impl.fn
        return "torch", impls["torch"].fn
    if choice != "torch":
        ok, why = backend_status(choice)
        if not ok:
            raise BackendUnavailableError(f"backend {choice!r} is not available: {why}")
        impl = impls.get(choice)
        if impl is not None:
            reason = impl.supports(*args, **kwargs) if impl.supports else None
            if reason is not None:
                raise BackendUnavailableError(f"backend {choice!r} cannot run {op}: {reason}")
            return choice, impl.fn
    return "torch", impls["torch"].fn


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
