"""Backend dispatch (lrp_kernels.backends.dispatch): choosing (per call, use_backend, env var, auto),
errors, registration.

Fake backends are registered into the real registry by the fixtures below and removed again
afterwards (the registry, probes and loaded set are restored exactly).
"""
from __future__ import annotations

import threading

import pytest
import torch

import lrp_kernels
import lrp_kernels.functional as F
from lrp_kernels.backends import dispatch
from lrp_kernels.backends.dispatch import BackendUnavailableError

FAKE_OPS = ("identity_backward", "linear_epsilon_backward")


@pytest.fixture
def registry_restored():
    """Snapshot of the registry state; restored after the test whatever it registered."""
    for b in dispatch.BACKENDS:  # real backends register first, so the snapshot includes them
        dispatch._ensure_loaded(b)
    regs = {op: dict(impls) for op, impls in dispatch._REGISTRY.items()}
    probes, loaded = dict(dispatch._PROBES), set(dispatch._loaded)
    yield
    dispatch._REGISTRY.clear()
    dispatch._REGISTRY.update(regs)
    dispatch._PROBES.clear()
    dispatch._PROBES.update(probes)
    dispatch._loaded.clear()
    dispatch._loaded.update(loaded)


def _fake_backend(backend, available=True, reason="fake backend for tests", supports=None):
    """Register ``backend`` as a fake: kernels delegate to torch and log their calls."""
    calls = []
    dispatch.register_probe(backend, lambda: (available, reason))
    for op in FAKE_OPS:
        torch_fn = dispatch._REGISTRY[op]["torch"].fn

        def fake(*args, _op=op, _fn=torch_fn, **kwargs):
            calls.append(_op)
            return _fn(*args, **kwargs)
        dispatch.register(op, backend, fake, supports=supports)
    return calls


def _identity_backward_pass(**kw):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(7), requires_grad=True)
    y = F.identity(torch.tanh, x, **kw)
    y.backward(torch.ones_like(y))
    return x.grad


# ---- choosing a backend ------------------------------------------------------------------------

def test_available_backends_structure():
    info = lrp_kernels.available_backends()
    assert set(info) == set(dispatch.BACKENDS)
    for name, entry in info.items():
        assert set(entry) == {"available", "reason"}
        assert isinstance(entry["available"], bool)
        assert isinstance(entry["reason"], str) and entry["reason"], f"{name}: empty reason"
    assert info["torch"]["available"] is True


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("LRP_KERNELS_BACKEND", raising=False)
    assert lrp_kernels.current_backend() == "auto"


def test_use_backend_nesting_and_restore(monkeypatch):
    monkeypatch.delenv("LRP_KERNELS_BACKEND", raising=False)
    with lrp_kernels.use_backend("torch"):
        assert lrp_kernels.current_backend() == "torch"
        with lrp_kernels.use_backend("auto"):
            assert lrp_kernels.current_backend() == "auto"
            with lrp_kernels.use_backend("torch"):
                assert lrp_kernels.current_backend() == "torch"
            assert lrp_kernels.current_backend() == "auto"
        assert lrp_kernels.current_backend() == "torch"
    assert lrp_kernels.current_backend() == "auto"
    with pytest.raises(RuntimeError, match="boom"):
        with lrp_kernels.use_backend("torch"):
            raise RuntimeError("boom")
    assert lrp_kernels.current_backend() == "auto"


def test_use_backend_is_thread_local(monkeypatch):
    monkeypatch.delenv("LRP_KERNELS_BACKEND", raising=False)
    seen = []
    with lrp_kernels.use_backend("torch"):
        t = threading.Thread(target=lambda: seen.append(lrp_kernels.current_backend()))
        t.start()
        t.join()
    assert seen == ["auto"]


def test_env_var(monkeypatch):
    monkeypatch.setenv("LRP_KERNELS_BACKEND", "torch")
    assert lrp_kernels.current_backend() == "torch"
    monkeypatch.setenv("LRP_KERNELS_BACKEND", " Torch ")
    assert lrp_kernels.current_backend() == "torch"
    with lrp_kernels.use_backend("auto"):  # a block overrides the environment
        assert lrp_kernels.current_backend() == "auto"
    monkeypatch.setenv("LRP_KERNELS_BACKEND", "")
    assert lrp_kernels.current_backend() == "auto"
    monkeypatch.setenv("LRP_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LRP_KERNELS_BACKEND"):
        lrp_kernels.current_backend()


@pytest.mark.usefixtures("registry_restored")
def test_env_var_selects_registered_backend(monkeypatch):
    calls = _fake_backend("cpp")
    monkeypatch.setenv("LRP_KERNELS_BACKEND", "cpp")
    _identity_backward_pass()
    assert calls == ["identity_backward"]
    monkeypatch.setenv("LRP_KERNELS_BACKEND", "torch")
    _identity_backward_pass()
    assert calls == ["identity_backward"]


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        with lrp_kernels.use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="backend"):
        F.identity(torch.tanh, torch.randn(3, requires_grad=True), backend="gpu")
    with pytest.raises(ValueError, match="backend"):
        dispatch.call("identity_backward", torch.ones(2), torch.ones(2), torch.ones(2), 1e-6, True,
                      backend="fast")
    with pytest.raises(ValueError, match="backend"):
        dispatch.register("identity_backward", "cuda", lambda *a: None)
    with pytest.raises(KeyError, match="unknown kernel op"):
        dispatch.call("no_such_op", torch.ones(2))


# ---- unavailable and fake backends ---------------------------------------------------------------

@pytest.mark.usefixtures("registry_restored")
def test_forcing_unavailable_backend_raises_with_reason():
    _fake_backend("cpp", available=False, reason="no C++ compiler found (test)")
    with pytest.raises(BackendUnavailableError, match="no C\\+\\+ compiler found"):
        with lrp_kernels.use_backend("cpp"):
            pass
    # per call: raised at the call, not later in backward
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(BackendUnavailableError, match="no C\\+\\+ compiler found"):
        F.identity(torch.tanh, x, backend="cpp")
    with pytest.raises(BackendUnavailableError, match="'cpp'"):
        dispatch.call("identity_backward", x, x, x, 1e-6, True, backend="cpp")
    info = lrp_kernels.available_backends()["cpp"]
    assert info == {"available": False, "reason": "no C++ compiler found (test)"}
    # auto skips it silently
    assert dispatch.resolve("identity_backward", x, x, x, 1e-6, True)[0] == "torch"


@pytest.mark.usefixtures("registry_restored")
def test_crashing_probe_reports_unavailable():
    def probe():
        raise OSError("driver exploded")
    dispatch.register_probe("cpp", probe)
    ok, why = dispatch.backend_status("cpp")
    assert not ok and "driver exploded" in why


@pytest.mark.usefixtures("registry_restored")
def test_registered_backend_is_called_when_forced():
    calls = _fake_backend("cpp")
    _identity_backward_pass(backend="torch")
    assert calls == []
    with lrp_kernels.use_backend("cpp"):
        got = _identity_backward_pass()
    assert calls == ["identity_backward"]
    # the fake delegates to the torch kernel: what comes back is the identity rule's R_x = R_y
    # (the backward starts from ones), not just "the same as torch"
    torch.testing.assert_close(got, torch.ones(3, 4), rtol=0, atol=0)
    _identity_backward_pass(backend="cpp")
    assert calls == ["identity_backward"] * 2
    assert "cpp" in dispatch.implementations("identity_backward")


@pytest.mark.usefixtures("registry_restored")
def test_auto_prefers_registered_backend_and_falls_back():
    calls = _fake_backend("cpp")
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(3, 6)
    F.linear_epsilon(x, w).backward(torch.ones(4, 3))
    assert calls == ["linear_epsilon_backward"]       # auto picked the available cpp kernel
    F.mul2(x, x.detach()).backward(torch.ones(4, 6))   # no cpp kernel for mul: torch, no error
    with lrp_kernels.use_backend("cpp"):               # forced, op not implemented: torch
        F.mean(x, -1).backward(torch.ones(4))
    assert calls == ["linear_epsilon_backward"]


@pytest.mark.usefixtures("registry_restored")
def test_supports_reason_is_reported_when_forced_and_skipped_by_auto():
    calls = _fake_backend("cpp", supports=lambda *a, **k: "only float16 (test)")
    x = torch.randn(3, 4)
    args = (x, x, x, 1e-6, True)
    assert dispatch.resolve("identity_backward", *args)[0] == "torch"
    with pytest.raises(BackendUnavailableError, match="only float16"):
        dispatch.call("identity_backward", *args, backend="cpp")
    assert calls == []


def test_auto_never_picks_interpreter():
    """The real triton backend (registered, available through the interpreter on CPU) is never
    auto's choice for CPU tensors."""
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    z = x @ w.t()
    assert dispatch.resolve("linear_epsilon_backward", torch.randn(3, 5), x, w, None, z, 1e-6,
                            True, backend="auto")[0] != "triton"


@pytest.mark.usefixtures("registry_restored")
def test_auto_never_uses_the_triton_interpreter():
    calls = _fake_backend("triton")
    x = torch.randn(3, 4)  # CPU tensors: triton would run interpreted
    assert dispatch.resolve("identity_backward", x, x, x, 1e-6, True)[0] != "triton"
    assert dispatch.resolve("identity_backward", x, x, x, 1e-6, True, backend="triton")[0] == "triton"
    _identity_backward_pass(backend="triton")
    assert calls == ["identity_backward"]


@pytest.mark.usefixtures("registry_restored")
def test_backend_chosen_at_forward_reaches_backward_on_another_thread():
    """use_backend is thread-local and CUDA backward runs on autograd worker threads: the
    Functions pin the forward-time choice."""
    calls = _fake_backend("cpp")
    x = torch.randn(3, 4, requires_grad=True)
    with lrp_kernels.use_backend("cpp"):
        y = F.identity(torch.tanh, x)
    y.backward(torch.ones_like(y))  # outside the block
    assert calls == ["identity_backward"]
    with lrp_kernels.use_backend("cpp"):
        y = F.identity(torch.tanh, x)
    t = threading.Thread(target=lambda: y.backward(torch.ones_like(y)))
    t.start()
    t.join()
    assert calls == ["identity_backward"] * 2
    with lrp_kernels.use_backend("torch"):  # a per-call backend beats the block
        y = F.identity(torch.tanh, x, backend="cpp")
    y.backward(torch.ones_like(y))
    assert calls == ["identity_backward"] * 3


@pytest.mark.usefixtures("registry_restored")
def test_fixture_restores_registry():
    _fake_backend("cpp")
    assert "cpp" in dispatch._REGISTRY["identity_backward"]


def test_registry_clean_after_fake_backends():
    real = dispatch._REGISTRY["identity_backward"].get("cpp")
    assert real is None or "fake" not in getattr(real.fn, "__name__", "")
    ok, why = dispatch.backend_status("cpp")
    assert "fake backend for tests" not in why


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_use_backend_reaches_cuda_backward_worker_threads(monkeypatch):
    """On CUDA, autograd runs backward on its own threads, which do not see the thread-local
    use_backend stack; the forward-time pin must carry the choice there."""
    calls = []
    op = "linear_epsilon_backward_factored"  # the torch path of the rule (rescale + GEMM)
    impl = dispatch._REGISTRY[op]["torch"]
    spy = dispatch._Impl(lambda *a, **k: calls.append(1) or impl.fn(*a, **k), None)
    monkeypatch.setitem(dispatch._REGISTRY[op], "torch", spy)
    x = torch.randn(4, 8, device="cuda", requires_grad=True)
    w = torch.randn(3, 8, device="cuda")
    with lrp_kernels.use_backend("torch"):
        y = F.linear_epsilon(x, w)
        y.backward(torch.ones_like(y))
    assert calls == [1]


# ---- measured choice (auto="measured") --------------------------------------------------------------

@pytest.fixture
def timings(monkeypatch):
    """An injected timer: ``timings[backend] = seconds``; records every timed call. The Triton
    interpreter is made eligible for auto so the real kernels can stand in for a GPU's."""
    table = {"torch": 1.0, "triton": 1.0}
    timed = []

    def timer(fn, args, kwargs):
        backend = "torch" if fn is dispatch._REGISTRY[table["op"]]["torch"].fn else "triton"
        timed.append((backend, args[0].shape))
        table.setdefault("strides", []).append([a.stride() for a in args if isinstance(a, torch.Tensor)])
        return table[backend]
    monkeypatch.setattr(dispatch, "_interpreted", lambda backend, args: False)
    dispatch.set_timer(timer)
    table["timed"] = timed
    yield table
    dispatch.set_timer(None)


@pytest.mark.usefixtures("registry_restored")
def test_measured_backend_is_chosen_by_injected_timings_and_cached(timings):
    calls = []
    torch_fn = dispatch._REGISTRY["identity_backward"]["torch"].fn
    dispatch.register_probe("triton", lambda: (True, "fake"))
    dispatch.register("identity_backward", "triton", lambda *a, **k: calls.append(1) or torch_fn(*a, **k),
                      auto="measured")
    timings["op"] = "identity_backward"
    small, large = torch.randn(3, 4), torch.randn(300, 4)
    timings.update(torch=2.0, triton=1.0)
    assert dispatch.chosen_backend("identity_backward", small, small, small, 1e-6, True) == "triton"
    assert [b for b, _ in timings["timed"]] == ["triton", "torch"]  # measured once ...
    assert dispatch.chosen_backend("identity_backward", small, small, small, 1e-6, True) == "triton"
    assert len(timings["timed"]) == 2  # ... and cached for the shape class
    timings.update(torch=1.0, triton=2.0)  # another shape class: measured anew, torch wins
    assert dispatch.chosen_backend("identity_backward", large, large, large, 1e-6, True) == "torch"
    assert len(timings["timed"]) == 4
    assert sorted(dispatch.measured_choices().values()) == ["torch", "triton"]
    # forcing still forces, whatever was measured
    assert dispatch.chosen_backend("identity_backward", large, large, large, 1e-6, True, backend="triton") == "triton"
    with pytest.raises(ValueError, match="auto must be"):
        dispatch.register("identity_backward", "triton", torch_fn, auto="sometimes")


@pytest.mark.parametrize("faster", ["triton", "torch"])
def test_measured_epsilon_linear_choice_never_changes_the_result(timings, faster):
    """The real fused kernel (interpreted here) and the rescale + GEMM path are one rule: which
    one the timings pick, the result agrees with the other within the float32 tolerance (1e-5
    relative), and with the float64 evaluation of the rule."""
    timings["op"] = "linear_epsilon_backward"
    timings.update(torch=1.0 if faster == "torch" else 2.0, triton=1.0 if faster == "triton" else 2.0)
    g = torch.Generator().manual_seed(11)
    x, w, b = torch.randn(37, 29, generator=g), torch.randn(19, 29, generator=g), torch.randn(19, generator=g)
    gz = torch.randn(37, 19, generator=g)
    z = torch.nn.functional.linear(x, w, b)
    args = (gz, x, w, b, z, 1e-6, True)
    assert dispatch.chosen_backend("linear_epsilon_backward", *args) == faster
    auto = dispatch.call("linear_epsilon_backward", *args)
    other = dispatch.call("linear_epsilon_backward", *args, backend="torch" if faster == "triton" else "triton")
    ref = dispatch.call("linear_epsilon_backward", *(a.double() if isinstance(a, torch.Tensor) else a for a in args),
                        backend="torch")
    assert ((auto - other).norm() / other.norm()).item() < 1e-5
    assert ((auto.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_measuring_from_a_forward_times_real_tensors_not_stand_ins(timings):
    """A forward pass asks which backend its backward will use with stand-ins (one element
    expanded); the measurement then runs on random tensors of those shapes, never on zero-stride
    views, and serves the real call of the same shape class afterwards."""
    from lrp_kernels.ops._common import stand_in
    timings["op"] = "linear_epsilon_backward"
    timings.update(torch=2.0, triton=1.0)
    x, w = torch.randn(33, 20), torch.randn(12, 20)
    z_like = stand_in(x, (33, 12))
    assert dispatch.chosen_backend("linear_epsilon_backward", z_like, x, w, None, z_like, 1e-6, False) == "triton"
    assert timings["strides"] and all(0 not in st for strides in timings["strides"] for st in strides)
    n = len(timings["timed"])
    gz = torch.randn(33, 12)
    assert dispatch.chosen_backend("linear_epsilon_backward", gz, x, w, None, x @ w.T, 1e-6, False) == "triton"
    assert len(timings["timed"]) == n  # same shape class: no second measurement
