"""The ``cpp`` backend: C++ kernels for the norms, the epsilon rule's element-wise passes and the
gated product's backward (``csrc/``).

Imported lazily by :mod:`lrp_kernels.backends.dispatch` the first time backend ``cpp`` is asked
about; registers the availability probe and these kernel ops (same signatures and results as
the torch versions): ``rms_norm_forward``, ``rms_norm_rstd``, ``rms_norm_backward`` (gradient view),
``layer_norm_forward``, ``layer_norm_backward`` (:mod:`lrp_kernels.ops.norm`),
``epsilon_factor_gradient``, ``epsilon_output_backward`` (:mod:`lrp_kernels.ops.linear_epsilon`)
and ``gated_product_backward`` (:mod:`lrp_kernels.ops.elementwise`; SiLU and tanh-GELU).

Build, once per machine
    The extension is compiled with ``torch.utils.cpp_extension.load`` (ninja + the C++
    compiler; the CUDA variant too when torch has CUDA and ``nvcc`` is found) into
    ``$LRP_KERNELS_CACHE_DIR`` or ``$XDG_CACHE_HOME/lrp_kernels/ext`` (default
    ``~/.cache/lrp_kernels/ext``), in a folder named after a hash of the sources, the flags,
    torch, Python and the CPU, so a change of any of them builds afresh and an unchanged one
    just loads the ``.so`` (no compiler run). ``lrp-kernels build-ext`` builds ahead of time.
    Concurrent builders wait on a lock file holding the owner's pid; a lock left behind by a
    killed build (owner dead, or older than ``STALE_LOCK_SECONDS``) is removed, together
    with torch's own ``lock`` file, which would otherwise make every later build wait forever.

When it builds (the choice)
    The probe never compiles: ``available_backends()`` / ``lrp-kernels info`` stay instant.
    It reports ``False`` when disabled (``LRP_KERNELS_NO_CPP=1``), when no compiler or ninja
    is found, or after a failed build; otherwise ``True`` ("builds on first use"). The build
    happens on the first kernel call that can use it (the ops' ``supports`` check builds),
    under ``auto`` for CPU tensors as well as when the backend is forced. If that build fails,
    ``auto`` continues with the torch implementation and a forced ``cpp`` raises
    :class:`~lrp_kernels.backends.dispatch.BackendUnavailableError` with the reason.

Exactly one ``RuntimeWarning`` per process says why the C++ kernels are not used (missing
compiler or ninja, or a build error with the path of the build log); ``LRP_KERNELS_NO_CPP=1``
is a choice and is silent.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from . import dispatch

EXT_NAME = "lrp_kernels_cpp"
ENV_DISABLE = "LRP_KERNELS_NO_CPP"
ENV_HUGE_PAGES = "LRP_KERNELS_HUGE_PAGES"  # auto (default) | on | off
ENV_CACHE = "LRP_KERNELS_CACHE_DIR"
STALE_LOCK_SECONDS = 600.0  # a cold build takes ~30-60 s; ten minutes means it died
CPU_SOURCES = ("bindings.cpp", "norm_cpu.cpp", "epsilon_cpu.cpp", "gated_cpu.cpp")
CUDA_SOURCES = ("norm_cuda.cu",)
HEADERS = ("norm.h", "norm_cuda_kernels.cuh", "cpu_common.h", "epsilon.h", "gated.h")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_READY_MARKER = "build-info.json"  # written after a successful build; the .so is complete
_TORCH_LOCK = "lock"  # torch.utils.file_baton.FileBaton's file in the build directory
_OUR_LOCK = "build.lock"


class BuildError(RuntimeError):
    """The extension cannot be built or loaded here; the message says why."""


class _State:
    def __init__(self) -> None:
        self.module: Optional[ModuleType] = None
        self.error: Optional[str] = None
        self.build_dir: Optional[Path] = None
        self.build_seconds: Optional[float] = None  # None: loaded from the cache
        self.key: Optional[tuple] = None  # (build dir, with_cuda), computed once per process
        self.toolchain_ok = False  # compiler, ninja and sources found (checked until they are)


_STATE = _State()
_LOCK = threading.Lock()
_warned = False


def huge_page_advice_wanted(defrag_path: str = "/sys/kernel/mm/transparent_hugepage/defrag") -> bool:
    """Whether the extension should advise huge pages for its large CPU outputs.

    ``LRP_KERNELS_HUGE_PAGES=on|off`` decides; ``auto`` (default) advises only where a fault in an
    advised region cannot stall in synchronous compaction: the kernel's THP ``defrag`` setting is
    ``defer`` (compaction in the background) or ``never``. Under ``madvise``, ``defer+madvise``
    and ``always``, one fault may compact memory for tens of ms, and a fresh output per call turns
    that into a loss against the torch fallback (benchmarks/bench_norm_pages.py).
    """
    choice = os.environ.get(ENV_HUGE_PAGES, "auto").strip().lower() or "auto"
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"{ENV_HUGE_PAGES} must be auto, on or off, got {choice!r}")
    if choice != "auto":
        return choice == "on"
    try:
        text = Path(defrag_path).read_text()
    except OSError:
        return False
    selected = text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()
    return selected in ("defer", "never")


def disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no")


def _warn_once(reason: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(f"lrp_kernels: the C++ kernels cannot be used ({reason}); backend 'auto' uses the "
                  f"PyTorch implementation of the norm ops instead. Set {ENV_DISABLE}=1 to skip the "
                  "C++ backend silently.", RuntimeWarning, stacklevel=3)


# ---- sources, flags, cache location ----------------------------------------------------------

def source_dir() -> Optional[Path]:
    """``csrc/`` shipped inside the package, else the repository checkout's top-level one."""
    package = Path(__file__).resolve().parents[1]
    for cand in (package / "csrc", package.parent / "csrc"):
        if (cand / CPU_SOURCES[0]).is_file():
            return cand
    return None


def _cuda_wanted() -> bool:
    """Build the CUDA variant too: CUDA torch and a CUDA toolkit (nvcc) are present."""
    if not (torch.cuda.is_available() and torch.version.cuda):
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists()


def _flags(with_cuda: bool) -> dict:
    # no FMA contraction: rounding like the torch ops (e.g. u - mean(u) is exactly 0 for one
    # element); the kernels are memory-bound, so this costs nothing measurable.
    # -fno-trapping-math changes no value (no FP traps are ever enabled): it lets gcc turn the
    # clamps of the gated kernel's exp into vector min/max instead of giving up on the loop
    cflags = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
    ldflags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for's OpenMP pragma lives in a header: it only runs in parallel when this
        # code is compiled with OpenMP (the runtime is torch's own libgomp, already loaded)
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
        if platform.machine() in ("x86_64", "AMD64"):
            cflags.append("-march=native")  # built on the machine that runs it; key has the CPU
    cuda_cflags = ["-O3", "--fmad=false"]
    if with_cuda:
        cflags.append("-DLRP_WITH_CUDA")
        cuda_cflags.append("-DLRP_WITH_CUDA")
    return {"extra_cflags": cflags, "extra_ldflags": ldflags, "extra_cuda_cflags": cuda_cflags}


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor()


def cache_root() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "lrp_kernels" / "ext"


def _key() -> tuple[Path, bool]:
    """``(build directory, with_cuda)``: the folder is named after everything the .so depends on."""
    if _STATE.key is None:
        src = source_dir()
        if src is None:
            raise BuildError("the C++ sources (csrc/) are not installed with this copy of lrp_kernels")
        with_cuda = _cuda_wanted()
        h = hashlib.sha256()
        names = CPU_SOURCES + HEADERS + (CUDA_SOURCES if with_cuda else ())
        for name in names:
            p = src / name
            h.update(name.encode() + b"\0" + (p.read_bytes() if p.exists() else b"") + b"\0")
        for part in (torch.__version__, str(torch.version.cuda), sys.version, platform.machine(),
                     json.dumps(_flags(with_cuda), sort_keys=True), os.environ.get("CXX", ""),
                     _cpu_fingerprint()):
            h.update(part.encode() + b"\0")
        _STATE.key = (cache_root() / f"{EXT_NAME}-{h.hexdigest()[:16]}", with_cuda)
    return _STATE.key


def build_dir() -> Path:
    """Where the extension for this machine, torch and these sources lives (or will)."""
    return _key()[0]


def _find_ninja() -> Optional[str]:
    found = shutil.which("ninja")
    if found:
        return found
    # pip's ninja lives next to this interpreter; torch looks it up on PATH: put it there
    for d in {Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))}:
        if (d / "ninja").exists():
            os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"
            return str(d / "ninja")
    return None


def toolchain_problem() -> Optional[str]:
    """Why this machine cannot build the extension, or ``None``."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler found ({cxx!r} is not on PATH; install g++/clang or set CXX)"
    if _find_ninja() is None:
        return "ninja not found (pip install ninja)"
    if source_dir() is None:
        return "the C++ sources (csrc/) are not installed with this copy of lrp_kernels"
    return None


# ---- build lock --------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_is_stale(path: Path, stale_seconds: float = STALE_LOCK_SECONDS) -> bool:
    """A lock whose owner died (same host) or that is older than ``stale_seconds``."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > stale_seconds:
        return True
    try:
        owner = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return False  # being written right now
    return owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1)))


class BuildLock:
    """Exclusive right to build in ``directory``; clears what an interrupted build left.

    While we hold it nobody else can be building here, so torch's ``lock`` file (which has no
    owner information and makes ``cpp_extension.load`` wait forever) is removed if present.
    """

    def __init__(self, directory: Path, timeout: float = STALE_LOCK_SECONDS + 60,
                 stale_seconds: float = STALE_LOCK_SECONDS) -> None:
        self.path = Path(directory) / _OUR_LOCK
        self.torch_lock = Path(directory) / _TORCH_LOCK
        self.timeout, self.stale_seconds = timeout, stale_seconds
        self.removed: list[str] = []

    def __enter__(self) -> "BuildLock":
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if lock_is_stale(self.path, self.stale_seconds):
                    self._remove(self.path)
                    continue
                if time.monotonic() > deadline:
                    raise BuildError(f"timed out waiting for another build to finish ({self.path})")
                time.sleep(0.5)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}, f)
            break
        if self.torch_lock.exists():
            self._remove(self.torch_lock)
        return self

    def _remove(self, p: Path) -> None:
        try:
            p.unlink()
            self.removed.append(str(p))
        except FileNotFoundError:
            pass

    def __exit__(self, *exc) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


# ---- build / load ----------------------------------------------------------------------------

def _built_so(directory: Path) -> Optional[Path]:
    """The finished library in ``directory`` (named in the ready marker), or ``None``."""
    try:
        info = json.loads((directory / _READY_MARKER).read_text())
    except (OSError, ValueError):
        return None
    # torch names the module <name>_v<k> when one process builds twice with different sources
    so = directory / info.get("library", f"{EXT_NAME}.so")
    return so if so.is_file() else None


def _import_so(path: Path) -> ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.name.split(".")[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(directory: Path, with_cuda: bool, verbose: bool) -> ModuleType:
    from torch.utils.cpp_extension import load

    src = source_dir()
    sources = [str(src / s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    directory.mkdir(parents=True, exist_ok=True)
    with BuildLock(directory):
        so = _built_so(directory)
        if so is not None:  # built meanwhile by another process
            return _import_so(so)
        print(f"lrp_kernels: building the C++ extension (once; ~30-60 s) in {directory}",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            module = load(name=EXT_NAME, sources=sources, build_directory=str(directory),
                          with_cuda=with_cuda, verbose=verbose, **_flags(with_cuda))
        except Exception as err:
            log = directory / "build.log"
            log.write_text(f"sources: {sources}\nflags: {_flags(with_cuda)}\ntorch {torch.__version__}, "
                           f"python {sys.version}\n\n{type(err).__name__}: {err}\n")
            first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
            raise BuildError(f"build failed: {first[:200]} (full log: {log})") from err
        _STATE.build_seconds = time.perf_counter() - t0
        (directory / _READY_MARKER).write_text(json.dumps({
            "library": Path(module.__file__).name,
            "seconds": round(_STATE.build_seconds, 1), "torch": torch.__version__,
            "python": platform.python_version(), "with_cuda": with_cuda, "sources": sources}))
        return module


def load_extension(verbose: bool = False) -> ModuleType:
    """The compiled module, building it first if needed; raises :class:`BuildError` with the reason.

    A failure is remembered for the rest of the process (one build attempt, one warning).
    """
    with _LOCK:
        if _STATE.module is not None:
            return _STATE.module
        if disabled():
            raise BuildError(f"disabled by {ENV_DISABLE}=1")
        if _STATE.error is not None:
            raise BuildError(_STATE.error)
        try:
            problem = toolchain_problem()
            if problem:
                raise BuildError(problem)
            directory, with_cuda = _key()
            _STATE.build_dir = directory
            so = _built_so(directory)
            module = _import_so(so) if so is not None else _build(directory, with_cuda, verbose)
            module.set_huge_page_advice(huge_page_advice_wanted())
            _STATE.module = module
        except BuildError as err:
            _STATE.error = str(err)
            _warn_once(_STATE.error)
            raise
        except Exception as err:  # e.g. a corrupt .so: report, never crash the caller's rule
            _STATE.error = f"loading the extension failed: {type(err).__name__}: {err}"
            _warn_once(_STATE.error)
            raise BuildError(_STATE.error) from err
        return _STATE.module


def is_built() -> bool:
    """True when the extension for this configuration is already compiled (loading is cheap)."""
    if _STATE.module is not None:
        return True
    try:
        d = build_dir()
    except BuildError:
        return False
    return _built_so(d) is not None


def probe() -> tuple[bool, str]:
    """Cheap availability check (never compiles; see the module docstring)."""
    if disabled():
        return False, f"disabled by {ENV_DISABLE}=1"
    if _STATE.module is not None:
        kind = "CPU + CUDA" if getattr(_STATE.module, "with_cuda", False) else "CPU"
        return True, f"C++ extension loaded ({kind}) from {_STATE.build_dir}"
    if _STATE.error is not None:
        _warn_once(_STATE.error)
        return False, _STATE.error
    if not _STATE.toolchain_ok:  # the probe runs on every `auto` call: check once
        problem = toolchain_problem()
        if problem:
            _STATE.error = problem
            _warn_once(problem)
            return False, problem
        _STATE.toolchain_ok = True
    try:
        d = build_dir()
    except BuildError as err:
        return False, str(err)
    if is_built():
        return True, f"C++ extension built in {d} (loads on first use)"
    return True, (f"not built yet: builds on first use (~30-60 s, once) in {d}; "
                  "`lrp-kernels build-ext` builds it now")


# ---- kernel ops ------------------------------------------------------------------------------

def _supports_tensor(t) -> Optional[str]:
    """None if the extension can take ``t`` (builds it on first use), else the reason."""
    if not isinstance(t, torch.Tensor):
        return f"expected a tensor, got {type(t).__name__}"
    if t.dtype not in SUPPORTED_DTYPES:
        return f"dtype {t.dtype} is not supported (float32/float64/bfloat16/float16)"
    if t.dim() == 0 or t.shape[-1] == 0:
        return "needs a non-empty last dim"
    if t.device.type == "cuda":
        if _STATE.module is not None and not getattr(_STATE.module, "with_cuda", False):
            return "the C++ extension was built without CUDA"
        if _STATE.module is None and not _cuda_wanted():
            return "the CUDA variant needs a CUDA build of torch and the CUDA toolkit (nvcc)"
    elif t.device.type != "cpu":
        return f"device {t.device} is not supported (cpu, cuda)"
    try:
        load_extension()
    except BuildError as err:
        return str(err)
    return None


def _supports_arg(index: int):
    def supports(*args, **kwargs) -> Optional[str]:
        return _supports_tensor(args[index])
    return supports


def rms_norm_forward_cpp(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float):
    return tuple(load_extension().rms_norm_forward(x, weight, float(eps)))


def rms_norm_rstd_cpp(x: torch.Tensor, eps: float) -> torch.Tensor:
    return load_extension().rms_norm_rstd(x, float(eps))


def rms_norm_backward_cpp(grad_y: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor):
    return load_extension().rms_norm_backward(grad_y, weight, rstd)


def layer_norm_forward_cpp(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           eps: float):
    return tuple(load_extension().layer_norm_forward(x, weight, bias, float(eps)))


def layer_norm_backward_cpp(grad_y, x, weight, bias, mean, rstd, epsilon, relevance):
    return load_extension().layer_norm_backward(grad_y, x, weight, bias, mean, rstd, float(epsilon),
                                                bool(relevance))


def epsilon_factor_gradient_cpp(z: torch.Tensor, epsilon: float, dtype: torch.dtype) -> torch.Tensor:
    return load_extension().epsilon_factor(z, float(epsilon))


def _supports_epsilon_factor(z, epsilon, dtype) -> Optional[str]:
    if isinstance(z, torch.Tensor) and z.device.type != "cpu":
        return "CPU only (on CUDA the element-wise torch ops are already one kernel each)"
    if isinstance(z, torch.Tensor) and dtype != z.dtype:
        return f"keeps z's dtype ({z.dtype}), {dtype} was asked for"
    return _supports_tensor(z)


def epsilon_output_backward_cpp(grad_y: torch.Tensor, factor: torch.Tensor, share: float = 1.0) -> torch.Tensor:
    return load_extension().epsilon_output_backward(grad_y, factor, float(share))


def _supports_epsilon_output(grad_y, factor, share=1.0) -> Optional[str]:
    for t in (grad_y, factor):
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            return "CPU only"
    if isinstance(grad_y, torch.Tensor) and isinstance(factor, torch.Tensor):
        if grad_y.shape != factor.shape:
            return "the factor must have the gradient's shape"
        if factor.dtype == torch.float64 and grad_y.dtype != torch.float64:
            return "a float64 factor needs float64 arithmetic (the torch path)"
    return _supports_tensor(grad_y) or _supports_tensor(factor)


_ACTIVATION_CODES = {"silu": 0, "gelu_tanh": 1}  # csrc/gated.h's Activation


def gated_product_backward_cpp(grad_m, g, u, act, epsilon, need_g, need_u, producer_epsilon=0.0, act_kind=None):
    gg, gu = load_extension().gated_product_backward(grad_m, g, u, _ACTIVATION_CODES[act_kind], float(epsilon),
                                                     float(producer_epsilon), bool(need_g), bool(need_u))
    return (gg if need_g else None), (gu if need_u else None)


def _supports_gated(grad_m, g, u, act, epsilon, need_g, need_u, producer_epsilon=0.0, act_kind=None) -> Optional[str]:
    # variants the kernel does not cover run on the torch path even when cpp is forced
    if act_kind not in _ACTIVATION_CODES:
        return dispatch.NoKernel(f"activation {act_kind or getattr(act, '__name__', type(act).__name__)!r} has no "
                                 f"C++ kernel (known: {', '.join(_ACTIVATION_CODES)})")
    if not epsilon > 0:
        return dispatch.NoKernel("needs epsilon > 0")
    tensors = (grad_m, g, u)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "expected tensors"
    if any(t.device.type != "cpu" for t in tensors):
        return "CPU only"
    if not (grad_m.shape == g.shape == u.shape and grad_m.dtype == g.dtype == u.dtype):
        return dispatch.NoKernel("grad_m, g and u must have one shape and one dtype (no broadcasting)")
    if g.dtype == torch.float64:
        return dispatch.NoKernel("float64 runs on the torch path")
    return _supports_tensor(g)


dispatch.register_probe("cpp", probe)
dispatch.register("rms_norm_forward", "cpp", rms_norm_forward_cpp, _supports_arg(0))
dispatch.register("rms_norm_rstd", "cpp", rms_norm_rstd_cpp, _supports_arg(0))
dispatch.register("rms_norm_backward", "cpp", rms_norm_backward_cpp, _supports_arg(0))
dispatch.register("layer_norm_forward", "cpp", layer_norm_forward_cpp, _supports_arg(0))
dispatch.register("layer_norm_backward", "cpp", layer_norm_backward_cpp, _supports_arg(1))
dispatch.register("epsilon_factor_gradient", "cpp", epsilon_factor_gradient_cpp, _supports_epsilon_factor)
dispatch.register("epsilon_output_backward", "cpp", epsilon_output_backward_cpp, _supports_epsilon_output)
dispatch.register("gated_product_backward", "cpp", gated_product_backward_cpp, _supports_gated)
