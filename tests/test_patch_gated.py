"""The fused gated-MLP rule (ops.elementwise.gated_product, what patches use) equals the composed SPEC rules (float64 oracle):
identity rule on the activation, then the uniform rule on the product."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as tF

from helpers import oracle
from lrp_kernels.ops import elementwise
from lrp_kernels.ops.elementwise import gated_product

EPS = 1e-6


@pytest.mark.parametrize("act", [tF.silu, tF.gelu, torch.tanh])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("layout", ["strided", "blocks"])
def test_gated_product_matches_identity_then_uniform(act, need, dtype, tol, layout, monkeypatch):
    """``strided``: a non-contiguous ``g`` (one pass); ``blocks``: contiguous inputs in blocks of
    7 elements (a block boundary inside every row of 10, and a short last block)."""
    gen = torch.Generator().manual_seed(hash((act.__name__, need)) % 2**31)
    g = torch.randn(3, 5, 19, generator=gen, dtype=dtype)[:, :, ::2]  # non-contiguous, odd size
    if layout == "blocks":
        g = g.contiguous()
        monkeypatch.setattr(elementwise, "GATED_BACKWARD_BLOCK", 7)
        blocks = []
        block_fn = elementwise._gated_product_backward_block
        monkeypatch.setattr(elementwise, "_gated_product_backward_block",
                            lambda *a: (blocks.append(1), block_fn(*a)))
    u = torch.randn(3, 5, 10, generator=gen, dtype=dtype)
    g_m = torch.randn(3, 5, 10, generator=gen, dtype=dtype)
    g.requires_grad_(need[0])
    u.requires_grad_(need[1])
    out = gated_product(g, u, act, EPS, backend="torch")  # the blocks of the torch path (cpp: test_gated_product_cpp)
    assert torch.equal(out, act(g) * u)
    out.backward(g_m)
    if layout == "blocks":
        assert len(blocks) == -(-g.numel() // 7)  # every block ran once

    s = act(g.detach().double())
    Gs, Gu = oracle.mul_G(s, u, g_m, a_const=not need[0], b_const=not need[1])
    if need[1]:
        assert (u.grad.double() - Gu).norm() <= tol * Gu.norm()
    if need[0]:
        Gg = oracle.identity_G(act, g, Gs, EPS)
        assert (g.grad.double() - Gg).norm() <= tol * Gg.norm()


# ---- the patch folds the gate / up linears' epsilon rescale into the product's backward -------

def _float32_model(name):
    from helpers.models import build

    model, kind = build(name)
    return model.float(), kind


def _relevance(model, kind, **patch_kw):
    import lrp_kernels
    from helpers.models import make_inputs, relevance

    inputs = make_inputs(model, kind)
    with lrp_kernels.patch(model, **patch_kw):
        return relevance(model, kind, inputs)[0]["inputs_embeds"].double()


@pytest.fixture
def fold_decisions(monkeypatch):
    """The patch's folding decisions, in call order."""
    from lrp_kernels.hf import installers

    seen, decide = [], installers._folds_producers
    monkeypatch.setattr(installers, "_folds_producers", lambda *a: seen.append(decide(*a)) or seen[-1])
    return seen


@pytest.mark.parametrize("name", ["llama", "gemma"])  # SiLU and tanh-GELU gated MLPs
def test_folded_gated_mlp_equals_the_separate_rules(name, fold_decisions):
    """float32 model: folded (auto, cpp kernel) == each rule on its own (torch backend, nothing
    folded), and both equal the float64 reference of the rules (helpers.models.reference_model)."""
    from helpers.cpp import extension_or_skip
    from helpers.models import make_inputs, reference_model, relevance

    extension_or_skip()
    model, kind = _float32_model(name)
    folded = _relevance(model, kind, attention="exact")
    assert fold_decisions and all(fold_decisions)
    fold_decisions.clear()
    separate = _relevance(model, kind, attention="exact", backend="torch")
    assert fold_decisions and not any(fold_decisions)
    assert (folded - separate).norm() <= 1e-5 * separate.norm()
    ref = reference_model(model.double())
    want = relevance(ref, kind, make_inputs(ref, kind))[0]["inputs_embeds"]
    own_error = ((separate - want).norm() / want.norm()).item()
    assert (folded - want).norm() <= max(1e-5, 1.5 * own_error) * want.norm()


def test_no_fold_under_the_conservation_check(fold_decisions):
    """The check looks at each rule on its own: gate and up keep their epsilon rule records."""
    import lrp_kernels
    from lrp_kernels.tools import check
    from helpers.models import make_inputs, relevance

    model, kind = _float32_model("llama")
    with lrp_kernels.patch(model), check.conservation(module=model) as report:
        relevance(model, kind, make_inputs(model, kind))
    assert fold_decisions and not any(fold_decisions)
    labels = {r.label for r in report.records if r.op == "linear_epsilon"}
    assert any(l.endswith("mlp.gate_proj") for l in labels) and any(l.endswith("mlp.up_proj") for l in labels)


def test_no_fold_when_someone_watches_the_gate(fold_decisions):
    """A forward hook on gate_proj (latent relevance, a user's probe) sees the module run as usual,
    and the gradient at its output is the one entering the gate's own epsilon rule."""
    from helpers.cpp import extension_or_skip

    extension_or_skip()
    model, kind = _float32_model("llama")
    seen = []
    hook = model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        watched = _relevance(model, kind)
    finally:
        hook.remove()
    assert seen and fold_decisions[0] is False and fold_decisions[1] is True  # layer 0 watched, layer 1 not
    assert (watched - _relevance(model, kind, backend="torch")).norm() <= 1e-5 * watched.norm()
