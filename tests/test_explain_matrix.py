"""lrp_kernels.explanations.matrix.explain_matrix: the relevance matrix of a continuation.

The reference of every row is independent of the one-pass path: ``explain`` on the row's
prefix *text* (its own tokenization, its own forward over the prefix only, its own backward).
Causal masking makes the logit at a position of the full forward the prefix forward's logit,
so the rows agree up to the rounding of GEMMs of other shapes; tolerances per dtype (relative
to the row's largest entry): float64 1e-9, float32 1e-4, bfloat16 5e-2 (the forward itself
rounds to 8 bits of mantissa, and blocking differs between the two forward lengths).
"""
import pytest
import torch
import transformers as tr
from hypothesis import given, strategies as st

import lrp_kernels
from lrp_kernels.explanations.api import ExplainError, PromptTooLongError, explain
from lrp_kernels.explanations.matrix import RelevanceMatrix, explain_matrix

from helpers.recall_task import task, tiny_llama
from helpers.shipped import load_shipped

TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}
PROMPT = "k4 17 ; k9 42 ; k2 8 ; k5 3 ; ? k9"


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


@pytest.fixture(scope="module")
def tok():
    return task.build_tokenizer()


def tiny_qwen2(tok, std=0.2):
    """A random Qwen2 (q/k/v biases, GQA) of the task's vocabulary, weights N(0, std)."""
    torch.manual_seed(0)
    cfg = tr.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    model = tr.Qwen2ForCausalLM(cfg).eval()
    for p in model.parameters():
        p.data.normal_(0, std)
    return model


def row_reference(model, tok, seq, pos, tid, rules):
    """``explain`` of token ``tid`` given the text of ``seq[:pos]`` (re-tokenized: checked)."""
    special = set(tok.all_special_ids)
    text = tok.decode([t for t in seq[:pos] if t not in special])
    assert tok(text)["input_ids"] == seq[:pos], "the prefix text must re-tokenize to the prefix"
    return explain(model, tok, text, target=tid, rules=rules)


def assert_rows_match(m: RelevanceMatrix, model, tok, rules, dtype=torch.float32):
    p0 = m.prompt_length
    assert m.relevance.shape == (m.continuation_length, len(m.token_ids))
    for k in range(m.continuation_length):
        pos = p0 + k
        ref = row_reference(model, tok, m.token_ids, pos, m.token_ids[pos], rules)
        scale = float(ref.relevance.abs().max())
        assert scale > 0
        torch.testing.assert_close(m.row(k)[:pos], ref.relevance, rtol=TOL[dtype],
                                   atol=TOL[dtype] * scale)
        assert float(m.target_logits[k]) == pytest.approx(ref.target.logit, rel=TOL[dtype],
                                                          abs=TOL[dtype])
        assert float(m.target_probabilities[k]) == pytest.approx(ref.target.probability,
                                                                 rel=10 * TOL[dtype], abs=TOL[dtype])
        # at and after the row's own token: exactly 0 (and nothing leaked there before clearing)
        assert torch.count_nonzero(m.row(k)[pos:]) == 0
    assert m.meta["future_relevance"] <= 1e-6 * float(m.relevance.abs().max())


class CountCalls:
    """Counts model forwards (a pre-hook) and ``torch.autograd.grad`` calls while active."""

    def __init__(self, model, monkeypatch):
        self.forwards, self.backwards = 0, 0
        grad = torch.autograd.grad

        def counted(*a, **kw):
            self.backwards += 1
            return grad(*a, **kw)
        monkeypatch.setattr(torch.autograd, "grad", counted)
        self.handle = model.register_forward_pre_hook(lambda *_: self._fwd())

    def _fwd(self):
        self.forwards += 1


# ----------------------------------------------------------------------------- equality

def test_shipped_generation_rows_equal_single_explanations(shipped, monkeypatch):
    model, tok = shipped
    calls = CountCalls(model, monkeypatch)
    m = explain_matrix(model, tok, PROMPT, generate=4)
    calls.handle.remove()
    monkeypatch.undo()
    k = m.continuation_length
    assert k == 4 and m.token_ids[m.prompt_length] == tok.convert_tokens_to_ids("42")
    # greedy decoding forwards (the prompt, then one token each with the cache), then exactly
    # one forward over the whole sequence and one input-only backward per row
    assert calls.forwards == k + 1 and calls.backwards == k
    assert not m.meta["batched_backward"]
    assert_rows_match(m, model, tok, "attnlrp")


def test_shipped_generation_is_greedy_decoding(shipped):
    model, tok = shipped
    m = explain_matrix(model, tok, PROMPT, generate=5)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # no cache, no patch: an independent greedy decoding
        for _ in range(5):
            ids = torch.cat([ids, model(input_ids=ids).logits[0, -1].argmax().view(1, 1)], 1)
    assert m.token_ids == ids[0].tolist()


@pytest.mark.parametrize("family, dtype", [("llama", torch.float32), ("llama", torch.float64),
                                           ("llama", torch.bfloat16), ("qwen2", torch.float32),
                                           ("qwen2", torch.bfloat16)])
def test_random_families_continuation_rows(tok, family, dtype):
    model = (tiny_llama(tok, hidden=32, layers=2, heads=2) if family == "llama"
             else tiny_qwen2(tok)).to(dtype)
    m = explain_matrix(model, tok, "k1 5 ; k3 9 ; ? k3", continuation=" 9 ; k7 2")
    assert m.continuation_length == 4 and m.relevance.dtype == torch.float32
    assert_rows_match(m, model, tok, "attnlrp", dtype)


@pytest.mark.parametrize("budget", [None, 1.0])
def test_gradient_rules_batched_cotangents(tok, monkeypatch, budget):
    """rules='gradient': plain autograd supports vmap, so rows share batched backwards
    (``memory_budget`` of 1 byte: one row per backward, still the batched path)."""
    model = tiny_llama(tok, hidden=32, layers=2, heads=2)
    calls = CountCalls(model, monkeypatch)
    m = explain_matrix(model, tok, "k1 5 ; k3 9 ; ? k3", continuation=" 9 ; k7 2 ;",
                       rules="gradient", memory_budget=budget)
    calls.handle.remove()
    monkeypatch.undo()
    assert m.meta["batched_backward"]
    assert calls.forwards == 1 and calls.backwards == (1 if budget is None else 5)
    assert_rows_match(m, model, tok, "gradient")


@pytest.fixture(scope="module")
def tiny(tok):
    return tiny_llama(tok, hidden=32, layers=2, heads=2)


WORDS = st.sampled_from(["k1", "k2", "k3", "5", "9", "12", ";", "?"])


@given(prompt=st.lists(WORDS, min_size=1, max_size=8), answer=st.lists(WORDS, min_size=1,
                                                                        max_size=5))
def test_rows_sum_to_the_continuation_explanation(tok, tiny, prompt, answer):
    """Invariant (the backward is linear in its seed): the matrix rows summed are
    ``explain(continuation=...)``'s relevance for the sum of the answer's logits, a path with
    one backward of a different seed; and each row's logit is the continuation's term."""
    text, cont = " ".join(prompt), " " + " ".join(answer)
    m = explain_matrix(tiny, tok, text, continuation=cont)
    whole = explain(tiny, tok, text, continuation=cont)
    total = m.relevance.sum(0)
    assert float(total[-1]) == 0  # the last answer token is only predicted, never an input
    scale = float(whole.relevance.abs().max())
    torch.testing.assert_close(total[:-1], whole.relevance, rtol=1e-4, atol=1e-4 * scale)
    assert float(m.target_logits.sum()) == pytest.approx(whole.target.logit, rel=1e-4, abs=1e-4)


def test_explain_generate_uses_the_rows(shipped, monkeypatch):
    model, tok = shipped
    seen = []
    calls = CountCalls(model, monkeypatch)
    exps = explain(model, tok, PROMPT, generate=3, progress=lambda d, n: seen.append((d, n)))
    calls.handle.remove()
    monkeypatch.undo()
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert calls.forwards == 3 + 1 and calls.backwards == 3  # 3 decoding steps, 1 graph forward
    m = explain_matrix(model, tok, PROMPT, generate=3)
    for k, e in enumerate(exps):
        pos = m.prompt_length + k
        assert e.token_ids == m.token_ids[:pos] and e.tokens == m.tokens[:pos]
        assert e.target.id == m.token_ids[pos] and e.meta["generation_step"] == k
        torch.testing.assert_close(e.relevance, m.row(k)[:pos], rtol=0, atol=0)


def test_latent_with_generate(shipped):
    """Hidden-state relevance of each generated token: the embedding row is the token
    relevance, and each row equals the single explanation's latent."""
    model, tok = shipped
    exps = explain(model, tok, PROMPT, generate=2, latent=True)
    for e in exps:
        ref = row_reference(model, tok, e.token_ids + [e.target.id], len(e.token_ids),
                            e.target.id, "attnlrp")
        ref_lat = explain(model, tok, tok.decode(e.token_ids[1:]), target=e.target.id,
                          latent=True).latent
        assert e.latent.shape == ref_lat.shape
        scale = float(ref_lat.abs().max())
        torch.testing.assert_close(e.latent, ref_lat, rtol=1e-4, atol=1e-4 * scale)
        torch.testing.assert_close(e.latent[0], ref.relevance, rtol=1e-4, atol=1e-4 * scale)


# ----------------------------------------------------------------------------- the result

def test_text_offsets_and_tokens(shipped):
    model, tok = shipped
    m = explain_matrix(model, tok, PROMPT, continuation=" 42 ;")
    assert m.text == PROMPT + " 42 ;" and m.meta["source"] == "continuation"
    assert len(m.offsets) == len(m.tokens) == len(m.token_ids)
    for i, (a, b) in enumerate(m.offsets):
        if i == 0:
            assert a == b  # <bos> covers no text
            continue
        assert m.text[a:b] == m.tokens[i].strip()
    assert m.tokens[m.prompt_length:] == [" 42", " ;"]
    d = m.to_dict()
    assert len(d["relevance"]) == 2 and d["prompt_length"] == m.prompt_length


def test_parameters_left_as_they_were(shipped):
    model, tok = shipped
    w = model.get_input_embeddings().weight
    flags = [p.requires_grad for p in model.parameters()]
    grad = torch.ones_like(w)
    w.grad = grad
    explain_matrix(model, tok, PROMPT, generate=2)
    assert [p.requires_grad for p in model.parameters()] == flags and w.grad is grad
    w.grad = None
    assert lrp_kernels.explanations.api._active_patch(model) is None


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one of continuation"),
    (dict(continuation="42", generate=2), "exactly one of continuation"),
    (dict(generate=0), "generate must be"),
    (dict(generate=True), "generate must be"),
    (dict(continuation=""), "continuation must be"),
    (dict(generate=2, memory_budget=-1), "memory_budget"),
    (dict(generate=2, progress=3), "progress"),
    (dict(generate=2, rules="nope"), "rules"),
    (dict(generate=2, epsilon=0), "epsilon"),
])
def test_bad_arguments(shipped, kwargs, match):
    model, tok = shipped
    with pytest.raises(ExplainError, match=match):
        explain_matrix(model, tok, PROMPT, **kwargs)


def test_bad_prompt_and_too_long(shipped):
    model, tok = shipped
    with pytest.raises(ExplainError, match="prompt must be a string"):
        explain_matrix(model, tok, [PROMPT], generate=1)
    with pytest.raises(ExplainError, match="prompt is an empty string"):
        explain_matrix(model, tok, "", generate=1)
    n = len(tok(PROMPT)["input_ids"])
    with pytest.raises(PromptTooLongError, match="limit of 64"):
        explain_matrix(model, tok, PROMPT, generate=64 - n + 2)
    with pytest.raises(PromptTooLongError, match="limit of 12"):
        explain_matrix(model, tok, PROMPT, continuation=" 42 ; k1", max_length=12)
