"""Vision: image heatmaps (lrp_kernels.explanations.imaging) and gamma rules on a tiny Hugging Face ViT,
alone and on top of the AttnLRP model patch (lrp_kernels.hf.patching)."""
import numpy as np
import pytest
import torch
from torch import nn

from lrp_kernels.hooks import rules as R
from lrp_kernels.hooks.composites import LayerMapComposite
from lrp_kernels.explanations.imaging import diverging_colors, heatmap_grid, imgify

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- imaging

def test_diverging_colors_blue_white_red():
    c = diverging_colors(np.array([-1.0, 0.0, 1.0, -5.0, 5.0]), -1.0, 1.0)
    assert c.dtype == np.uint8 and c.shape == (5, 3)
    assert c[0].tolist() == [0, 0, 255] and c[1].tolist() == [255, 255, 255] and c[2].tolist() == [255, 0, 0]
    assert c[3].tolist() == c[0].tolist() and c[4].tolist() == c[2].tolist()  # clipped
    # monotone: more positive -> less blue
    v = diverging_colors(np.linspace(-1, 1, 21), -1, 1)
    assert (np.diff(v[:, 2].astype(int)) <= 0).all() and (np.diff(v[:, 0].astype(int)) >= 0).all()


def test_grid_layout_and_symmetric_scale():
    a = np.zeros((3, 4))
    a[0, 0] = 2.0
    b = np.zeros((3, 4))
    b[1, 1] = -1.0
    g = heatmap_grid([a, b, a], grid=(2, 2), pad=1)
    assert g.shape == (2 * 3 + 1, 2 * 4 + 1, 3)
    assert g[0, 0].tolist() == [255, 0, 0]                 # max |R| = 2 -> full red
    cell = g[0:3, 5:9]                                     # second cell, row 0 col 1
    assert cell[1, 1].tolist() == diverging_colors(np.array(-1.0), -2.0, 2.0).tolist()
    assert (g[4:7, 5:9] == 255).all()                      # empty fourth cell stays white
    img = imgify(torch.tensor(a), scale=3)
    assert img.size == (12, 9) and img.mode == "RGB"


def test_imaging_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        heatmap_grid([np.array([[np.nan, 0.0]])])
    with pytest.raises(ValueError, match="grid"):
        heatmap_grid([np.zeros((2, 2))] * 3, grid=(1, 2))
    with pytest.raises(ValueError, match="one shape"):
        heatmap_grid([np.zeros((2, 2)), np.zeros((3, 2))])
    with pytest.raises(ValueError, match="2-D"):
        heatmap_grid(np.zeros((2, 2, 2, 2)))


# ----------------------------------------------------------------------------- ViT

def tiny_vit(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=24, image_size=8, patch_size=4, num_channels=3,
                                 num_labels=4)
    model = transformers.ViTForImageClassification(cfg).to(dtype).eval()
    with torch.no_grad():  # random biases so that the bias terms of the rules matter
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    return model


def pixel_relevance(model, pixels, target=1, relevance_view=False):
    x = pixels.clone().requires_grad_(True)
    logits = model(pixel_values=x).logits
    logits[0, target].backward()
    return (x.grad if relevance_view else x.detach() * x.grad), logits.detach()


def gamma_composite(conv_gamma, lin_gamma, relevance=False):
    return LayerMapComposite([(nn.Conv2d, R.Gamma(conv_gamma, relevance=relevance)),
                              (nn.Linear, R.Gamma(lin_gamma, relevance=relevance))])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_clean(model, state):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_gamma_zero_on_top_of_patch_equals_the_patch():
    """The patch gives Linear and the patch-embedding Conv2d the epsilon rule; Gamma(0) in the
    gradient view is the same rule (LRP-0 + the same stabiliser), so the relevance must agree."""
    patch = pytest.importorskip("lrp_kernels.hf.patching").patch
    model = tiny_vit()
    pixels = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    state = _state(model)
    with patch(model):
        ref, logits_ref = pixel_relevance(model, pixels)
        with gamma_composite(0.0, 0.0).context(model):
            got, logits = pixel_relevance(model, pixels)
        with gamma_composite(0.5, 0.25).context(model):
            other, _ = pixel_relevance(model, pixels)
    assert torch.equal(logits, logits_ref)
    assert torch.allclose(got, ref, rtol=1e-7, atol=1e-12), (got - ref).abs().max()
    assert torch.isfinite(other).all() and not torch.allclose(other, ref)
    _assert_clean(model, state)
    assert all(p.requires_grad for p in model.parameters())


def test_gamma_hooks_on_patch_match_explicit_last_layer():
    """Only the classifier head hooked (Gamma, gradient view): its input relevance is the explicit
    gamma formula on the head's weight matrix."""
    patch = pytest.importorskip("lrp_kernels.hf.patching").patch
    model = tiny_vit()
    pixels = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    head = model.classifier
    seen = {}

    def record(module, args):  # registered before the rule: sees the tensor *before* the gate
        seen["x"] = args[0].detach()
        args[0].register_hook(lambda g: seen.setdefault("g", g))

    rec = head.register_forward_pre_hook(record)
    with patch(model):
        handle = R.Gamma(0.3, relevance=False).register(head)
        x = pixels.clone().requires_grad_(True)
        model(pixel_values=x).logits[0, 2].backward()
        handle.remove()
    rec.remove()
    xin, W, b = seen["x"][0], head.weight.detach(), head.bias.detach()
    z = xin @ W.T + b
    R_out = torch.zeros_like(z)
    R_out[2] = z[2]  # gradient view: grad 1 at the target logit -> R = z * 1
    Z = W * xin[None, :]
    g = 0.3
    up = (z >= 0)[:, None]
    Q = torch.where(up, Z + g * Z.clamp(min=0), Z + g * Z.clamp(max=0))
    den = Q.sum(1) + torch.where(z >= 0, b + g * b.clamp(min=0), b + g * b.clamp(max=0))
    den = den + 1e-6 * torch.where(den >= 0, 1.0, -1.0).double()
    R_ref = (Q / den[:, None] * R_out[:, None]).sum(0)
    assert torch.allclose(xin * seen["g"][0], R_ref, rtol=1e-9, atol=1e-12)


def test_gamma_alone_relevance_view_on_vit_is_finite_and_removable():
    model = tiny_vit(torch.float32)
    pixels = torch.randn(2, 3, 8, 8)
    state = _state(model)
    base, logits0 = pixel_relevance(model, pixels, relevance_view=False)
    with gamma_composite(0.25, 0.05).context(model):
        rel, logits = pixel_relevance(model, pixels, relevance_view=False)
    assert torch.equal(logits, logits0) and torch.isfinite(rel).all()
    _assert_clean(model, state)
    again, _ = pixel_relevance(model, pixels, relevance_view=False)
    assert torch.equal(again, base)


# ----------------------------------------------------------------------------- with the fx Composite

class MiniViT(nn.Module):
    """A traceable ViT: conv patch embedding, one attention block, GELU MLP, mean-pool head."""

    def __init__(self, d=8, heads=2, patch=2, classes=3):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, d, patch, stride=patch)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 4, d))
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.act, self.down = nn.Linear(d, 12), nn.GELU(), nn.Linear(12, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        B, T, D = h.shape
        q, k, v = self.qkv(h).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / 2.0, dim=-1)
        a = torch.matmul(p, v).transpose(1, 2).reshape(B, T, D)
        h = h + self.o(a)
        h = h + self.down(self.act(self.up(h)))
        return self.head(h[:, 0])


def test_gamma_hooks_combine_with_the_traced_composite():
    """fx Composite (relevance view) on the attention ops + Gamma(0) hooks on Linear/Conv2d ==
    the Composite with its own epsilon rule on Linear/Conv2d; Gamma(0.25) differs; removal of
    both leaves the model as it was."""
    import operator
    import warnings

    import torch.nn.functional as F

    composite = pytest.importorskip("lrp_kernels.explicit.composite")
    lf = pytest.importorskip("lrp_kernels.functional")
    rules = pytest.importorskip("lrp_kernels.rules")
    ops = {operator.add: lf.add2, torch.matmul: lf.matmul, F.softmax: lf.softmax, torch.softmax: lf.softmax,
           nn.GELU: rules.IdentityRule}
    torch.manual_seed(0)
    model = MiniViT().double().eval()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    state = _state(model)

    def run(traced):
        xx = x.clone().requires_grad_(True)
        y = traced(xx)
        y[0, 1].backward(y[0, 1])
        return xx.grad

    ref_comp = composite.Composite({**ops, nn.Linear: rules.EpsilonRule, nn.Conv2d: rules.EpsilonRule})
    ref = run(ref_comp.register(model, dummy_inputs={"x": x}))
    ref_comp.remove()

    comp = composite.Composite(ops)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Linear/Conv2d are left to the hooks
        traced = comp.register(model, dummy_inputs={"x": x}, strict=False)
    with gamma_composite(0.0, 0.0, relevance=True).context(traced):
        got = run(traced)
    with gamma_composite(0.25, 0.25, relevance=True).context(traced):
        other = run(traced)
    comp.remove()
    assert torch.allclose(got, ref, rtol=1e-7, atol=1e-12), (got - ref).abs().max()
    assert torch.isfinite(other).all() and not torch.allclose(other, ref)
    _assert_clean(model, state)


def test_gamma_on_patched_vit_same_with_gradient_checkpointing():
    patch = pytest.importorskip("lrp_kernels.hf.patching").patch
    model = tiny_vit()
    model.train()  # HF only checkpoints in training mode; dropout is 0 in the config
    pixels = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with patch(model):
        with gamma_composite(0.5, 0.25).context(model):
            plain, _ = pixel_relevance(model, pixels)
        model.gradient_checkpointing_enable()  # checkpoints each ViT layer (checked: 2 calls)
        try:
            with gamma_composite(0.5, 0.25).context(model):
                ckpt, _ = pixel_relevance(model, pixels)
        finally:
            model.gradient_checkpointing_disable()
    assert torch.allclose(plain, ckpt, rtol=1e-10, atol=1e-14)
