"""Conservation check mode (lrp_kernels.check): per-rule relevance sums in both views, the
first violation in backward order, SPEC's expectations (softmax and biases are not
conservative), the public ``record`` for rules written elsewhere, and no effect on relevance."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as tF
from torch import nn

import lrp_kernels.functional as F
import lrp_kernels.grad as G
from lrp_kernels import check
from lrp_kernels import modules as M
from lrp_kernels.ops import _common
from helpers.cases import gen_for, rand

EPS0 = 1e-12  # "eps -> 0"


def _weights(gen, d=8, hidden=12):
    return {"w1": torch.randn(d, d, generator=gen, dtype=torch.float64) / d ** 0.5,
            "norm": torch.rand(d, generator=gen, dtype=torch.float64) + 0.5,
            "wg": torch.randn(hidden, d, generator=gen, dtype=torch.float64) / d ** 0.5,
            "wu": torch.randn(hidden, d, generator=gen, dtype=torch.float64) / d ** 0.5,
            "w2": torch.randn(d, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5}


def conservative_net(V, x, p, eps=EPS0, bias=None, eps_down=None):
    """linear -> rmsnorm -> silu-gate (identity, mul2) -> linear -> residual add -> mean."""
    h = V.linear_epsilon(x, p["w1"], None, eps)
    n = V.rms_norm_identity(h, p["norm"])
    g = V.identity(tF.silu, V.linear_epsilon(n, p["wg"], None, eps), epsilon=eps)
    y = V.linear_epsilon(V.mul2(g, V.linear_epsilon(n, p["wu"], None, eps)), p["w2"], bias,
                         eps if eps_down is None else eps_down)
    return V.mean(V.add2(h, y, epsilon=eps), -1, False, epsilon=eps)


OPS_BACKWARD_ORDER = ["mean", "add", "linear_epsilon", "mul", "linear_epsilon", "identity",
                      "linear_epsilon", "rms_norm_identity", "linear_epsilon"]


def _run(view, net=conservative_net, seed="", **kw):
    gen = gen_for("check", seed)
    p = _weights(gen)
    x = torch.randn(3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    V = F if view == "R" else G
    out = net(V, x, p, **kw)
    out.backward(out.detach() if view == "R" else torch.ones_like(out))
    return x.grad


@pytest.mark.parametrize("view", ["R", "G"])
def test_conservative_network_has_no_violation(view):
    with check.conservation(rtol=1e-6) as report:
        _run(view)
    assert [r.op for r in report.records] == OPS_BACKWARD_ORDER
    assert all(r.expected and r.conserved for r in report.records)
    assert report.first_violation() is None and report.violations() == []
    assert all(r.view == ("relevance" if view == "R" else "gradient") for r in report.records)
    # relevance flows: each record's input sum is the next one's output sum along the chain
    assert report.records[0].r_out == pytest.approx(report.records[-1].r_in, rel=1e-6)
    table = report.table()
    assert "no violation" in table and "rms_norm_identity" in table
    assert len(table.splitlines()) == len(report.records) + 3


@pytest.mark.parametrize("view", ["R", "G"])
def test_check_mode_does_not_change_relevance(view):
    plain = _run(view, eps=1e-6)
    with check.conservation() as report:
        checked = _run(view, eps=1e-6)
    assert len(report.records) == len(OPS_BACKWARD_ORDER)
    assert torch.equal(plain, checked)


@pytest.mark.parametrize("view", ["R", "G"])
def test_large_epsilon_is_flagged_and_named(view):
    """A zero-bias epsilon layer with a huge epsilon absorbs relevance where SPEC expects none."""
    with check.conservation(rtol=1e-3) as report:
        _run(view, eps_down=10.0)
    bad = report.first_violation()
    assert bad is not None and bad.op == "linear_epsilon"
    assert bad.index == 2 and bad.forward_index == 6  # the down projection, 7th rule in forward order
    assert abs(bad.r_in) < abs(bad.r_out)
    assert "VIOLATION" in report.table() and "first violation: linear_epsilon" in report.table()


@pytest.mark.parametrize("view", ["R", "G"])
def test_biased_linear_is_not_flagged(view):
    """SPEC: the epsilon rule with a bias is not expected to conserve (the bias absorbs)."""
    big_bias = torch.full((8,), 5.0, dtype=torch.float64)
    with check.conservation(rtol=1e-3) as report:
        _run(view, bias=big_bias)
    rec = report.records[2]
    assert rec.op == "linear_epsilon" and not rec.expected and not rec.conserved
    assert report.first_violation() is None
    assert "not conserved (not expected)" in report.table()
    zero_bias = torch.zeros(8, dtype=torch.float64)
    with check.conservation(rtol=1e-6) as report:
        _run(view, bias=zero_bias)
    assert report.records[2].expected and report.records[2].conserved


def _attention(V, x, p, eps=EPS0):
    q, k, v = x @ p["w1"], x, x  # constant-coefficient ops need no rule
    s = V.softmax(V.matmul(q, k.transpose(-1, -2), epsilon=eps), -1, temperature=8 ** 0.5)
    return V.matmul(s, v, epsilon=eps)


@pytest.mark.parametrize("view", ["R", "G"])
def test_softmax_is_not_expected_to_conserve(view):
    with check.conservation(rtol=1e-6) as report:
        _run(view, net=_attention)
    ops = [r.op for r in report.records]
    assert ops == ["matmul", "softmax", "matmul"]
    sm = report.records[1]
    assert not sm.expected and not sm.conserved   # Deep Taylor with bias absorbs relevance
    assert all(r.conserved for r in report.records if r.op == "matmul")
    assert report.first_violation() is None


def test_module_labels_and_hooks_removed():
    torch.manual_seed(0)
    net = nn.Sequential(M.LinearEpsilon(6, 6, bias=False, dtype=torch.float64),
                        M.IdentityRuleActivation(torch.tanh),
                        M.LinearEpsilon(6, 4, bias=False, dtype=torch.float64, epsilon=50.0))
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    with check.conservation(module=net) as report:
        y = net(x)
        y.backward(y.detach())
    assert [r.label for r in report.records] == ["2", "1", "0"]
    bad = report.first_violation()
    assert bad.label == "2" and "in 2" in bad.name
    for sub in net.modules():
        assert not sub._forward_hooks and not sub._forward_pre_hooks


class _HalfLoss(torch.autograd.Function):
    """A rule written outside lrp_kernels.ops (like a Composite's), that loses half its relevance."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gx = grad * 0.5
        check.record("half_loss", x, gx, None, grad, relevance_view=True, expected=True)
        return gx


def test_public_record_for_external_rules():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert check.record("half_loss", x, x, x, x, True, True) is None  # inactive: no-op
    assert not check.active()
    with check.conservation() as report:
        assert check.active()
        y = F.identity(torch.tanh, _HalfLoss.apply(x))
        y.backward(y.detach())
    assert [r.op for r in report.records] == ["identity", "half_loss"]
    bad = report.first_violation()
    assert bad.op == "half_loss" and bad.forward_index == -1
    assert bad.r_in == pytest.approx(0.5 * bad.r_out)


def test_record_gradient_view_sums_and_lazy_expectation():
    x = torch.randn(3, 4, dtype=torch.float64)
    gx = torch.randn(3, 4, dtype=torch.float64)
    z, gz = torch.randn(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    asked = []
    with check.conservation(rtol=0.1) as report:
        rec = check.record("custom", [x, None], [gx, None], z, gz, relevance_view=False,
                           expected=lambda: asked.append(1) or False)
    assert asked == [1]
    assert rec.r_in == pytest.approx((x * gx).sum().item())
    assert rec.r_out == pytest.approx((z * gz).sum().item())
    assert rec.mass == pytest.approx((z * gz).abs().sum().item())
    assert not rec.expected and report.records == [rec]
    with pytest.raises(ValueError, match="pair up"):
        with check.conservation():
            check.record("bad", [x, x], [gx], z, gz, True, True)


def test_no_nesting_and_state_reset_after_errors():
    with pytest.raises(RuntimeError, match="already active"):
        with check.conservation():
            with check.conservation():
                pass
    assert _common._RECORDER is None
    with pytest.raises(KeyError):
        with check.conservation():
            raise KeyError("user error")
    assert _common._RECORDER is None
    with pytest.raises(ValueError, match="rtol"):
        with check.conservation(rtol=-1):
            pass


def test_inactive_check_records_nothing():
    x = rand(gen_for("inactive"), (3, 4), torch.float64)
    y = F.linear_epsilon(x, torch.randn(2, 4, dtype=torch.float64))
    assert y.grad_fn.lrp_check is None  # nothing stashed when no check runs
    with check.conservation() as report:
        y.backward(y.detach())  # forward ran outside: not recorded
    assert report.records == []


def test_realistic_epsilon_passes_with_default_tolerance():
    with check.conservation() as report:
        _run("R", eps=1e-6)
        _run("G", eps=1e-6)
    assert len(report.records) == 2 * len(OPS_BACKWARD_ORDER)
    assert report.first_violation() is None, report.table()
    assert "records" in repr(report) or "ConservationReport" in repr(report)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_check_mode_under_gradient_checkpointing(use_reentrant):
    """Recomputed forwards must not add records, and relevance stays the same."""
    from torch.utils.checkpoint import checkpoint
    gen = gen_for("ckpt")
    p = _weights(gen)
    x0 = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    results = []
    for ckpt in (False, True):
        x = x0.clone().requires_grad_()
        with check.conservation(rtol=1e-6) as report:
            if ckpt:
                out = checkpoint(conservative_net, F, x, p, use_reentrant=use_reentrant)
            else:
                out = conservative_net(F, x, p)
            out.backward(out.detach())
        results.append((x.grad, [(r.op, round(r.r_out, 9), round(r.r_in, 9)) for r in report.records]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    assert results[0][1] == results[1][1]
