"""The C++ backend's machinery (lrp_kernels.backends.cpp, csrc/): choosing it, the torch fallback
when the extension is disabled / cannot be built (one warning, a forced backend raises), stale
build locks, and that the CUDA kernels compile with nvcc (and run, on a GPU). The kernels' numbers
(vs the float64 oracle and the torch fallback) are checked in tests/ops/test_norm.py.

Inputs and tolerances: tests/helpers/cpp.py. The extension is built once per machine (cached in
the user cache; ~30-60 s cold).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from lrp_kernels import functional as F
from lrp_kernels import grad as G
from lrp_kernels.backends import dispatch
from lrp_kernels.backends.dispatch import BackendUnavailableError

from helpers import oracle as O
from helpers.cpp import CSRC, REPO, _cpp, assert_ln_relevance, extension_or_skip, inputs, rel


@pytest.fixture(scope="session")
def ext():
    """The compiled extension (built once per machine; skipped only where nothing can build it)."""
    return extension_or_skip()


@pytest.fixture
def fresh_state(monkeypatch):
    """A process state as if nothing had been built or warned yet (restored afterwards)."""
    monkeypatch.setattr(_cpp, "_STATE", _cpp._State())
    monkeypatch.setattr(_cpp, "_warned", False)
    monkeypatch.delenv(_cpp.ENV_DISABLE, raising=False)
    monkeypatch.delenv("LRP_KERNELS_BACKEND", raising=False)
    return _cpp


# ---- huge-page advice for large outputs ------------------------------------------------------------

@pytest.mark.parametrize("defrag,want", [
    ("always defer defer+madvise [madvise] never", False),   # synchronous compaction: may stall
    ("[always] defer defer+madvise madvise never", False),
    ("always defer [defer+madvise] madvise never", False),
    ("always [defer] defer+madvise madvise never", True),    # compaction in the background
    ("always defer defer+madvise madvise [never]", True),    # huge pages only when free
])
def test_huge_page_advice_follows_the_defrag_setting(tmp_path, monkeypatch, defrag, want):
    monkeypatch.delenv(_cpp.ENV_HUGE_PAGES, raising=False)
    f = tmp_path / "defrag"
    f.write_text(defrag + "\n")
    assert _cpp.huge_page_advice_wanted(str(f)) is want
    monkeypatch.setenv(_cpp.ENV_HUGE_PAGES, "on")
    assert _cpp.huge_page_advice_wanted(str(f)) is True
    monkeypatch.setenv(_cpp.ENV_HUGE_PAGES, "off")
    assert _cpp.huge_page_advice_wanted(str(f)) is False
    monkeypatch.setenv(_cpp.ENV_HUGE_PAGES, "sometimes")
    with pytest.raises(ValueError, match="LRP_KERNELS_HUGE_PAGES"):
        _cpp.huge_page_advice_wanted(str(f))
    monkeypatch.delenv(_cpp.ENV_HUGE_PAGES)
    assert _cpp.huge_page_advice_wanted(str(tmp_path / "missing")) is False


def test_extension_applies_the_advice_and_outputs_match(ext):
    """The switch reaches the extension; the output values never depend on it."""
    before = ext.huge_page_advice()
    x = torch.randn(2048, 2048)  # 16 MiB: above the advice threshold
    try:
        ys = []
        for on in (True, False):
            ext.set_huge_page_advice(on)
            assert ext.huge_page_advice() is on
            ys.append(ext.rms_norm_forward(x, None, 1e-6)[0])
        assert torch.equal(ys[0], ys[1])
    finally:
        ext.set_huge_page_advice(before)
    assert before is _cpp.huge_page_advice_wanted()


# ---- auto picks it for CPU tensors ----------------------------------------------------------------

def test_auto_picks_cpp_for_cpu_tensors(ext, monkeypatch):
    monkeypatch.delenv("LRP_KERNELS_BACKEND", raising=False)
    x, w, b, gy = inputs((4, 33), torch.float32, seed=1)
    assert dispatch.resolve("rms_norm_forward", x, w, 1e-6)[0] == "cpp"
    assert dispatch.resolve("layer_norm_backward", gy, x, w, b, x[:, 0], x[:, 0], 1e-6, True)[0] == "cpp"
    ok, why = dispatch.backend_status("cpp")
    assert ok and "loaded" in why
    # what the extension cannot take goes to torch under auto, with a reason
    xi = torch.ones(4, 33, dtype=torch.int32)
    assert "dtype" in _cpp._supports_tensor(xi)
    assert "device" in _cpp._supports_tensor(torch.empty(2, 3, device="meta"))
    if not torch.cuda.is_available():
        assert _cpp._supports_tensor(torch.empty(2, 3)) is None



# ---- fallback: disabled, no toolchain, build error --------------------------------------------------

def _run_both_views(**kw):
    x, w, b, gy = inputs((3, 40), torch.float32, seed=4)
    xr = x.clone().requires_grad_()
    G.rms_norm_identity(xr, w, 1e-6, **kw).backward(gy)
    xl = x.clone().requires_grad_()
    F.layer_norm(xl, w, b, 1e-5, epsilon=1e-6, **kw).backward(gy)
    assert rel(xr.grad, O.rms_norm_G(x, w, gy, 1e-6)) < 1e-5
    assert_ln_relevance(xl.grad, x, w, b, gy, 1e-5, 1e-6, torch.float32)


def test_disabled_by_env(fresh_state, monkeypatch):
    monkeypatch.setenv(_cpp.ENV_DISABLE, "1")
    ok, why = dispatch.backend_status("cpp")
    assert not ok and _cpp.ENV_DISABLE in why
    x = torch.randn(2, 8)
    assert dispatch.resolve("rms_norm_forward", x, None, 1e-6)[0] == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deliberate choice: no warning
        _run_both_views()
    with pytest.raises(BackendUnavailableError, match=_cpp.ENV_DISABLE):
        _run_both_views(backend="cpp")
    with pytest.raises(BackendUnavailableError, match=_cpp.ENV_DISABLE):
        with dispatch.use_backend("cpp"):
            pass
    assert fresh_state._STATE.module is None  # nothing was loaded


@pytest.mark.parametrize("missing", ["compiler", "ninja"])
def test_missing_toolchain_falls_back_with_one_warning(fresh_state, monkeypatch, missing):
    if missing == "compiler":
        monkeypatch.setenv("CXX", "no-such-cxx-compiler")
        expect = "no C++ compiler"
    else:
        monkeypatch.setattr(_cpp, "_find_ninja", lambda: None)
        expect = "ninja not found"
    with pytest.warns(RuntimeWarning, match=re.escape(expect)) as record:
        _run_both_views()  # auto: torch fallback, correct results
        _run_both_views()
        dispatch.available_backends()
    assert sum(issubclass(w.category, RuntimeWarning) and "C++" in str(w.message) for w in record) == 1
    ok, why = dispatch.backend_status("cpp")
    assert not ok and expect in why
    with pytest.raises(BackendUnavailableError, match=re.escape(expect)):
        _run_both_views(backend="cpp")


def test_build_error_falls_back_with_log(fresh_state, monkeypatch, tmp_path):
    """A broken source: auto falls back (one warning naming the log), a forced cpp raises."""
    src = tmp_path / "csrc"
    shutil.copytree(CSRC, src)
    for name in _cpp.CPU_SOURCES:  # every file fails at once: ninja waits for running compiles
        text = (src / name).read_text()
        # a missing header is fatal at once (#error would still parse the torch headers)
        (src / name).write_text('#include "deliberately_broken_for_the_test.h"\n' + text)
    monkeypatch.setattr(_cpp, "source_dir", lambda: src)
    monkeypatch.setenv(_cpp.ENV_CACHE, str(tmp_path / "cache"))
    x, w, _, gy = inputs((3, 40), torch.float32, seed=6)
    with pytest.warns(RuntimeWarning, match="build failed") as record:
        assert dispatch.resolve("rms_norm_forward", x, w, 1e-6)[0] == "torch"
        _run_both_views()
    msgs = [str(r.message) for r in record if "C++" in str(r.message)]
    assert len(msgs) == 1 and "build.log" in msgs[0]
    log = Path(msgs[0].split("full log: ")[1].split(")")[0])
    assert log.is_file() and "deliberately_broken" in log.read_text()
    assert log.parent.parent == tmp_path / "cache"
    ok, why = dispatch.backend_status("cpp")
    assert not ok and "build failed" in why
    with pytest.raises(BackendUnavailableError, match="build failed"):
        _run_both_views(backend="cpp")
    assert not (log.parent / "build.lock").exists()  # released after the failure


def test_cache_dir_follows_sources_and_env(fresh_state, monkeypatch, tmp_path):
    monkeypatch.setenv(_cpp.ENV_CACHE, str(tmp_path / "a"))
    d1 = _cpp.build_dir()
    assert d1.parent == tmp_path / "a" and d1.name.startswith(_cpp.EXT_NAME + "-")
    src = tmp_path / "csrc"
    shutil.copytree(CSRC, src)
    (src / "norm_cpu.cpp").write_text((src / "norm_cpu.cpp").read_text() + "\n// changed\n")
    monkeypatch.setattr(_cpp, "source_dir", lambda: src)
    monkeypatch.setattr(_cpp, "_STATE", _cpp._State())
    assert _cpp.build_dir() != d1  # a source change builds afresh
    monkeypatch.delenv(_cpp.ENV_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(_cpp, "_STATE", _cpp._State())
    assert _cpp.build_dir().parent == tmp_path / "xdg" / "lrp_kernels" / "ext"
    ok, why = _cpp.probe()  # cheap: reports, never builds
    assert ok and "first use" in why and not _cpp.build_dir().exists()


# ---- stale locks -------------------------------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(path: Path, pid: int, age: float = 0.0) -> None:
    import socket

    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "time": time.time() - age}))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))


def test_build_lock_recovers_stale_locks(tmp_path):
    torch_lock = tmp_path / "lock"
    # owner died: taken over at once, torch's leftover lock removed with it
    _write_lock(tmp_path / "build.lock", _dead_pid())
    torch_lock.write_text("")
    t0 = time.monotonic()
    with _cpp.BuildLock(tmp_path, timeout=30) as lock:
        assert json.loads((tmp_path / "build.lock").read_text())["pid"] == os.getpid()
        assert not torch_lock.exists()
        assert len(lock.removed) == 2
    assert time.monotonic() - t0 < 5 and not (tmp_path / "build.lock").exists()
    # owner alive but the lock is older than the limit: stale
    _write_lock(tmp_path / "build.lock", os.getpid(), age=2 * _cpp.STALE_LOCK_SECONDS)
    with _cpp.BuildLock(tmp_path, timeout=30):
        pass
    # a live, recent owner is waited for (here: until the timeout, with a clear error)
    _write_lock(tmp_path / "build.lock", os.getpid())
    with pytest.raises(_cpp.BuildError, match="another build"):
        with _cpp.BuildLock(tmp_path, timeout=1):
            pass
    assert (tmp_path / "build.lock").exists()  # not ours to remove


def test_interrupted_build_is_recovered(ext, tmp_path):
    """End to end in a fresh process: the cache dir holds torch's lock and our lock from a killed
    build and no ready marker; loading must rebuild (ninja finds the objects up to date) instead
    of waiting forever on torch's lock."""
    d = _cpp.build_dir()
    marker = d / _cpp._READY_MARKER
    backup = tmp_path / "marker"
    shutil.copy(marker, backup)
    try:
        marker.unlink()
        (d / "lock").write_text("")
        _write_lock(d / "build.lock", _dead_pid())
        code = ("import torch\nfrom lrp_kernels.backends import dispatch\ndispatch._ensure_loaded('cpp')\n"
                "from lrp_kernels.backends import cpp as _cpp\nm = _cpp.load_extension()\n"
                "x = torch.randn(3, 16)\nprint(float(m.rms_norm_forward(x, None, 1e-6)[1].sum()))\n")
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop(_cpp.ENV_DISABLE, None)
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert marker.exists() and not (d / "lock").exists() and not (d / "build.lock").exists()
    finally:
        if not marker.exists():
            shutil.copy(backup, marker)
        for leftover in (d / "lock", d / "build.lock"):
            if leftover.exists() and leftover.stat().st_mtime < time.time() - 1:
                leftover.unlink()


# ---- CUDA sources compile with nvcc (no CUDA torch needed) -------------------------------------------

_CUDA_SELFTEST = r"""
#include "norm_cuda_kernels.cuh"
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
namespace K = lrp::cuda_kernels;

// host reference in double (the SPEC formulas), compared norm-wise
static double relerr(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) { num += (a[i] - b[i]) * (a[i] - b[i]); den += b[i] * b[i]; }
  return std::sqrt(num / (den > 0 ? den : 1e-300));
}
static double stabd(double z, double e) { return z + (z >= 0 ? e : -e); }

template <typename T, typename ToF, typename FromF>
static int run(const char* name, double tol, ToF to_double, FromF from_double, int64_t rows, int64_t H) {
  using A = typename K::Acc<T>::type;
  const size_t n = rows * H;
  std::vector<T> x(n), gy(n);
  std::vector<A> w(H), b(H);
  srand(1234);
  auto rnd = [] { return (rand() / (double)RAND_MAX) * 4 - 2; };
  for (auto& v : x) v = from_double(rnd() + 0.3);
  for (auto& v : gy) v = from_double(rnd());
  for (auto& v : w) v = A(rnd() + 1);
  for (auto& v : b) v = A(rnd());
  T *dx, *dgy, *dy, *dout; A *dw, *db, *dmean, *drstd;
  cudaMalloc(&dx, n * sizeof(T)); cudaMalloc(&dgy, n * sizeof(T)); cudaMalloc(&dy, n * sizeof(T));
  cudaMalloc(&dout, n * sizeof(T)); cudaMalloc(&dw, H * sizeof(A)); cudaMalloc(&db, H * sizeof(A));
  cudaMalloc(&dmean, rows * sizeof(A)); cudaMalloc(&drstd, rows * sizeof(A));
  cudaMemcpy(dx, x.data(), n * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemcpy(dgy, gy.data(), n * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemcpy(dw, w.data(), H * sizeof(A), cudaMemcpyHostToDevice);
  cudaMemcpy(db, b.data(), H * sizeof(A), cudaMemcpyHostToDevice);
  std::vector<T> out(n);
  auto fetch = [&](T* d) { cudaMemcpy(out.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
                           std::vector<double> r(n); for (size_t i = 0; i < n; ++i) r[i] = to_double(out[i]); return r; };
  std::vector<double> xd(n), gd(n);
  for (size_t i = 0; i < n; ++i) { xd[i] = to_double(x[i]); gd[i] = to_double(gy[i]); }
  std::vector<double> rms_y(n), rms_g(n), ln_y(n), ln_g(n), ln_r(n);
  const double eps = 1e-5, epsilon = 1e-6;
  for (int64_t r = 0; r < rows; ++r) {
    const double* xr = &xd[r * H]; const double* gr = &gd[r * H];
    double ss = 0, s = 0; for (int64_t i = 0; i < H; ++i) { ss += xr[i] * xr[i]; s += xr[i]; }
    const double rs = 1 / std::sqrt(ss / H + eps), mu = s / H;
    double var = 0; for (int64_t i = 0; i < H; ++i) var += (xr[i] - mu) * (xr[i] - mu);
    const double lrs = 1 / std::sqrt(var / H + eps);
    double su = 0, sn = 0; std::vector<double> nn(H);
    for (int64_t i = 0; i < H; ++i) {
      rms_y[r * H + i] = xr[i] * rs * w[i]; rms_g[r * H + i] = gr[i] * rs * w[i];
      const double c = xr[i] - mu, yb = c * lrs * w[i];
      ln_y[r * H + i] = yb + b[i]; su += gr[i] * lrs * w[i];
      nn[i] = yb * gr[i] / stabd(yb + b[i], epsilon) / stabd(c, epsilon); sn += nn[i];
    }
    for (int64_t i = 0; i < H; ++i) {
      ln_g[r * H + i] = gr[i] * lrs * w[i] - su / H;
      ln_r[r * H + i] = xr[i] * (nn[i] - sn / H);
    }
  }
  int bad = 0;
  auto check = [&](const char* what, cudaError_t err, const std::vector<double>& want, double t) {
    cudaError_t sync = cudaDeviceSynchronize();
    double e = (err == cudaSuccess && sync == cudaSuccess) ? relerr(fetch(dout), want) : 1e9;
    printf("%s %s rows=%lld H=%lld relerr=%.3g %s\n", name, what, (long long)rows, (long long)H, e, e < t ? "ok" : "FAIL");
    bad += !(e < t);
  };
  check("rms_forward", K::rms_forward<T>(dx, dw, dout, drstd, rows, H, eps, 0), rms_y, tol);
  check("rms_backward", K::rms_backward<T>(dgy, dw, drstd, dout, rows, H, 0), rms_g, tol);
  check("ln_forward", K::ln_forward<T>(dx, dw, db, dout, dmean, drstd, rows, H, eps, 0), ln_y, tol);
  check("ln_backward_G", K::ln_backward<T>(dgy, dx, dw, db, dmean, drstd, dout, rows, H, epsilon, false, 0), ln_g, tol);
  check("ln_backward_R", K::ln_backward<T>(dgy, dx, dw, db, dmean, drstd, dout, rows, H, epsilon, true, 0), ln_r,
        tol == 1e-5 ? 1e-4 : tol);
  cudaFree(dx); cudaFree(dgy); cudaFree(dy); cudaFree(dout); cudaFree(dw); cudaFree(db); cudaFree(dmean); cudaFree(drstd);
  return bad;
}

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) { printf("no CUDA device\n"); return 77; }
  int bad = 0;
  const int64_t shapes[][2] = {{7, 37}, {33, 1031}, {5, 4096}, {3, 1}};
  for (auto& s : shapes) {
    bad += run<float>("fp32", 1e-5, [](float v) { return (double)v; }, [](double v) { return (float)v; }, s[0], s[1]);
    bad += run<double>("fp64", 1e-12, [](double v) { return v; }, [](double v) { return v; }, s[0], s[1]);
    bad += run<__nv_bfloat16>("bf16", 1e-2, [](__nv_bfloat16 v) { return (double)__bfloat162float(v); },
                              [](double v) { return __float2bfloat16((float)v); }, s[0], s[1]);
    bad += run<__half>("fp16", 1e-2, [](__half v) { return (double)__half2float(v); },
                       [](double v) { return __float2half((float)v); }, s[0], s[1]);
  }
  printf("%s\n", bad ? "FAILED" : "ALL OK");
  return bad ? 1 : 0;
}
"""


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return str(Path(cand) / "bin" / "nvcc")
    return None


@pytest.fixture(scope="module")
def cuda_selftest(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    d = tmp_path_factory.mktemp("cuda")
    (d / "selftest.cu").write_text(_CUDA_SELFTEST)
    exe = d / "selftest"
    proc = subprocess.run([nvcc, "-std=c++17", "-O2", "--fmad=false", "-arch=sm_80", f"-I{CSRC}",
                           "--extended-lambda", str(d / "selftest.cu"), "-o", str(exe)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def test_cuda_kernels_compile_with_nvcc(cuda_selftest):
    """The torch-free CUDA kernels (csrc/norm_cuda_kernels.cuh) build for every dtype."""
    assert cuda_selftest.exists()


@pytest.mark.gpu
def test_cuda_kernels_on_gpu(cuda_selftest):
    """Runs the CUDA kernels against a float64 host reference (skipped without a GPU)."""
    proc = subprocess.run([str(cuda_selftest)], capture_output=True, text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip("no CUDA device")
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
