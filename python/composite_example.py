"""On-the-fly LRP with the Composite: the module path and the torch.fx path.

Run:  python python/composite_example.py
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

import lrp_kernels.functional as lf
from lrp_kernels import check, modules, rules
from lrp_kernels.explicit.composite import Composite


class RootMeanSquareNorm(nn.Module):
    def __init__(self, n: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class SimpleModel(nn.Module):
    """Two linear layers, a softmax and a residual-style sum written as plain operators."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(10, 20)
        self.layer2 = nn.Linear(10, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = F.softmax(self.layer1(x), -1)
        y2 = self.layer2(x)
        return y1 + y2


def module_path() -> torch.Tensor:
    """Rules wrap modules in place; remove() gives the original objects back."""
    print("== module path: Sequential(Linear, RMSNorm) ==")
    model = nn.Sequential(nn.Linear(10, 10), RootMeanSquareNorm(10))
    lrp = Composite({nn.Linear: rules.EpsilonRule, RootMeanSquareNorm: rules.IdentityRule})
    original = list(model)
    lrp.register(model, verbose=True)
    print(model)
    x = torch.randn(1, 10, requires_grad=True)
    with check.conservation(rtol=1e-3) as report:  # per-rule relevance sums
        y = model(x)
        y.max().backward()
    print(report.table())
    lrp.remove()
    assert list(model) == original
    print("relevance:", x.grad)

    # the same with drop-in modules instead of rules (weights shared, forward unchanged)
    with Composite({nn.Linear: modules.LinearEpsilon, RootMeanSquareNorm: modules.RMSNormIdentity}) as lrp2:
        lrp2.register(model)
        x2 = x.detach().clone().requires_grad_()
        model(x2).max().backward()
    print("drop-ins give the same relevance:", torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-7))
    return x.grad


def fx_path() -> torch.Tensor:
    """Operators and functions in forward() are rewritten by tracing with a dummy input."""
    print("\n== torch.fx path: SimpleModel ==")
    torch.manual_seed(0)
    model = SimpleModel()
    lrp = Composite({
        nn.Linear: rules.EpsilonRule,
        operator.add: lf.add2,
        F.softmax: lf.softmax,
    })
    x = torch.randn(1, 32, 10, requires_grad=True)
    traced = lrp.register(model, dummy_inputs={"x": x}, verbose=True)
    print(traced.code)
    y = traced(x)
    y.backward(y)
    assert lrp.remove() is model  # the original was never modified
    print("relevance sum:", float(x.grad.sum()), "output sum:", float(y.detach().sum()))
    return x.grad


def main() -> int:
    r1 = module_path()
    r2 = fx_path()
    ok = bool(torch.isfinite(r1).all() and torch.isfinite(r2).all())
    print("\nok" if ok else "\nNaN in relevance")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
