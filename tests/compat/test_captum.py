"""lrp_kernels.compat.captum on the shipped model: Captum's own wrappers and plots run AttnLRP.

References are lrp_kernels' own explanations, computed through a different route (``explain``
on each prefix text: its own patch, forward and backward):

* ``AttnLRP(model).attribute(ids, target=t)`` summed over the hidden dim equals
  ``explain(prompt, target=t)``;
* ``LLMAttnLRP``'s row ``k`` equals ``explain(prefix_k, target=token_k)`` on the prompt tokens;
* Captum's stock ``LLMGradientAttribution`` explains the log-probability; by linearity of the
  backward in its seed, ``R(log p_t) = R(logit_t) - sum_j p_j R(logit_j)``, computed here from
  one explanation per vocabulary entry (a batch of ``explain`` calls).
"""
import pytest
import torch

captum_attr = pytest.importorskip("captum.attr")

from lrp_kernels.compat.captum import AttnLRP, LLMAttnLRP  # noqa: E402
from lrp_kernels.explanations.api import ExplainError, explain  # noqa: E402
from helpers.shipped import load_shipped  # noqa: E402

PROMPT = "k4 17 ; k9 42 ; k2 8 ; k5 3 ; ? k9"


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


def close(actual, expected, rtol=1e-4):
    torch.testing.assert_close(actual, expected, rtol=rtol,
                               atol=rtol * float(expected.abs().max()))


def test_attribution_equals_explain(shipped):
    model, tok = shipped
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    lrp = AttnLRP(model)
    assert isinstance(lrp, captum_attr.GradientAttribution)
    for target in ("42", "17"):  # the answer and another token
        tid = tok.convert_tokens_to_ids(target)
        attr = lrp.attribute(ids, target=tid)
        assert attr.shape == (1, ids.shape[1], model.config.hidden_size)
        assert not attr.requires_grad
        close(attr.sum(-1)[0], explain(model, tok, PROMPT, target=target).relevance)


def test_llm_wrapper_rows_equal_explain_and_plots_run(shipped):
    import matplotlib
    matplotlib.use("Agg")
    model, tok = shipped
    llm = LLMAttnLRP(AttnLRP(model), tok)
    inp = captum_attr.TextTokenInput(PROMPT, tok, skip_tokens=[tok.bos_token_id])
    answer = " 42 ; k1"
    res = llm.attribute(inp, target=answer)
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    prompt_ids = tok(PROMPT)["input_ids"]
    assert res.token_attr.shape == (len(answer_ids), len(prompt_ids) - 1)  # <bos> skipped
    assert res.input_tokens == PROMPT.split() and res.output_tokens == answer.split()
    seq = prompt_ids + answer_ids
    for k, tid in enumerate(answer_ids):
        prefix = tok.decode(seq[1:len(prompt_ids) + k])
        ref = explain(model, tok, prefix, target=tid)
        close(res.token_attr[k], ref.relevance[1:len(prompt_ids)])
    close(res.seq_attr, res.token_attr.sum(0))
    fig, _ = res.plot_token_attr(show=False)
    assert fig is not None
    fig, _ = res.plot_seq_attr(show=False)
    assert fig is not None


def test_stock_llm_wrapper_explains_the_log_probability(shipped):
    model, tok = shipped
    stock = captum_attr.LLMGradientAttribution(AttnLRP(model), tok)
    res = stock.attribute(captum_attr.TextTokenInput(PROMPT, tok), target="17")  # not the answer
    vocab = len(tok)
    every = explain(model, tok, [PROMPT] * vocab, list(range(vocab)))
    rel = torch.stack([e.relevance for e in every])                    # [vocab, tokens]
    with torch.no_grad():
        p = torch.softmax(model(**tok(PROMPT, return_tensors="pt")).logits[0, -1].double(), -1)
    t = tok.convert_tokens_to_ids("17")
    expected = rel[t] - (p.float()[:, None] * rel).sum(0)
    assert float(p[t]) < 0.5  # a real log-probability, not ~0
    close(res.token_attr[0], expected, rtol=1e-3)


def test_bad_arguments(shipped):
    model, tok = shipped
    with pytest.raises(TypeError, match="model must be a Hugging Face model"):
        AttnLRP(lambda x: x)
    with pytest.raises(ExplainError, match="rules must be one of"):
        AttnLRP(model, rules="gradient")
    llm = LLMAttnLRP(model, tok)
    with pytest.raises(TypeError, match="takes no options"):
        llm.attribute(captum_attr.TextTokenInput(PROMPT, tok), target="42", n_steps=5)
