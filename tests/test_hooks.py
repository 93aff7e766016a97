"""Hook / BasicHook / ParamMod / stabilize: the plumbing around the rules.

References are written out from the formulas in float64 (per layer, by hand), never by
calling the hooks.
"""
import copy

import pytest
import torch
from torch import nn

from lrp_kernels.hooks import rules as R
from lrp_kernels.hooks.composites import (LayerMapComposite, NameMapComposite,
                                         SpecialFirstLayerMapComposite)
from lrp_kernels.hooks.core import BasicHook, Hook, ParamMod, stabilize

f64 = torch.float64
EPS = 1e-6


def stab(z, eps=EPS):
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def eps_linear(x, W, b, R_out, eps=EPS):
    """R_x = x * ((R_z / stab(z)) @ W)."""
    z = x @ W.T + (0 if b is None else b)
    return x * ((R_out / stab(z, eps)) @ W)


# ----------------------------------------------------------------------------- stabilize

def test_stabilize_sign_of_zero_is_positive_and_never_flips():
    x = torch.tensor([0.0, -0.0, 1e-9, -1e-9, 2.0, -3.0], dtype=f64)
    s = stabilize(x, 1e-3)
    assert torch.equal(s[:2], torch.tensor([1e-3, 1e-3], dtype=f64))
    assert (torch.sign(s[2:]) == torch.sign(x[2:])).all()
    assert torch.allclose(s, x + 1e-3 * torch.tensor([1, 1, 1, -1, 1, -1], dtype=f64))


def test_stabilize_clip_and_norm_scale():
    x = torch.tensor([0.0, 1e-5, -1e-5, 0.5, -2.0], dtype=f64)
    c = stabilize(x, 1e-3, clip=True)
    assert torch.equal(c, torch.tensor([1e-3, 1e-3, -1e-3, 0.5, -2.0], dtype=f64))
    rms = x.pow(2).mean().sqrt()
    n = stabilize(x, 1e-2, norm_scale=True)
    assert torch.allclose(n, x + 1e-2 * rms * torch.tensor([1, 1, -1, 1, -1], dtype=f64))
    y = torch.tensor([[3.0, 4.0], [0.0, 1e-3]], dtype=f64)
    n = stabilize(y, 0.1, norm_scale=True, dim=1)
    assert torch.allclose(n[0], y[0] + 0.1 * (12.5 ** 0.5))
    assert stabilize(torch.zeros(3, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match="epsilon"):
        stabilize(x, -1.0)


# ----------------------------------------------------------------------------- Hook basics

class GradTimesInput(Hook):
    def forward(self, module, input, output):
        self.stored_tensors["input"] = input

    def backward(self, module, grad_input, grad_output):
        return (self.stored_tensors["input"][0] * grad_input[0],)


class ScaledNegative(Hook):
    """A subclass with its own constructor arguments and no copy() of its own."""

    def __init__(self, scale=0.2, *, offset=0.0):
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, module, input, output):
        self.stored_tensors["input"] = input

    def backward(self, module, grad_input, grad_output):
        x = self.stored_tensors["input"][0]
        return (grad_input[0] * (x.clamp(min=0) + self.scale * x.clamp(max=0)) + self.offset,)


def test_hook_backward_replaces_input_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(2, 4, dtype=f64, requires_grad=True)
    h = GradTimesInput().register(lin)
    y = lin(x)
    g = torch.randn_like(y)
    y.backward(g)
    h.remove()
    assert torch.allclose(x.grad, x.detach() * (g @ lin.weight.detach()))


def test_copy_of_subclass_keeps_constructor_arguments():
    hook = ScaledNegative(0.23, offset=0.5)
    c = hook.copy()
    assert type(c) is ScaledNegative and c is not hook
    assert (c.scale, c.offset) == (0.23, 0.5)
    assert c.stored_tensors == {} and c.stored_tensors is not hook.stored_tensors
    # the copy computes the same thing, with its own state
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    results = []
    for h in (hook, c):
        x.grad = None
        handle = h.register(lin)
        y = lin(x)
        y.backward(torch.ones_like(y))
        handle.remove()
        results.append(x.grad.clone())
    assert torch.equal(results[0], results[1])


def test_copy_of_basic_hook_subclass_binds_methods_to_the_copy():
    class ZPlusNames(BasicHook):
        def __init__(self, names=None):
            self.names = [] if names is None else names
            super().__init__(param_modifiers=[self._mod])

        def _mod(self, param, name):
            return param.clamp(min=0) if name in self.names else torch.zeros_like(param)

    h = ZPlusNames(["weight"])
    c = h.copy()
    assert c.names == ["weight"]
    assert c.param_modifiers[0].modifier.__self__ is c


def test_backward_wrong_shape_is_a_clear_error():
    class Bad(Hook):
        def backward(self, module, grad_input, grad_output):
            return (torch.zeros(5),)

    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3, requires_grad=True)
    h = Bad().register(lin)
    with pytest.raises(RuntimeError, match="shape"):
        lin(x).sum().backward()
    h.remove()


# ----------------------------------------------------------------------------- in place, shared, multi-input

def test_inplace_relu_after_and_on_hooked_modules():
    torch.manual_seed(1)
    l1, l2 = nn.Linear(5, 6).double(), nn.Linear(6, 3).double()
    model = nn.Sequential(l1, nn.ReLU(inplace=True), l2)
    comp = LayerMapComposite([(nn.Linear, R.Epsilon()), (nn.ReLU, R.Pass())])
    x = torch.randn(4, 5, dtype=f64, requires_grad=True)
    with comp.context(model):
        y = model(x)
        y.backward(y)
    # reference, layer by layer
    W1, b1, W2, b2 = (t.detach() for t in (l1.weight, l1.bias, l2.weight, l2.bias))
    h = x.detach() @ W1.T + b1
    a = h.clamp(min=0)
    y_ref = a @ W2.T + b2
    R_a = eps_linear(a, W2, b2, y_ref)
    R_x = eps_linear(x.detach(), W1, b1, R_a)   # Pass: R_h = R_a
    assert torch.allclose(y.detach(), y_ref)
    assert torch.allclose(x.grad, R_x, rtol=1e-9, atol=1e-12)


def test_module_called_twice_keeps_per_call_state():
    torch.manual_seed(2)
    lin = nn.Linear(4, 4).double()
    x = torch.randn(3, 4, dtype=f64, requires_grad=True)
    hook = R.Epsilon(1e-3)
    handle = hook.register(lin)
    h1 = lin(x)
    a = torch.tanh(h1)
    y = lin(a)
    y.backward(y)
    handle.remove()
    W, b = lin.weight.detach(), lin.bias.detach()
    R_a = eps_linear(a.detach(), W, b, y.detach(), 1e-3)
    # the tanh between the calls is not hooked, so its ordinary backward scales by (1 - a^2)
    R_h1 = R_a * (1 - a.detach() ** 2)
    R_x = eps_linear(x.detach(), W, b, R_h1, 1e-3)
    assert torch.allclose(x.grad, R_x, rtol=1e-9, atol=1e-12)
    assert hook.stored_tensors == {}  # remove() cleared everything


class TwoInputs(nn.Module):
    """y = scale * (a @ W1.T + b @ W2.T) (+ shift); non-tensor and keyword arguments."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(3, 4, dtype=f64))
        self.w2 = nn.Parameter(torch.randn(3, 2, dtype=f64))

    def forward(self, a, b, scale, shift=None):
        y = scale * (a @ self.w1.T + b @ self.w2.T)
        return y if shift is None else y + shift


def test_multi_input_module_with_non_tensor_args():
    torch.manual_seed(3)
    m = TwoInputs()
    a = torch.randn(5, 4, dtype=f64, requires_grad=True)
    b = torch.randn(5, 2, dtype=f64, requires_grad=True)
    shift = torch.randn(3, dtype=f64)
    h = BasicHook(stabilizer=1e-4).register(m)
    y = m(a, b, 2.0, shift=shift)
    R_y = torch.randn_like(y)
    y.backward(R_y)
    h.remove()
    W1, W2 = m.w1.detach(), m.w2.detach()
    z = 2.0 * (a.detach() @ W1.T + b.detach() @ W2.T) + shift
    N = R_y / stab(z, 1e-4)
    assert torch.allclose(a.grad, a.detach() * (2.0 * N @ W1), rtol=1e-9)
    assert torch.allclose(b.grad, b.detach() * (2.0 * N @ W2), rtol=1e-9)


def test_input_without_grad_is_left_alone():
    m = TwoInputs()
    a = torch.randn(2, 4, dtype=f64, requires_grad=True)
    b = torch.randn(2, 2, dtype=f64)  # constant
    h = BasicHook().register(m)
    y = m(a, b, 1.0)
    y.backward(y)
    h.remove()
    z = a.detach() @ m.w1.detach().T + b @ m.w2.detach().T
    assert torch.allclose(a.grad, a.detach() * ((y.detach() / stab(z)) @ m.w1.detach()))


def test_stored_input_modified_in_place_is_an_error():
    lin = nn.Linear(3, 3)
    x0 = torch.randn(2, 3, requires_grad=True)
    x = x0 * 1.0
    h = R.Gamma(0.5).register(lin)
    y = lin(x)
    x.mul_(2.0)
    # either autograd (the gate's view of x) or the version check of the rule refuses it
    with pytest.raises(RuntimeError, match="in ?place"):
        y.sum().backward()
    h.remove()
    # frozen parameters: Linear saves nothing, so the rule's own version check must catch it
    lin.requires_grad_(False)
    x = x0 * 1.0
    h = R.Gamma(0.5).register(lin)
    y = lin(x)
    x.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place after the forward"):
        y.sum().backward()
    h.remove()


# ----------------------------------------------------------------------------- BasicHook / ParamMod

def test_basic_hook_defaults_are_the_epsilon_rule_and_stabilizer_is_honoured():
    torch.manual_seed(4)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(2, 5, dtype=f64, requires_grad=True)
    W, b = lin.weight.detach(), lin.bias.detach()
    for stabilizer, eps in [(None, EPS), (0.5, 0.5), (lambda z: stab(z, 2.0), 2.0)]:
        x.grad = None
        hook = BasicHook() if stabilizer is None else BasicHook(stabilizer=stabilizer)
        h = hook.register(lin)
        y = lin(x)
        y.backward(y)
        h.remove()
        assert torch.allclose(x.grad, eps_linear(x.detach(), W, b, y.detach(), eps), rtol=1e-9), eps


def test_lrp0_custom_modifiers_and_mapper():
    torch.manual_seed(5)
    lin = nn.Linear(4, 4).double()
    x = torch.randn(3, 4, dtype=f64, requires_grad=True)
    hook = BasicHook(input_modifiers=[lambda t: t], param_modifiers=[lambda p, _: p],
                     output_modifiers=[lambda o: o],
                     gradient_mapper=lambda g, outs: [g / outs[0]],
                     reducer=lambda ins, grads: ins[0] * grads[0])
    h = hook.register(lin)
    y = lin(x)
    y.backward(y)
    h.remove()
    assert torch.allclose(x.grad, eps_linear(x.detach(), lin.weight.detach(), lin.bias.detach(), y.detach(), 0.0))


def test_modifier_lists_of_different_length_are_rejected():
    with pytest.raises(ValueError, match="one length"):
        BasicHook(input_modifiers=[lambda t: t, lambda t: t], param_modifiers=[lambda p, n: p])


def test_param_mod_never_touches_the_model():
    torch.manual_seed(6)
    lin = nn.Linear(4, 3)
    params = {n: p for n, p in lin.named_parameters()}
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    x = torch.randn(2, 4, requires_grad=True)
    h = R.AlphaBeta(2, 1, zero_params="bias").register(lin)
    y = lin(x)
    y.backward(y)
    h.remove()
    assert {n: p for n, p in lin.named_parameters()} == params  # same Parameter objects
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k])
    assert lin.weight.grad is not None  # ordinary parameter gradients still flow


def test_param_mod_zero_and_keys():
    lin = nn.Linear(3, 2)
    mod = ParamMod(lambda p, name: p * 2, param_keys=["weight"], zero_params="bias")
    out = mod(lin)
    assert torch.equal(out["weight"], lin.weight.detach() * 2)
    assert torch.equal(out["bias"], torch.zeros(2))
    assert mod(nn.Linear(3, 2, bias=False)).keys() == {"weight"}  # missing zero_params: ignored


def test_param_mod_skips_none_and_raises_only_for_missing_attributes():
    """A parameter set to None (bias=False) is skipped; a name the module has no attribute for
    raises (in the backward) unless require_params=False; submodules' parameters are not touched."""
    lin = nn.Linear(3, 2, bias=False)
    hook = BasicHook(param_modifiers=[ParamMod(lambda p, n: p, param_keys=["weight", "bias"])])
    h = hook.register(lin)
    x = torch.randn(2, 3, requires_grad=True)
    lin(x).sum().backward()  # bias is None: skipped, no error
    h.remove()
    assert torch.isfinite(x.grad).all()
    hook = BasicHook(param_modifiers=[ParamMod(lambda p, n: p, param_keys=["weight", "scale"])])
    h = hook.register(lin)
    y = lin(x)  # the forward is fine
    with pytest.raises(RuntimeError, match="scale"):
        y.sum().backward()
    h.remove()
    hook = BasicHook(param_modifiers=[ParamMod(lambda p, n: p, param_keys=["weight", "scale"], require_params=False)])
    h = hook.register(lin)
    x.grad = None
    lin(x).sum().backward()
    h.remove()
    assert torch.isfinite(x.grad).all()
    outer = nn.Sequential(nn.Linear(3, 2))
    assert ParamMod(lambda p, n: p * 2)(outer) == {}  # own parameters only


# ----------------------------------------------------------------------------- registration / removal

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(12, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x):
        h = self.pool(self.act(self.conv(x))).flatten(1)
        h = self.fc(h)
        return self.fc2(torch.relu(h)) + self.fc2(h)   # fc2 used twice


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p for n, p in model.named_parameters()})


def _no_hooks(model):
    for m in model.modules():
        for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                  "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            assert len(getattr(m, d, {})) == 0, (type(m).__name__, d)


@pytest.mark.parametrize("make", [
    lambda: LayerMapComposite([(nn.Conv2d, R.Gamma(0.25)), (nn.Linear, R.Epsilon()), (nn.ReLU, R.Pass()),
                               (nn.AvgPool2d, R.Norm())]),
    lambda: NameMapComposite([(("conv",), R.ZPlus()), (("fc", "fc2"), R.AlphaBeta(2, 1))]),
    lambda: SpecialFirstLayerMapComposite([(nn.Linear, R.Gamma(0.1)), (nn.Conv2d, R.ZPlus())],
                                          [(nn.Conv2d, R.ZBox(-2.0, 2.0))]),
])
def test_composites_register_and_remove_exactly(make):
    torch.manual_seed(7)
    model = Net()
    x = torch.randn(2, 2, 4, 4, requires_grad=True)
    y0 = model(x)
    y0.backward(torch.ones_like(y0))
    g0 = x.grad.clone()
    state, params = _snapshot(model)
    comp = make()
    with comp.context(model) as m:
        assert m is model and len(comp) > 0
        rules = [h.hook for h in comp.handles]
        assert len({id(r) for r in rules}) == len(rules)  # one copy per module
        x.grad = None
        y = model(x)
        assert torch.equal(y, y0)  # forward unchanged
        y.backward(y)
        assert torch.isfinite(x.grad).all() and not torch.equal(x.grad, g0)
    _no_hooks(model)
    assert all(not h.hook.stored_tensors for h in comp.handles) and comp.handles == []
    assert {n: p for n, p in model.named_parameters()} == params
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    x.grad = None
    y1 = model(x)
    y1.backward(torch.ones_like(y1))
    assert torch.equal(y1, y0) and torch.equal(x.grad, g0)


def test_special_first_layer_gets_first_rule():
    model = Net()
    comp = SpecialFirstLayerMapComposite([(nn.Conv2d, R.ZPlus()), (nn.Linear, R.Epsilon())],
                                         [(nn.Conv2d, R.Flat())])
    comp.register(model)
    kinds = {type(h.module).__name__: type(h.hook).__name__ for h in comp.handles}
    comp.remove()
    assert kinds["Conv2d"] == "Flat" and kinds["Linear"] == "Epsilon"


def test_name_map_unknown_name_is_an_error():
    with pytest.raises(ValueError, match="no module named"):
        NameMapComposite([(("nope",), R.Epsilon())]).register(Net())


def test_composite_bad_layer_map_is_an_error():
    with pytest.raises(TypeError, match="layer_map"):
        LayerMapComposite([("Linear", R.Epsilon())])
    with pytest.raises(TypeError, match="Hook"):
        LayerMapComposite([(nn.Linear, lambda: None)])


def test_graph_built_before_remove():
    """A graph built while a rule was registered, run after remove(): plain hooks pass the
    plain gradient; rules that never computed the module's own gradient say so clearly."""
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    handle = GradTimesInput().register(lin)
    y = lin(x)
    handle.remove()
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad, torch.ones_like(y) @ lin.weight.detach())
    handle = R.Gamma(1.0).register(lin)
    y = lin(x)
    handle.remove()
    with pytest.raises(RuntimeError, match="removed before the backward"):
        y.backward(torch.ones_like(y))


def test_rules_skip_the_module_backward_but_keep_parameter_gradients():
    """BasicHook rules run the module on detached inputs (its own input gradient is never
    computed); parameters still get their ordinary gradient from the output."""
    calls = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            calls.append(1)
            return g

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(Spy.apply(x))

    m = M()
    x = torch.randn(4, 3, requires_grad=True)
    h = R.Epsilon().register(m)
    y = m(x)
    y.backward(y.detach())
    h.remove()
    assert calls == [1] and x.grad is not None  # once: the rule's own VJP, not the module's backward
    y2 = m.lin(x)
    assert torch.allclose(m.lin.weight.grad, y2.detach().T @ x.detach())


def test_no_grad_forward_does_not_gate():
    lin = nn.Linear(3, 3)
    h = R.Epsilon().register(lin)
    with torch.no_grad():
        y = lin(torch.randn(2, 3))
    h.remove()
    assert y.grad_fn is None


def test_deepcopy_of_hooked_rule_template():
    rule = R.Gamma(0.3)
    c = copy.deepcopy(rule)
    assert c.gamma == 0.3


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_relevance(reentrant):
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(8)
    block = nn.Sequential(nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 6)).double()
    head = nn.Linear(6, 2).double()
    x = torch.randn(3, 6, dtype=f64)
    comp = LayerMapComposite([(nn.Linear, R.Gamma(0.25)), (nn.ReLU, R.Pass())])

    def run(ckpt):
        xx = x.clone().requires_grad_(True)
        inp = xx * 1.0  # reentrant checkpoint needs an input that requires grad
        h = checkpoint(block, inp, use_reentrant=reentrant) if ckpt else block(inp)
        y = head(h)
        y.backward(y)
        return xx.grad

    with comp.context(block):
        with comp_head(head):
            plain, ck = run(False), run(True)
    assert torch.allclose(plain, ck, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(plain, run(True))  # the rules did act (plain gradient differs)


def comp_head(head):
    return LayerMapComposite([(nn.Linear, R.Epsilon())]).context(head)


class WithAux(nn.Module):
    """Returns a tuple (tensor, None, int) like many Hugging Face modules."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3).double()

    def forward(self, x):
        return self.lin(x), None, 7


def test_tuple_outputs_and_grad_output_recorded():
    m = WithAux()
    seen = {}

    class Record(Hook):
        def backward(self, module, grad_input, grad_output):
            seen["grad_output"] = grad_output
            seen["stored"] = self.stored_tensors["grad_output"]
            return (grad_output[0] @ module.lin.weight.detach() * 0 + 1.0,)

    h = Record().register(m)
    x = torch.randn(2, 3, dtype=f64, requires_grad=True)
    y, none, seven = m(x)
    assert none is None and seven == 7
    g = torch.randn_like(y)
    y.backward(g)
    h.remove()
    assert len(seen["grad_output"]) == 1 and torch.equal(seen["grad_output"][0], g)
    assert seen["stored"][0] is seen["grad_output"][0]
    assert torch.equal(x.grad, torch.ones_like(x))
    # BasicHook on the same tuple-returning module: the single tensor output is used
    h = BasicHook().register(m)
    x.grad = None
    y, _, _ = m(x)
    y.backward(y)
    h.remove()
    W, b = m.lin.weight.detach(), m.lin.bias.detach()
    assert torch.allclose(x.grad, eps_linear(x.detach(), W, b, y.detach()))


def test_ignore_hook_on_relu_passes_gradient():
    class Ignore(Hook):
        def backward(self, module, grad_input, grad_output):
            return grad_output

    relu = nn.ReLU()
    x = torch.randn(1, 4, requires_grad=True)
    h = Ignore().register(relu)
    out = relu(x)
    grad, = torch.autograd.grad(out, x, torch.ones_like(out))
    h.remove()
    assert torch.equal(grad, torch.ones_like(x))


@pytest.mark.parametrize("relevance", [True, False])
def test_rules_report_to_the_conservation_check(relevance):
    check = pytest.importorskip("lrp_kernels.check")
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.ReLU(), nn.Linear(6, 4), nn.Linear(4, 3, bias=False)).double()
    comp = LayerMapComposite([(nn.Linear, R.Gamma(0.5, 1e-12, relevance=relevance)), (nn.ReLU, R.Pass())])
    x = torch.rand(3, 5, dtype=f64) + 0.1
    with comp.context(model), check.conservation(rtol=1e-6) as report:
        y = model(x.requires_grad_(True))
        y.backward(y if relevance else torch.ones_like(y))
    names = [r.name for r in report.records]
    assert len(report.records) == 3 and all("Gamma(Linear)" in n for n in names), report.table()
    expected = [r.expected for r in report.records]   # backward order: last layer first
    assert expected == [True, False, True]            # the middle Linear has a bias
    assert report.first_violation() is None, report.table()
    assert abs(report.records[0].r_out - report.records[0].r_in) < 1e-9 * report.records[0].mass
    assert report.records[1].r_in != pytest.approx(report.records[1].r_out)  # the bias absorbs


def test_generic_rule_path_reports_to_the_conservation_check():
    check = pytest.importorskip("lrp_kernels.check")
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    with R.Flat(1e-12).register(conv), check.conservation(rtol=1e-6) as report:
        x = torch.randn(1, 2, 4, 4, dtype=f64, requires_grad=True)
        y = conv(x)
        y.backward(torch.randn_like(y))
    rec, = report.records
    assert rec.name.startswith("Flat(Conv2d)") and rec.expected and rec.conserved, report.table()


def test_named_composites_assign_the_documented_rules():
    from lrp_kernels.hooks import composites as HC

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.act, self.pool, self.fc = nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.pool(self.act(self.c2(self.act(self.c1(x))))).flatten(1))

    expect = {
        HC.EpsilonGammaBox: {"c1": "ZBox", "c2": "Gamma", "fc": "Epsilon"},
        HC.EpsilonPlus: {"c1": "ZPlus", "c2": "ZPlus", "fc": "Epsilon"},
        HC.EpsilonPlusFlat: {"c1": "Flat", "c2": "ZPlus", "fc": "Epsilon"},
        HC.EpsilonAlpha2Beta1: {"c1": "AlphaBeta", "c2": "AlphaBeta", "fc": "Epsilon"},
        HC.EpsilonAlpha2Beta1Flat: {"c1": "Flat", "c2": "AlphaBeta", "fc": "Epsilon"},
    }
    torch.manual_seed(12)
    model = CNN()
    x = torch.rand(2, 3, 5, 5)
    for cls, rules in expect.items():
        comp = cls(-1.0, 1.0) if cls is HC.EpsilonGammaBox else cls()
        with comp.context(model):
            names = {n: type(h.hook).__name__ for h in comp.handles for n, m in model.named_modules() if m is h.module}
            assert {k: names[k] for k in rules} == rules and names["act"] == "Pass" and names["pool"] == "Norm"
            xx = x.clone().requires_grad_(True)
            y = model(xx)
            y[:, 0].sum().backward()
            assert torch.isfinite(xx.grad).all() and xx.grad.abs().sum() > 0
        _no_hooks(model)
