"""compat.zennit's Epsilon / Gamma on a plain nn.Linear run our fused kernel ops; they must give
what Zennit's generic rule (the copies of BasicHook) gives, also where the rule zeroes a bias
large enough to flip output signs (the case follows the layer's output, bias included)."""
import pytest
import torch
from torch import nn

from lrp_kernels.compat.zennit import rules as zr
from lrp_kernels.ops import linear_gamma


def _relevance(rule, layer, x):
    handles = rule.register(layer)
    try:
        x = x.clone().requires_grad_()
        y = layer(x)
        y.backward(y.detach())  # Zennit's usual seed: the output as relevance
    finally:
        handles.remove()
    return x.grad


@pytest.mark.parametrize("zero_params", [None, "bias"])
def test_fused_gamma_equals_the_generic_rule(monkeypatch, zero_params):
    torch.manual_seed(0)
    layer = nn.Linear(9, 7).double()
    with torch.no_grad():
        layer.bias.mul_(8.0)  # flips the sign of outputs once the bias is zeroed
    x = torch.randn(5, 9, dtype=torch.float64)
    calls = []
    real = linear_gamma.linear_gamma_backward
    monkeypatch.setattr(zr, "linear_gamma_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = _relevance(zr.Gamma(gamma=0.5, zero_params=zero_params), layer, x)
    assert calls, "the fused op was not used"
    rule = zr.Gamma(gamma=0.5, zero_params=zero_params)
    rule.fused = None  # Zennit's generic path: the five copies
    generic = _relevance(rule, layer, x)
    assert torch.allclose(fused, generic, rtol=1e-10, atol=1e-12)
