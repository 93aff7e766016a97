"""``patch(model, view="relevance")``: LXT explicit's convention on the main API.

Under it ``output.backward(output)`` seeds relevance and ``inputs_embeds.grad`` *is* the
relevance; it must equal the default (gradient) view's ``x * x.grad`` for the same target, for
every family kind (decoder, encoder, seq2seq, vision), and leave no trace after ``remove()``.
"""
import copy

import pytest
import torch

import lrp_kernels
from helpers.models import build, differentiable, make_inputs
from helpers.recall_task import task, tiny_llama


def _gradient_view_relevance(model, kind, inputs, pick):
    with lrp_kernels.patch(model):
        xs = {k: (v.clone().requires_grad_() if k in differentiable(inputs) else v) for k, v in inputs.items()}
        out = model(**xs)
        pick(out.logits).backward()  # gradient seed 1 on the chosen logits
        return {k: (xs[k] * xs[k].grad).detach() for k in differentiable(inputs)}


def _relevance_view_relevance(model, inputs, pick):
    with lrp_kernels.patch(model, view="relevance"):
        xs = {k: (v.clone().requires_grad_() if k in differentiable(inputs) else v) for k, v in inputs.items()}
        chosen = pick(model(**xs).logits)
        chosen.backward(chosen)  # relevance seed: the chosen logits themselves
        return {k: xs[k].grad.detach() for k in differentiable(inputs)}


def _top_logit(kind):
    return (lambda logits: logits[:, -1].max(-1).values) if kind in ("causal", "seq2seq") \
        else (lambda logits: logits.max(-1).values)


@pytest.mark.parametrize("name", ["llama", "gemma2", "bert", "t5", "vit"])
def test_relevance_view_grad_is_the_gradient_view_relevance(name):
    model, kind = build(name)
    # gemma2: transformers' own eager attention gives NaN on padded rows in float64 (unpatched too)
    inputs = make_inputs(model, kind, pad="none" if name == "gemma2" else None)
    pick = _top_logit(kind)
    want = _gradient_view_relevance(model, kind, inputs, lambda logits: pick(logits).sum())
    got = _relevance_view_relevance(model, inputs, pick)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.isfinite(got[k]).all()
        assert torch.allclose(got[k], want[k], rtol=1e-9, atol=1e-12), (k, (got[k] - want[k]).abs().max())
        assert want[k].abs().sum() > 0


def test_any_relevance_seed_is_linear_in_the_targets():
    """Seeding two logits with relevances ``a * y1`` and ``b * y2`` gives ``a R1 + b R2``."""
    model, kind = build("llama")
    inputs = make_inputs(model, kind)
    emb = inputs["inputs_embeds"]

    def run(seed_fn):
        with lrp_kernels.patch(model, view="relevance"):
            x = emb.clone().requires_grad_()
            logits = model(inputs_embeds=x, attention_mask=inputs["attention_mask"], use_cache=False).logits
            logits.backward(seed_fn(logits.detach()))
            return x.grad

    def only(token, weight):
        def seed(y):
            r = torch.zeros_like(y)
            r[:, -1, token] = weight * y[:, -1, token]
            return r
        return seed
    r1, r2 = run(only(3, 1.0)), run(only(7, 1.0))
    both = run(lambda y: only(3, 0.5)(y) + only(7, -2.0)(y))
    assert torch.allclose(both, 0.5 * r1 - 2.0 * r2, rtol=1e-9, atol=1e-12)


def test_zero_output_with_relevance_is_not_lost():
    """An output that is exactly 0 but gets relevance passes it on (divided by epsilon, the
    stabiliser), never a silent zero or a NaN."""
    model, kind = build("llama")
    inputs = make_inputs(model, kind)
    with lrp_kernels.patch(model, view="relevance", epsilon=1e-6):
        x = inputs["inputs_embeds"].clone().requires_grad_()
        logits = model(inputs_embeds=x, attention_mask=inputs["attention_mask"], use_cache=False).logits
        zeroed = logits * torch.zeros_like(logits)  # exactly 0 everywhere, still on the graph
        out = logits + zeroed  # identity in value
        seed = torch.zeros_like(out)
        seed[0, -1, 5] = 1.0
        out.backward(seed)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_relevance_view_is_removed_completely_and_copies_unpatched():
    model, kind = build("llama")
    pre, post = dict(model._forward_pre_hooks), dict(model._forward_hooks)
    handle = lrp_kernels.patch(model, view="relevance")
    assert handle.view == "relevance" and "view='relevance'" in repr(handle)
    clone = copy.deepcopy(model)
    assert not clone._forward_pre_hooks and not clone._forward_hooks
    handle.remove()
    assert dict(model._forward_pre_hooks) == pre and dict(model._forward_hooks) == post
    inputs = make_inputs(model, kind)
    x = inputs["inputs_embeds"].clone().requires_grad_()
    logit = model(inputs_embeds=x, attention_mask=inputs["attention_mask"], use_cache=False).logits[0, -1, 0]
    g, = torch.autograd.grad(logit, x)
    assert torch.equal(g, torch.autograd.grad(
        model(inputs_embeds=x, attention_mask=inputs["attention_mask"], use_cache=False).logits[0, -1, 0], x)[0])


def test_explain_on_a_relevance_view_patch_matches_the_default():
    """explain() computes x * G itself: on a caller's relevance-view patch it still gives the
    numbers it gives without any patch of the caller's."""
    tok = task.build_tokenizer()
    model = tiny_llama(tok)
    prompt = "k4 17 ; k9 42 ; ? k9"
    want = lrp_kernels.explain(model, tok, prompt)
    with lrp_kernels.patch(model, view="relevance"):
        got = lrp_kernels.explain(model, tok, prompt)
    a, b = torch.as_tensor(got.relevance), torch.as_tensor(want.relevance)
    assert a.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_bad_view_is_named():
    model, _ = build("llama")
    with pytest.raises(ValueError, match="view must be one of"):
        lrp_kernels.patch(model, view="relevant")


def test_relevance_view_drop_in_on_a_gradient_view_output_is_refused():
    """LXT's quickstart applies ``lf.softmax(logits, -1, temperature=2)`` after the model: right
    under view="relevance", a silent mix of views under the default; that is an error naming
    both ways out."""
    import lrp_kernels.functional as lf
    import lrp_kernels.grad as lg
    model, kind = build("llama")
    inputs = make_inputs(model, kind)
    with lrp_kernels.patch(model):
        logits = model(**inputs).logits
        with pytest.raises(ValueError, match="grad.softmax.*view='relevance'"):
            lf.softmax(logits, -1, temperature=2.0)
        lg.softmax(logits, -1, temperature=2.0)  # the gradient-view twin is fine
    lf.softmax(logits, -1, temperature=2.0)  # the patch is gone: nothing left to mix with
    with lrp_kernels.patch(model, view="relevance"):
        x = inputs["inputs_embeds"].clone().requires_grad_()
        probs = lf.softmax(model(**dict(inputs, inputs_embeds=x)).logits, -1, temperature=2.0)
        top = probs[0, -1].max()
        top.backward(top)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
