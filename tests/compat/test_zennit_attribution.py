"""lrp_kernels.compat.zennit.attribution against closed forms derived here (linear and quadratic
models, occlusion of a weighted sum by hand), and with composites of both kinds."""
from functools import partial

import pytest
import torch
from torch import nn

from lrp_kernels.compat.zennit.attribution import (Gradient, IntegratedGradients, Occlusion, SmoothGrad,
                                                   constant, identity, occlude_independent)
from lrp_kernels.hooks import rules as R
from lrp_kernels.hooks.composites import LayerMapComposite

DTYPE = torch.float64


def linear_model(n_in=5, n_out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, dtype=DTYPE)


class Square(nn.Module):
    """f(x) = x ** 2 elementwise: gradient 2 x, so every attributor has a closed form."""

    def forward(self, x):
        return x ** 2


class Logger(nn.Module):
    """The identity that keeps every input it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x


# ----------------------------------------------------------------------------- attr_output

def test_attr_output_tensor_function_and_precedence():
    model = linear_model()
    x = torch.randn(4, 5, dtype=DTYPE)
    seed = torch.randn(4, 3, dtype=DTYPE)
    # for a linear model the gradient is seed @ W, whatever the input
    with Gradient(model, attr_output=seed) as attributor:
        _, from_init = attributor(x)
        _, from_call = attributor(x, torch.ones_like)
    assert torch.allclose(from_init, seed @ model.weight)
    assert torch.allclose(from_call, torch.ones(4, 3, dtype=DTYPE) @ model.weight)
    output, from_default = Gradient(model)(x)  # identity: the output seeds itself
    assert torch.allclose(from_default, output.detach() @ model.weight)


def test_gradient_leaves_the_callers_input_alone():
    x = torch.randn(2, 5, dtype=DTYPE)
    Gradient(linear_model())(x)
    assert not x.requires_grad and x.grad is None


def test_constant_and_identity():
    obj = object()
    assert constant(obj)(1, 2, key=3) is obj
    assert identity(obj) is obj


# ----------------------------------------------------------------------------- IntegratedGradients

@pytest.mark.parametrize("n_iter", [1, 3, 20])
def test_integrated_gradients_linear_is_exact(n_iter):
    # f(x) = W x + b has gradient seed @ W everywhere, so IG = (x - x0) * (seed @ W) for any
    # number of steps, and it sums to seed . (f(x) - f(x0)) (completeness)
    model = linear_model()
    x = torch.randn(4, 5, dtype=DTYPE)
    seed = torch.randn(4, 3, dtype=DTYPE)
    with IntegratedGradients(model, baseline_fn=torch.ones_like, n_iter=n_iter) as attributor:
        output, attribution = attributor(x, seed)
    baseline = torch.ones_like(x)
    assert torch.allclose(attribution, (x - baseline) * (seed @ model.weight))
    with torch.no_grad():
        assert torch.allclose(attribution.sum(1), (seed * (model(x) - model(baseline))).sum(1))
        assert torch.allclose(output, model(x))


@pytest.mark.parametrize("n_iter", [1, 2, 7])
def test_integrated_gradients_is_the_right_riemann_sum(n_iter):
    # f = x^2, seed 1: grad at a x is 2 a x; mean over a = k / n (k = 1..n) is (n + 1) / n * x,
    # times x: x^2 (n + 1) / n (a midpoint or left sum would give other factors)
    x = torch.randn(3, 4, dtype=DTYPE)
    _, attribution = IntegratedGradients(Square(), n_iter=n_iter)(x, torch.ones_like)
    assert torch.allclose(attribution, x ** 2 * (n_iter + 1) / n_iter)


# ----------------------------------------------------------------------------- SmoothGrad

def test_smooth_grad_of_linear_model_is_its_gradient():
    model = linear_model()
    x = torch.randn(4, 5, dtype=DTYPE)
    seed = torch.randn(4, 3, dtype=DTYPE)
    output, attribution = SmoothGrad(model, noise_level=0.5, n_iter=7)(x, seed)
    assert torch.allclose(attribution, seed @ model.weight)
    with torch.no_grad():
        assert torch.equal(output, model(x))  # the last sample is noise-free


def test_smooth_grad_of_square_and_its_noise():
    # f = x^2: SmoothGrad = 2 x + 2 mean(noise); the noise has std noise_level * (max - min)
    # per sample, so the mean is within a few std / sqrt(n) of 2 x
    torch.manual_seed(1)
    x = torch.randn(2, 200, dtype=DTYPE)
    noise_level, n_iter = 0.2, 50
    logger = Logger()
    _, attribution = SmoothGrad(nn.Sequential(logger, Square()), noise_level=noise_level,
                                n_iter=n_iter)(x, torch.ones_like)
    assert len(logger.seen) == n_iter and torch.equal(logger.seen[-1], x)
    noise = torch.stack(logger.seen[:-1]) - x
    sigma = noise_level * (x.amax(1) - x.amin(1))
    assert torch.allclose(noise.std(dim=(0, 2)), sigma, rtol=0.05)
    assert torch.allclose(attribution, 2 * x + 2 * noise.sum(0) / n_iter)
    assert ((attribution - 2 * x).abs() < 5 * 2 * sigma[:, None] / n_iter ** 0.5).all()


# ----------------------------------------------------------------------------- Occlusion

class WeightedSum(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return (x * self.weight).sum(1, keepdim=True)


@pytest.mark.parametrize("window,stride", [(2, 2), (2, 1), (3, 2)])
def test_occlusion_of_a_weighted_sum_by_hand(window, stride):
    # f(x) = sum_i w_i x_i; the default keeps the window and zeroes the rest, so a window
    # starting at s scores sum_{i in window} w_i x_i; windows wrap around the end (Zennit's
    # roll); every element collects the scores of the windows that cover it
    n = 6
    weight = torch.randn(n, dtype=DTYPE)
    x = torch.randn(2, n, dtype=DTYPE)
    expected = torch.zeros_like(x)
    for start in range(0, n, stride):
        covered = [(start + k) % n for k in range(window)]
        score = (weight[covered] * x[:, covered]).sum(1)
        expected[:, covered] += score[:, None]
    output, attribution = Occlusion(WeightedSum(weight), window=window, stride=stride)(x)
    assert torch.allclose(attribution, expected)
    assert torch.allclose(output, WeightedSum(weight)(x))


def test_occlusion_inverted_removes_the_window():
    # invert=True zeroes the window instead: score = f(x) - (its part of f), window 2 stride 2
    weight = torch.randn(4, dtype=DTYPE)
    x = torch.randn(3, 4, dtype=DTYPE)
    model = WeightedSum(weight)
    occlude = partial(occlude_independent, fill_fn=torch.zeros_like, invert=True)
    _, attribution = Occlusion(model, occlusion_fn=occlude, window=(2,), stride=(2,))(x)
    total = model(x)
    parts = (weight * x).reshape(3, 2, 2).sum(2)  # the two windows' parts of f
    assert torch.allclose(attribution, (total - parts).repeat_interleave(2, dim=1))


def test_occlusion_window_on_trailing_axes():
    # window (2,) on (B, C, L): a block over all channels and 2 positions, one step over C
    logger = Logger()
    x = torch.randn(1, 3, 4, dtype=DTYPE)
    Occlusion(logger, window=(2,), stride=(2,))(x)
    occluded = logger.seen[:-1]
    assert len(occluded) == 2
    assert torch.equal(occluded[0][..., :2], x[..., :2]) and (occluded[0][..., 2:] == 0).all()
    assert torch.equal(sum(occluded), x)


@pytest.mark.parametrize("bad", [[2], "2", (2, 2.0), 2.5])
def test_occlusion_rejects_bad_window(bad):
    with pytest.raises(TypeError, match="window"):
        Occlusion(None, window=bad)


def test_occlude_independent():
    x = torch.arange(4.0)
    mask = torch.tensor([True, False, True, False])
    assert occlude_independent(x, mask).tolist() == [0.0, 0.0, 2.0, 0.0]
    assert occlude_independent(x, mask, fill_fn=torch.ones_like, invert=True).tolist() == [1.0, 1.0, 1.0, 3.0]


# ----------------------------------------------------------------------------- composites

def relu_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5, dtype=DTYPE), nn.ReLU(), nn.Linear(5, 3, dtype=DTYPE))


def test_gradient_with_our_hook_composite_is_lrp():
    model = relu_net()
    x = torch.randn(4, 6, dtype=DTYPE)
    seed = torch.eye(3, dtype=DTYPE)[[0, 1, 2, 0]]
    composite = LayerMapComposite([(nn.Linear, R.ZPlus())])
    with composite.context(model) as modified:
        xr = x.clone().requires_grad_()
        expected, = torch.autograd.grad(modified(xr), xr, seed)
    with Gradient(model, composite, attr_output=seed) as attributor:
        assert len(composite) == 2  # registered for the block
        _, within = attributor(x)
    assert len(composite) == 0  # and removed after it
    _, single_call = Gradient(model, composite)(x, seed)  # registered for the call only
    assert len(composite) == 0
    _, gradient = Gradient(model)(x, seed)
    assert torch.allclose(within, expected) and torch.allclose(single_call, expected)
    assert not torch.allclose(gradient, expected)  # the composite did change the gradient


def test_gradient_with_zennit_composite_and_inactive():
    core = pytest.importorskip("lrp_kernels.compat.zennit.core")
    composites = pytest.importorskip("lrp_kernels.compat.zennit.composites")
    model = relu_net()
    x = torch.randn(4, 6, dtype=DTYPE)
    composite = composites.EpsilonPlus()
    assert isinstance(composite, core.Composite)
    with composite.context(model) as modified:
        xr = x.clone().requires_grad_()
        expected, = torch.autograd.grad(modified(xr), xr, torch.ones(4, 3, dtype=DTYPE))
    with Gradient(model, composite, attr_output=torch.ones_like) as attributor:
        _, relevance = attributor(x)
        with attributor.inactive():
            _, gradient = attributor(x)
    _, plain = Gradient(model)(x, torch.ones_like)
    assert torch.allclose(relevance, expected)
    assert torch.allclose(gradient, plain) and not torch.allclose(relevance, plain)
    assert not composite.handles


def test_inactive_needs_a_composite_that_has_it():
    with pytest.raises(AttributeError, match="inactive"):
        Gradient(relu_net()).inactive
