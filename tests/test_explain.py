"""lrp_kernels.explanations.api on a tiny random Llama built from a config (word-level tokenizer).

References are independent: plain autograd on the full-logit forward (gradient x input), and
linearity of the backward in its seed (continuation = sum of token explanations, contrast =
difference of two explanations), which holds for the AttnLRP gradient view too.
"""
import importlib.util
import json
import random

import pytest
import torch

from lrp_kernels.explanations.api import Explanation, ExplainError, PromptTooLongError, explain

from helpers.recall_task import task, tiny_llama_fixtures

HAS_PATCH = importlib.util.find_spec("lrp_kernels.hf.patching") is not None
RULES = ["gradient"] + (["attnlrp"] if HAS_PATCH else [])


tok, model = tiny_llama_fixtures()  # fixtures: the task's tokenizer, a tiny random Llama


def prompts(n, seed=0, max_pairs=5):
    rng = random.Random(seed)
    return [task.make_prompt(rng, rng.randint(1, max_pairs))["prompt"] for _ in range(n)]


def reference_gxi(model, tok, text, target_id):
    ids = tok(text, return_tensors="pt")["input_ids"]
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb).logits
    (g,) = torch.autograd.grad(logits[0, -1, target_id], emb)
    return (emb * g).sum(-1)[0].detach(), logits[0, -1].detach()


def test_gradient_x_input_matches_autograd(model, tok):
    for text in prompts(3, seed=1):
        exp = explain(model, tok, text, rules="gradient")
        ref, logits = reference_gxi(model, tok, text, int(logits_argmax(model, tok, text)))
        assert exp.target.id == int(logits.argmax())
        assert exp.target.logit == pytest.approx(float(logits.max()), rel=1e-5, abs=1e-5)
        p = torch.softmax(logits.double(), -1)[exp.target.id]
        assert exp.target.probability == pytest.approx(float(p), rel=1e-4)
        torch.testing.assert_close(exp.relevance, ref, rtol=1e-5, atol=1e-6)


def logits_argmax(model, tok, text):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits[0, -1].argmax()


def test_target_by_string_and_id(model, tok):
    text = prompts(1, seed=2)[0]
    by_str = explain(model, tok, text, "17", rules="gradient")
    by_id = explain(model, tok, text, tok.convert_tokens_to_ids("17"), rules="gradient")
    assert by_str.target.text == "17" and by_str.target.id == by_id.target.id
    torch.testing.assert_close(by_str.relevance, by_id.relevance)
    ref, _ = reference_gxi(model, tok, text, by_id.target.id)
    torch.testing.assert_close(by_str.relevance, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rules", RULES)
def test_batch_equals_single_and_padding_is_zero(model, tok, rules):
    texts = prompts(4, seed=3)
    assert len({len(t.split()) for t in texts}) > 1  # really padded
    batch = explain(model, tok, texts, rules=rules)
    for text, b in zip(texts, batch):
        s = explain(model, tok, text, rules=rules)
        assert b.tokens == s.tokens and b.target.id == s.target.id
        torch.testing.assert_close(b.relevance, s.relevance, rtol=1e-4, atol=1e-5)
        # raw relevance that reached the padding (before the mask): none, up to rounding
        assert b.meta["padding_relevance"] <= 1e-6 * float(b.relevance.abs().sum())
    # per-prompt targets
    batch_t = explain(model, tok, texts, ["3", "4", "5", "6"], rules=rules)
    assert [b.target.text for b in batch_t] == ["3", "4", "5", "6"]


@pytest.mark.parametrize("rules", RULES)
def test_continuation_is_sum_of_token_explanations(model, tok, rules):
    text = prompts(1, seed=4)[0]
    cont = "12 ; ? k3"
    exp = explain(model, tok, text, continuation=cont, rules=rules)
    words = cont.split()
    n_prompt = len(tok(text)["input_ids"])
    assert len(exp) == n_prompt + len(words) - 1
    total = torch.zeros(len(exp))
    logit_sum, logp_sum = 0.0, 0.0
    for j, w in enumerate(words):
        prefix = " ".join([text] + words[:j])
        e = explain(model, tok, prefix, w, rules=rules)
        total[:len(e)] += e.relevance
        logit_sum += e.target.logit
        logp_sum += torch.log(torch.tensor(e.target.probability, dtype=torch.float64))
    torch.testing.assert_close(exp.relevance, total, rtol=1e-4, atol=1e-5)
    assert exp.target.logit == pytest.approx(logit_sum, rel=1e-5, abs=1e-5)
    assert exp.target.probability == pytest.approx(float(logp_sum.exp()), rel=1e-4)
    assert exp.target.text == cont
    assert "".join(exp.tokens[n_prompt:]) == " 12 ; ?"


@pytest.mark.parametrize("rules", RULES)
def test_contrast_is_difference(model, tok, rules):
    text = prompts(1, seed=5)[0]
    a = explain(model, tok, text, "7", rules=rules)
    b = explain(model, tok, text, "9", rules=rules)
    c = explain(model, tok, text, "7", contrast="9", rules=rules)
    torch.testing.assert_close(c.relevance, a.relevance - b.relevance, rtol=1e-4, atol=1e-5)
    assert c.target.logit == pytest.approx(a.target.logit - b.target.logit, abs=1e-5)
    assert c.target.foil_text == "9"


def test_generation_matches_greedy_decoding(model, tok):
    text = prompts(1, seed=6)[0]
    seen = []
    exps = explain(model, tok, text, generate=3, rules="gradient",
                   progress=lambda d, n: seen.append((d, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(3):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    gen = ids[0, -3:].tolist()
    assert [e.target.id for e in exps] == gen
    n = len(tok(text)["input_ids"])
    assert [len(e) for e in exps] == [n, n + 1, n + 2]
    ref, _ = reference_gxi(model, tok, tok.decode(ids[0, 1:-1]), gen[2])
    torch.testing.assert_close(exps[2].relevance, ref, rtol=1e-5, atol=1e-6)


def test_display_tokens_concatenate_to_prompt(model, tok):
    text = "k1 = 5 ;  k2 = 7 ; ? k1 ="
    exp = explain(model, tok, text, rules="gradient")
    assert exp.tokens[0] == "<bos>"
    assert "".join(exp.tokens[1:]) == text


@pytest.mark.parametrize("rules", RULES)
def test_latent_relevance(model, tok, rules):
    exp = explain(model, tok, prompts(1, seed=7)[0], rules=rules, latent=True)
    layers = model.config.num_hidden_layers
    assert exp.latent.shape == (layers + 1, len(exp))
    torch.testing.assert_close(exp.latent[0], exp.relevance, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rules", RULES)
def test_model_left_clean(model, tok, rules):
    text = prompts(1, seed=8)[0]
    with torch.no_grad():
        before = model(**tok(text, return_tensors="pt")).logits
    explain(model, tok, text, rules=rules)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        after = model(**tok(text, return_tensors="pt")).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    ref, _ = reference_gxi(model, tok, text, 5)  # plain gradients again after the call
    torch.testing.assert_close(explain(model, tok, text, 5, rules="gradient").relevance, ref)


def test_bad_inputs(model, tok):
    text = "k1 = 5 ; ? k1 ="
    with pytest.raises(ExplainError, match="'zzz' is not a single token"):
        explain(model, tok, text, "zzz", rules="gradient")
    with pytest.raises(ExplainError, match="2 tokens"):
        explain(model, tok, text, "5 ;", rules="gradient")
    with pytest.raises(ExplainError, match="outside the vocabulary"):
        explain(model, tok, text, 10_000, rules="gradient")
    with pytest.raises(ExplainError, match="contrast"):
        explain(model, tok, text, contrast="nope", rules="gradient")
    with pytest.raises(PromptTooLongError, match="more than the limit of 5"):
        explain(model, tok, text, rules="gradient", max_length=5)
    long = " ".join(["k1 = 5 ;"] * 20)  # 81 tokens > the context of 64
    with pytest.raises(PromptTooLongError, match="81 tokens"):
        explain(model, tok, long, rules="gradient")
    with pytest.raises(ExplainError, match="either target"):
        explain(model, tok, text, "5", continuation="5", rules="gradient")
    with pytest.raises(ExplainError, match="non-empty list"):
        explain(model, tok, [], rules="gradient")
    with pytest.raises(ExplainError, match="2 targets for 1"):
        explain(model, tok, [text], ["1", "2"], rules="gradient")
    with pytest.raises(ExplainError, match="generate"):
        explain(model, tok, text, generate=0, rules="gradient")
    with pytest.warns(UserWarning, match=r"does not know \['999'\]"):
        explain(model, tok, "k1 = 999 ; ? k1 =", rules="gradient")
    with pytest.raises(ExplainError, match="epsilon"):
        explain(model, tok, text, epsilon=-1.0)


def test_outputs(model, tok, tmp_path):
    exp = explain(model, tok, "k1 = 5 ; ? k1 =", rules="gradient")
    d = json.loads(exp.to_json(str(tmp_path / "e.json")))
    assert d["tokens"] == exp.tokens and len(d["relevance"]) == len(exp)
    assert json.load(open(tmp_path / "e.json"))["target"]["text"] == exp.target.text
    assert exp.save(str(tmp_path / "e.html")) == str(tmp_path / "e.html")
    assert open(tmp_path / "e.html", encoding="utf-8").read().count('class="lrp-tok"') == len(exp)
    with pytest.raises(ExplainError, match=".html, .pdf, .png or .json"):
        exp.save(str(tmp_path / "e.txt"))
    top = exp.top(2, absolute=True)
    assert abs(top[0][2]) >= abs(top[1][2]) and isinstance(exp, Explanation)


def test_display_tokens_byte_level_bpe():
    """Byte-level BPE (Ġ / Ċ pieces): display tokens keep spaces, newlines and non-ASCII."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["def f(x):\n    return x * 2\n", "Grüße aus Köln, 42 €", "the cat sat on the mat"] * 5
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", padding_side="left")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, max_position_embeddings=128)).eval()
    text = "def g(y):\n    return  y * 3 €\n"
    exp = explain(model, tok, text, rules="gradient")
    assert "".join(exp.tokens) == text
    raw = tok.convert_ids_to_tokens(tok(text)["input_ids"])
    assert any("\u0120" in t or "\u010a" in t for t in raw)  # really byte-level pieces
    gen = explain(model, tok, text, generate=2, rules="gradient")
    assert gen[1].tokens[:len(exp.tokens)] == exp.tokens
