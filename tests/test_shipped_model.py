"""The shipped recall-llama model: loads offline, solves its task, and AttnLRP points at the
span that holds the answer (the attribution ground truth of this project).

The expected answer and span come from each prompt itself (tests/helpers/recall.py: the value
paired with the queried key), never from a stored string or from the generator's own answer.
Span definition (python/train_recall_model.py: answer_span_hit): among the context tokens (the
``kX V ;`` pairs, without ``<bos>`` and the query ``? kQ``), the token with the largest
relevance is one of the two tokens of the queried pair ``kQ V``.
"""
import json
import os
import random

import pytest
import torch

from lrp_kernels.cli.explain import SHIPPED_MODEL
from lrp_kernels.explanations.api import explain

from helpers import recall
from helpers.recall_task import task
from helpers.shipped import load_shipped

task.use_format_of(SHIPPED_MODEL)
HELD_OUT_SEED = 20261127  # not a training seed (training streams: seed, seed + 1, seed + 2)


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


def metadata():
    with open(os.path.join(SHIPPED_MODEL, "metadata.json")) as f:
        return json.load(f)


def held_out(n, seed=HELD_OUT_SEED, pairs=None):
    """Held-out prompts, each as the example dict the span metrics read, with the answer and the
    span derived from the prompt text alone."""
    rng = random.Random(seed)
    return [recall.as_example(task.make_prompt(rng, pairs or rng.randint(2, task.MAX_PAIRS))["prompt"])
            for _ in range(n)]


def test_prompt_parser_reads_the_task():
    """The parser finds the value paired with the queried key: on the model's own documented
    example (metadata.json, ``prompt  ->  answer``), on prompts whose queried pair moves, and it
    agrees with the task generator on held-out prompts."""
    prompt, expected = (part.strip() for part in metadata()["example"].split("->"))
    assert recall.answer(prompt) == expected
    assert recall.answer("k4 17 ; k9 42 ; k2 8 ; ? k9") == "42"
    assert recall.answer("k4 17 ; k9 42 ; k2 8 ; ? k4") == "17"
    p = recall.parse("k4 = 17 ; k9 = 42 ; ? k9 =")  # the "eq" format
    assert (p.answer, p.span_words, p.context_words) == ("42", [4, 5, 6], 8)
    rng = random.Random(HELD_OUT_SEED + 4)
    for _ in range(50):
        ex = task.make_prompt(rng, rng.randint(1, task.MAX_PAIRS))
        p = recall.parse(ex["prompt"])
        assert (p.answer, p.pairs, p.span_words) == (ex["answer"], ex["pairs"], ex["span_words"])
    for bad in ("k1 2 ; k3 4", "k1 2 ; k1 3 ; ? k1", "k1 2 ; ? k5", "k1 ; ? k1"):
        with pytest.raises(ValueError):
            recall.parse(bad)


def test_assets_complete_and_small():
    files = os.listdir(SHIPPED_MODEL)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "metadata.json", "README.md"):
        assert name in files, name
    size = sum(os.path.getsize(os.path.join(SHIPPED_MODEL, f)) for f in files)
    assert size < 10 * 2**20
    meta = metadata()
    assert meta["heldout_accuracy"] >= 0.95 and "command" in meta and "seed" in meta


def test_tokenizer_roundtrip(shipped):
    _, tok = shipped
    ex = held_out(1)[0]
    ids = tok(ex["prompt"])["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>"] + ex["prompt"].split()
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"


def test_model_solves_recall(shipped):
    model, tok = shipped
    exs = held_out(200, seed=HELD_OUT_SEED + 1)
    enc = tok([e["prompt"] for e in exs], return_tensors="pt", padding=True)
    with torch.no_grad():
        pred = model(**enc).logits[:, -1].argmax(-1)
    expected = [recall.answer(e["prompt"]) for e in exs]  # the value paired with the queried key
    acc = sum(p == want for p, want in zip(tok.convert_ids_to_tokens(pred.tolist()), expected)) / len(exs)
    assert acc >= 0.95, acc


@pytest.mark.parametrize("rules", ["attnlrp"])
def test_relevance_points_at_answer_span(shipped, rules):
    model, tok = shipped
    exs = held_out(100)
    exps = explain(model, tok, [e["prompt"] for e in exs], rules=rules)
    hits = [task.answer_span_hit(x.relevance, e) for x, e in zip(exps, exs)]
    rate = sum(hits) / len(hits)
    assert rate >= 0.90, f"{rules}: answer span is the top context region in {rate:.0%} of prompts"
    # the explained token is the model's answer; the value token of the span is positive
    correct = [x.target.text == recall.answer(e["prompt"]) for x, e in zip(exps, exs)]
    assert sum(correct) >= 95
    pos = [float(x.relevance[1 + e["span_words"][-1]]) > 0 for x, e in zip(exps, exs)]
    assert sum(pos) >= 90


def test_cli_default_model_writes_heatmap(tmp_path, capsys):
    """The model's documented example prompt (metadata.json): the explained target is the value
    paired with the queried key, one heatmap token per prompt word plus ``<bos>``."""
    from lrp_kernels.cli import main
    prompt = metadata()["example"].split("->")[0].strip()
    out = tmp_path / "heatmap.html"
    code = main(["explain", prompt, "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0
    assert f"target '{recall.answer(prompt)}'" in text
    assert out.read_text(encoding="utf-8").count('class="lrp-tok"') == 1 + len(prompt.split())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_gpu_backends_agree_and_point_at_span(shipped, dtype, tol):
    """On CUDA: the triton backend gives the torch backend's relevance (norm-wise relative
    error <= tol for the dtype) and the same hit rate."""
    import copy
    model, tok = shipped
    gpu = copy.deepcopy(model).to("cuda", dtype)
    exs = held_out(64, seed=HELD_OUT_SEED + 2)
    texts = [e["prompt"] for e in exs]
    ref = explain(gpu, tok, texts, backend="torch")
    fast = explain(gpu, tok, texts, backend="triton")
    for a, b in zip(ref, fast):
        assert a.target.id == b.target.id
        err = float((a.relevance - b.relevance).norm() / a.relevance.norm())
        assert err <= tol, err
    rate = sum(task.answer_span_hit(x.relevance, e) for x, e in zip(fast, exs)) / len(exs)
    assert rate >= 0.90


@pytest.mark.parametrize("rules", ["attnlrp", "cp-lrp"])
def test_explain_equals_manual_patch_recipe(shipped, rules):
    """explain() == the documented G-view recipe written out by hand with lrp_kernels.hf.patching
    (full logits, no padding), and differs from plain gradient x input."""
    import lrp_kernels
    model, tok = shipped
    text = held_out(1, seed=HELD_OUT_SEED + 3, pairs=6)[0]["prompt"]
    ids = tok(text, return_tensors="pt")["input_ids"]
    with lrp_kernels.patch(model, rules=rules):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, use_cache=False).logits
        logits[0, -1].max().backward()
    manual = (emb * emb.grad).sum(-1)[0].detach()
    exp = explain(model, tok, text, rules=rules)
    torch.testing.assert_close(exp.relevance, manual, rtol=1e-4, atol=1e-5)
    gxi = explain(model, tok, text, rules="gradient")
    assert float((gxi.relevance - manual).norm()) > 1e-3 * float(manual.norm())
