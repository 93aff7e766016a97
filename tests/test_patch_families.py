"""Every patched family: eps -> 0 input relevance equals input x modified gradient of an
independent plain-torch reference (tests/helpers/models.py), no NaN with padding masks, forward
unchanged while patched, and remove() restores outputs bit for bit. Float64 tiny models."""
import pytest
import torch

import lrp_kernels
from helpers.models import FAMILIES, build, make_inputs, reference_model, relevance


def family_inputs(family, model, kind, **kw):
    """make_inputs, without padding for Gemma 2: transformers' eager Gemma-2 attention in float64
    outputs NaN for a padded row (its float64 mask minimum becomes -inf in the float32 softmax of
    a fully masked query), and the patch reproduces the model's forward bit for bit."""
    if family == "gemma2":
        kw["pad"] = "none"
    return make_inputs(model, kind, **kw)

EPS = 1e-12


def _real(kind, inputs):
    """Per-position mask of real (non-padding) tokens for comparing outputs."""
    return inputs.get("attention_mask", None)


@pytest.mark.parametrize("family, rule", [(f, "attnlrp") for f in FAMILIES]
                         + [(f, "cp-lrp") for f in ("llama", "gemma2", "t5")])
def test_family_matches_reference(family, rule):
    model, kind = build(family)
    inputs = family_inputs(family, model, kind)
    ref_rel, _ = relevance(reference_model(model, rule), kind, inputs)
    with lrp_kernels.patch(model, rules=rule, epsilon=EPS):
        rel, _ = relevance(model, kind, inputs)
    for key in ref_rel:
        r, e = rel[key], ref_rel[key]
        assert torch.isfinite(r).all(), f"{family}: non-finite relevance at {key}"
        assert e.abs().sum() > 0, f"{family}: reference relevance is all zero ({key})"
        err = ((r - e).norm() / e.norm()).item()  # norm-wise: eps=1e-12 perturbs tiny entries
        assert err < 1e-6, f"{family}/{rule}/{key}: relative error {err:.2e}"
        mask = inputs.get("attention_mask")
        if mask is not None and key == "inputs_embeds":
            assert (r[mask == 0] == 0).all(), f"{family}: padding got relevance"


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_unchanged_and_remove_restores(family):
    model, kind = build(family)
    inputs = family_inputs(family, model, kind)
    names = [n for n, _ in model.named_modules()]
    modules = [m for _, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config, impl = model.config, model.config._attn_implementation
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        before = model(**inputs).logits
    handle = lrp_kernels.patch(model)
    assert handle.active and handle.applied
    assert model.config is not config and model.config._attn_implementation.startswith("lrp_kernels")
    assert all(not p.requires_grad for p in model.parameters())
    with torch.no_grad():
        during = model(**inputs).logits
    # fp32-level tolerance: transformers' RMSNorms compute in float32 even in a float64 model,
    # the patch's norms in the input dtype; padding rows may differ (masked out everywhere)
    real = inputs["attention_mask"].bool() if kind == "causal" else torch.ones(during.shape[:-1], dtype=torch.bool)
    assert torch.isfinite(during[real]).all()
    real &= torch.isfinite(before).all(-1)  # transformers' own eager Gemma-2 gives NaN rows with left padding
    torch.testing.assert_close(during[real], before[real], rtol=1e-5, atol=1e-6)
    handle.remove()
    with torch.no_grad():
        after = model(**inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)  # bit-identical
    assert [n for n, _ in model.named_modules()] == names
    assert all(a is b for a, (_, b) in zip(modules, model.named_modules()))
    assert all("forward" not in vars(m) for m in model.modules())
    assert model.config is config and model.config._attn_implementation == impl
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "gemma2", "t5"])
def test_long_sequence_uses_chunked_attention_and_matches_reference(family):
    """150 tokens: the attention takes the memory-lean chunked path (not the eager one used for
    tiny inputs); with padding, sliding windows, soft-caps and T5's position bias."""
    model, kind = build(family)
    inputs = family_inputs(family, model, kind, n=150)
    ref_rel, _ = relevance(reference_model(model), kind, inputs)
    for backend in ("auto", "torch"):
        with lrp_kernels.patch(model, epsilon=EPS, backend=backend):
            rel, _ = relevance(model, kind, inputs)
        for key in ref_rel:
            r, e = rel[key], ref_rel[key]
            assert torch.isfinite(r).all()
            err = ((r - e).norm() / e.norm()).item()
            assert err < 1e-6, f"{family}/{backend}/{key}: relative error {err:.2e}"


def test_chunked_attention_is_used(monkeypatch):
    from lrp_kernels.ops import attention
    calls = []
    original = attention.AttnLRPFn.apply
    monkeypatch.setattr(attention.AttnLRPFn, "apply", lambda *a: calls.append(1) or original(*a))
    model, kind = build("llama")
    with lrp_kernels.patch(model, attention="exact"):
        relevance(model, kind, make_inputs(model, kind, n=150))
    assert calls, "the fused (chunked) attention path was not taken for 150 tokens"
