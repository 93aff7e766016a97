"""Composite, traced path (torch.fx): operators and functions rewritten to the drop-ins give the
relevance of the hand-written model; unhandled ops are refused; remove() returns the original."""
import math
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrp_kernels.functional as lf
from lrp_kernels import rules
from lrp_kernels.explicit.composite import Composite
from lrp_kernels.explicit.fx import TraceFailure

MAP = {
    nn.Linear: rules.EpsilonRule,
    operator.add: lf.add2,
    operator.mul: lf.mul2,
    torch.matmul: lf.matmul,
    F.softmax: lf.softmax,
}


class Attention(nn.Module):
    """Uses +, *, @, torch.matmul, torch.add, Tensor.add, F.softmax, Tensor.softmax, a constant
    scaling, a mask built from sizes, and structural ops (view, transpose, getitem, cat...)."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.up, self.gate = nn.Linear(d, 12), nn.Linear(d, 12)
        self.down = nn.Linear(12, d)

    def forward(self, x, explicit: bool = False):
        B, T, D = x.shape
        H = self.heads
        dh = D // H
        lin = (lambda m, t: lf.linear_epsilon(t, m.weight, m.bias)) if explicit else (lambda m, t: m(t))
        q, k, v = lin(self.qkv, x).split(D, dim=-1)
        q, k, v = (t.view(B, T, H, dh).transpose(1, 2) for t in (q, k, v))
        mask = torch.full((T, T), float("-inf")).triu(1)
        if explicit:
            s = lf.identity(lambda t: t / math.sqrt(dh), lf.matmul(q, k.transpose(-1, -2)))
            p = lf.softmax(lf.add2(s, mask), -1)
            a = lf.matmul(p, v)
        else:
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dh)
            p = F.softmax(torch.add(s, mask), dim=-1)
            a = p @ v
        a = a.transpose(1, 2).contiguous().reshape(B, T, D)
        h = lf.add2(x, lin(self.o, a)) if explicit else x.add(lin(self.o, a))
        g = lin(self.gate, h)
        u = lin(self.up, h)
        gs = lf.softmax(g, -1) if explicit else g.softmax(-1)
        m = lf.mul2(gs, u) if explicit else gs * u
        out = lin(self.down, m)
        first = out[:, :1] * 2.0 if explicit is False else lf.identity(lambda t: t * 2.0, out[:, :1])
        res = lf.add2(h, torch.cat([first, out[:, 1:]], dim=1)) if explicit else \
            h + torch.cat([first, out[:, 1:]], dim=1)
        return res


def relevance(model, x, **kw):
    x = x.clone().requires_grad_()
    y = model(x, **kw)
    y.backward(y)
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_traced_model_equals_the_hand_written_one(dtype):
    torch.manual_seed(0)
    model = Attention().to(dtype).eval()
    x = torch.randn(2, 5, 8, dtype=dtype)
    y_ref, r_ref = relevance(model, x, explicit=True)
    lrp = Composite(MAP)
    traced = lrp.register(model, dummy_inputs={"x": x})
    assert isinstance(traced, torch.fx.GraphModule) and traced is not model
    y, r = relevance(traced, x)
    assert torch.equal(y, y_ref) or torch.allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(r).all()
    err = (r - r_ref).norm() / r_ref.norm()
    assert err < (1e-5 if dtype == torch.float32 else 1e-10), f"relative error {err:.3g}"
    # every spelling was rewritten, nothing left unhandled
    statuses = {(row.label, row.status) for row in lrp.operations}
    for label in ("operator.add", "torch.matmul", "F.softmax", "Tensor.softmax", "Tensor.add", "torch.add",
                  "operator.matmul", "operator.mul", "operator.truediv"):
        assert (label, "handled") in statuses, (label, sorted(statuses))
    assert not [row for row in lrp.operations if row.status == "UNHANDLED"]
    assert lrp.remove() is model


def test_seed_two_layer_example():
    class SimpleModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer1 = nn.Linear(10, 20)
            self.layer2 = nn.Linear(10, 20)

        def forward(self, x):
            y1 = F.softmax(self.layer1(x), -1)
            return y1 + self.layer2(x)

    torch.manual_seed(1)
    model = SimpleModel()
    x = torch.randn(1, 6, 10)
    lrp = Composite({nn.Linear: rules.EpsilonRule, operator.add: lf.add2, F.softmax: lf.softmax})
    traced = lrp.register(model, dummy_inputs={"x": x})
    _, r = relevance(traced, x)
    xe = x.clone().requires_grad_()
    l1, l2 = model.layer1, model.layer2
    ye = lf.add2(lf.softmax(lf.linear_epsilon(xe, l1.weight, l1.bias), -1), lf.linear_epsilon(xe, l2.weight, l2.bias))
    ye.backward(ye)
    torch.testing.assert_close(r, xe.grad, rtol=1e-5, atol=1e-7)
    lrp.remove()


class WithTanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.Tanh()

    def forward(self, x):
        return torch.exp(self.act(self.lin(x))) + x.size(-1)


def test_unhandled_operations_are_an_error_or_a_warning():
    model = WithTanh()
    x = torch.randn(2, 4)
    lrp = Composite({nn.Linear: rules.EpsilonRule, operator.add: lf.add2})
    with pytest.raises(ValueError, match=r"act \(module Tanh.*exp \(torch.exp"):
        lrp.register(model, dummy_inputs={"x": x})
    assert not lrp.registered and all(p.requires_grad for p in model.parameters())
    with pytest.warns(UserWarning, match="no LRP rule"):
        traced = lrp.register(model, dummy_inputs={"x": x}, strict=False)
    # `+ x.size(-1)` is an add with a constant (a bias): handled by add2
    assert ("operator.add", "handled") in {(r.label, r.status) for r in lrp.operations}
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    lrp.remove()
    # with a rule for each, it registers cleanly
    lrp = Composite({nn.Linear: rules.EpsilonRule, nn.Tanh: rules.IdentityRule, operator.add: lf.add2,
                     torch.exp: lambda t: lf.identity(torch.exp, t)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        traced = lrp.register(model, dummy_inputs={"x": x})
    _, r = relevance(traced, x)
    assert torch.isfinite(r).all()
    lrp.remove()


def test_operations_table_lists_handled_passed_and_constant(capsys):
    torch.manual_seed(2)
    model = Attention()
    x = torch.randn(1, 4, 8)
    lrp = Composite(MAP)
    lrp.register(model, dummy_inputs={"x": x}, verbose=True)
    out = capsys.readouterr().out
    lrp.remove()
    for word in ("handled", "passed through", "no relevance", "module rule", "Tensor.transpose",
                 "Tensor.view", "_operator.getitem" if "_operator.getitem" in out else "operator.getitem",
                 "torch.cat", "Tensor.split", "torch.full"):
        assert word in out, (word, out)


def test_remove_on_a_traced_model_returns_the_untouched_original():
    torch.manual_seed(3)
    model = Attention()
    model.o.weight.requires_grad_(False)
    children = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        y0 = model(x)
    lrp = Composite(MAP)
    traced = lrp.register(model, dummy_inputs={"x": x})
    assert dict(model.named_modules()) == children  # the model itself is not modified
    assert isinstance(traced.qkv, rules.EpsilonRule) and traced.qkv.module is model.qkv
    assert not any(p.requires_grad for p in model.parameters())
    assert lrp.remove() is model
    assert dict(model.named_modules()) == children
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(model(x), y0)


def test_bad_dummy_inputs_are_named():
    model = Attention()
    lrp = Composite(MAP)
    with pytest.raises(ValueError, match="'y'"):
        lrp.register(model, dummy_inputs={"y": torch.randn(1, 4, 8)})
    with pytest.raises(TypeError, match="dict"):
        lrp.register(model, dummy_inputs=[torch.randn(1, 4, 8)])


def test_hugging_face_models_do_not_trace_and_the_error_says_what_to_use():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    lrp = Composite({nn.Linear: rules.EpsilonRule, operator.add: lf.add2})
    with pytest.raises(TraceFailure, match=r"lrp_kernels\.patch\(model\)"):
        lrp.register(model, dummy_inputs={"input_ids": torch.randint(0, 32, (1, 5))})
    assert not lrp.registered and all(p.requires_grad for p in model.parameters())


def test_method_name_keys_and_mapped_functions():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).exp() - 1.0

    model = M()
    x = torch.randn(3, 4)
    lrp = Composite({nn.Linear: rules.EpsilonRule, "exp": lambda t: lf.identity(torch.exp, t),
                     operator.sub: lambda a, c: lf.add2(a, torch.as_tensor(-c))})
    traced = lrp.register(model, dummy_inputs={"x": x})
    assert {(r.label, r.status) for r in lrp.operations} >= {("Tensor.exp", "handled"), ("operator.sub", "handled")}
    xr = x.clone().requires_grad_()
    y = traced(xr)
    y.backward(y)
    # by hand: epsilon on the bias "- 1", identity on exp, epsilon on the linear
    xe = x.clone().requires_grad_()
    h = lf.identity(torch.exp, lf.linear_epsilon(xe, model.lin.weight, model.lin.bias))
    ye = lf.add2(h, torch.as_tensor(-1.0))
    ye.backward(ye)
    torch.testing.assert_close(xr.grad, xe.grad)
    lrp.remove()
