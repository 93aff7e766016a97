"""Reliability findings in :func:`lrp_kernels.explain` and the heatmap writers: the caller's
gradients survive, empty / non-string prompts and degenerate targets are clear errors, a patched
model is neither re-patched nor mislabelled, every numeric argument is checked up front.

Tiny random models built from configs (no hub, no downloads).
"""
from __future__ import annotations

import math
import signal
import warnings

import pytest
import torch

import lrp_kernels
from lrp_kernels.explanations import heatmap as hm
from lrp_kernels.explanations import imaging as im
from lrp_kernels.explanations.api import ExplainError, PromptTooLongError, explain

from helpers.recall_task import tiny_llama_fixtures

TEXT = "k1 = 5 ; k2 = 7 ; ? k1 ="


tok, model = tiny_llama_fixtures(hidden=32, layers=1, heads=2)  # fixtures: tokenizer, tiny random Llama


@pytest.fixture
def alarm():
    """Fail instead of hanging (a heatmap writer used to loop forever)."""
    def handler(signum, frame):
        raise TimeoutError("did not return within 20 s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------- 2. gradients

@pytest.mark.parametrize("kwargs", [dict(rules="attnlrp"), dict(rules="gradient"),
                                    dict(rules="attnlrp", latent=True), dict(generate=2),
                                    dict(rules="gradient", continuation="5 ;")])
def test_explain_keeps_the_callers_gradients(model, tok, kwargs):
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    saved = [g.clone() for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    params[0].requires_grad_(False)  # a frozen embedding, as in fine-tuning setups
    flags = [p.requires_grad for p in params]
    try:
        explain(model, tok, TEXT, **kwargs)
        assert [p.requires_grad for p in params] == flags
        for p, g, s in zip(params, grads, saved):
            assert p.grad is g
            torch.testing.assert_close(p.grad, s, rtol=0, atol=0)
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(True)


def test_relevance_unchanged_by_existing_gradients(model, tok):
    ref = explain(model, tok, TEXT, rules="gradient").relevance
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    try:
        torch.testing.assert_close(explain(model, tok, TEXT, rules="gradient").relevance, ref)
    finally:
        for p in model.parameters():
            p.grad = None


# ---------------------------------------------------------------------------- 3. prompts

@pytest.mark.parametrize("prompt,match", [
    ("", r"prompt_or_prompts is an empty string"),
    ([TEXT, ""], r"prompt_or_prompts\[1\] is an empty string"),
    ("   ", r"no tokens"),  # word-level tokenizer: only <bos> would be left
    (None, r"prompt_or_prompts must be a string .* got NoneType"),
    (42, r"prompt_or_prompts must be a string .* got int"),
    ([TEXT, 3], r"prompt_or_prompts\[1\] is a int|prompt_or_prompts.*int"),
    ([], r"prompt_or_prompts must be a string or a non-empty list"),
])
def test_bad_prompts_name_the_argument(model, tok, prompt, match):
    with pytest.raises(ExplainError, match=match):
        explain(model, tok, prompt, rules="gradient")


@pytest.mark.parametrize("prompt", ["", None])
def test_bad_prompt_with_generate(model, tok, prompt):
    with pytest.raises(ExplainError, match="prompt_or_prompts"):
        explain(model, tok, prompt, generate=2, rules="gradient")


# ---------------------------------------------------------------------------- 4. patched models

def test_gradient_on_a_patched_model_is_refused(model, tok):
    handle = lrp_kernels.patch(model)
    try:
        with pytest.raises(ExplainError, match="patched"):
            explain(model, tok, TEXT, rules="gradient")
    finally:
        handle.remove()


def test_attnlrp_on_a_patched_model_uses_that_patch(model, tok):
    ref = explain(model, tok, TEXT)  # explain patches for the call
    handle = lrp_kernels.patch(model)
    try:
        exp = explain(model, tok, TEXT)  # no second patch (patch() would raise)
        torch.testing.assert_close(exp.relevance, ref.relevance)
        assert exp.rules == "attnlrp" and handle.active
        assert explain(model, tok, TEXT, epsilon=handle.epsilon).target.id == ref.target.id
        with pytest.raises(ExplainError, match="epsilon"):
            explain(model, tok, TEXT, epsilon=1e-2)
        with pytest.raises(ExplainError, match="rules"):
            explain(model, tok, TEXT, rules="cp-lrp")
    finally:
        handle.remove()
    # the model is unpatched again and explain patches it itself
    torch.testing.assert_close(explain(model, tok, TEXT).relevance, ref.relevance)


def test_patch_gets_exactly_the_options(model, tok, monkeypatch):
    from lrp_kernels.hf import patching

    calls = []
    real = patching.patch

    def recording(m, **kwargs):
        calls.append(kwargs)
        return real(m, **kwargs)
    monkeypatch.setattr(patching, "patch", recording)
    explain(model, tok, TEXT, rules="cp-lrp", epsilon=1e-4, backend="torch", strict=False)
    explain(model, tok, TEXT)
    assert calls == [dict(rules="cp-lrp", epsilon=1e-4, backend="torch", strict=False),
                     dict(rules="attnlrp", epsilon=lrp_kernels.DEFAULT_EPSILON, backend="auto",
                          strict=True)]


# ---------------------------------------------------------------------------- 5. heatmaps

TOKS, REL = ["a", " b", "\nc"], [1.0, -0.5, 0.25]


@pytest.mark.parametrize("call,name", [
    (lambda p: hm.png_heatmap(TOKS, REL, p, width_chars=0), "width_chars"),
    (lambda p: hm.png_heatmap(TOKS, REL, p, width_chars=-3), "width_chars"),
    (lambda p: hm.png_heatmap(TOKS, REL, p, width_chars=2.5), "width_chars"),
    (lambda p: hm.png_heatmap(TOKS, REL, p, width_chars=True), "width_chars"),
    (lambda p: hm.png_heatmap(TOKS, REL, p, dpi=0), "dpi"),
    (lambda p: hm.png_heatmap(TOKS, REL, p, dpi=float("nan")), "dpi"),
    (lambda p: hm.png_heatmap(TOKS, REL, p, scale=0), "scale"),
    (lambda p: hm.png_heatmap(TOKS, REL, p, scale=float("inf")), "scale"),
    (lambda p: hm.html_heatmap(TOKS, REL, scale=0), "scale"),
    (lambda p: hm.html_heatmap(TOKS, REL, scale=-1.0), "scale"),
    (lambda p: hm.html_heatmap(TOKS, REL, scale=float("nan")), "scale"),
    (lambda p: hm.tex_heatmap(TOKS, REL, scale=0), "scale"),
    (lambda p: hm.tex_heatmap(TOKS, REL, backend="lualatex"), "backend"),
    (lambda p: hm.pdf_heatmap(TOKS, REL, p, scale=-2), "scale"),
    (lambda p: im.imgify([[1.0, -1.0]], scale=0), "scale"),
    (lambda p: im.heatmap_grid([[1.0, -1.0]], pad=-1), "pad"),
    (lambda p: im.heatmap_grid([[1.0, -1.0]], grid=(0, 1)), "grid"),
    (lambda p: im.heatmap_grid([[1.0, -1.0]], grid=(1,)), "grid"),
    (lambda p: im.heatmap_grid([[1.0, -1.0]], vmin=-math.inf, vmax=1.0), "vmin"),
    (lambda p: im.heatmap_grid([[1.0, -1.0]], vmin=-1.0, vmax=math.nan), "vmax"),
    (lambda p: im.diverging_colors([0.0], vmin=math.nan, vmax=1.0), "vmin"),
])
def test_heatmap_numbers_checked_up_front(call, name, tmp_path, alarm):
    if "png" in repr(call.__code__.co_names):
        pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match=name):
        call(str(tmp_path / "h.png"))


def test_heatmap_scale_accepts_a_tensor(tmp_path):
    assert "lrp-tok" in hm.html_heatmap(TOKS, REL, scale=torch.tensor(2.0))


# ---------------------------------------------------------------------------- 6. degenerate

def test_contrast_equal_to_target_is_an_error(model, tok):
    predicted = explain(model, tok, TEXT, rules="gradient").target.id
    with pytest.raises(ExplainError, match="contrast .* is the target token itself"):
        explain(model, tok, TEXT, "5", contrast="5", rules="gradient")
    with pytest.raises(ExplainError, match="contrast .* is the target token itself"):
        explain(model, tok, TEXT, continuation="5", contrast="5", rules="gradient")
    with pytest.raises(ExplainError, match="is the predicted token"):
        explain(model, tok, TEXT, contrast=predicted, rules="gradient")
    # a foil that differs is fine, in a batch too
    other = (predicted + 1) % len(tok)
    exps = explain(model, tok, [TEXT, TEXT], [predicted, predicted], contrast=other,
                   rules="gradient")
    assert all(e.target.foil_id == other for e in exps)


def test_relevance_identically_zero_warns(tok):
    """Token embeddings all zero (GPT-2: the position embeddings still give a logit): every
    relevance is 0 while the explained logit is not -> a warning, never a silent zero."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2,
                                   n_positions=64, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        m.transformer.wte.weight.zero_()
    with pytest.warns(UserWarning, match="every relevance is exactly 0"):
        exp = explain(m, tok, TEXT, rules="gradient")
    assert exp.target.logit != 0 and not exp.relevance.any()


def test_unknown_pieces_checked_on_every_path(model, tok):
    with pytest.warns(UserWarning, match=r"does not know \['999'\]"):
        explain(model, tok, TEXT, continuation="5 999", rules="gradient")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        explain(model, tok, "k1 = 999 ; ? k1 =", generate=3, rules="gradient")
    unknown = [w for w in seen if "does not know" in str(w.message)]
    assert len(unknown) == 1  # once for the prompt, not once per generated token
    with pytest.raises(ExplainError, match="not a single token"):
        explain(model, tok, TEXT, "999", rules="gradient")
    with pytest.raises(ExplainError, match="contrast"):
        explain(model, tok, TEXT, contrast="999", rules="gradient")


# ---------------------------------------------------------------------------- 7. options

@pytest.mark.parametrize("eps", [0, 0.0, -1e-6, math.nan, math.inf, -math.inf, True, "1e-6"])
@pytest.mark.parametrize("rules", ["attnlrp", "gradient"])
def test_epsilon_must_be_finite_and_positive(model, tok, eps, rules):
    with pytest.raises(ExplainError, match="epsilon must be a finite number > 0"):
        explain(model, tok, TEXT, rules=rules, epsilon=eps)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_length=0), "max_length"),
    (dict(max_length=-3), "max_length"),
    (dict(max_length=2.5), "max_length"),
    (dict(rules="deeplift"), "rules must be one of"),
    (dict(strict="no"), "strict"),
    (dict(continuation=""), "continuation"),
])
def test_other_options_checked(model, tok, kwargs, match):
    with pytest.raises(ExplainError, match=match):
        explain(model, tok, TEXT, **kwargs)


def test_max_length_still_limits(model, tok):
    with pytest.raises(PromptTooLongError, match="limit of 3"):
        explain(model, tok, TEXT, rules="gradient", max_length=3)
