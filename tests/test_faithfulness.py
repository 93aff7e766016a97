"""Faithfulness evaluation (lrp_kernels.tools.faithfulness, ``lrp-kernels faithfulness``).

* a hand-built additive model whose target logit is a sum of per-token contributions, so every
  curve and every ABPC is derived by hand (in the test docstrings);
* the shipped recall model: AttnLRP > gradient x input > random in ABPC on 200 held-out
  prompts, each by more than 3 paired standard errors; curves start at the unperturbed score
  and every point matches an independent forward; MoRF / LeRF remove each token once;
* the random attribution is reproducible; bad input is an error naming the argument; the CLI.
"""
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lrp_kernels.cli import main
from lrp_kernels.tools.faithfulness import (FaithfulnessError, area, perturbation_curves,
                                            removal_counts)
from lrp_kernels.tools.recall_prompts import SHIPPED_MODEL, held_out_prompts

from helpers.recall_task import task
from helpers.shipped import load_shipped


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids OpenMP's fork/join per op, which dominates on a busy
    2-core machine (measured 10x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- hand-built case

CONTRIB = {"<bos>": 0.5, "k1": 3.0, "k2": 1.0, "k3": 2.0, "<unk>": 0.25}


class AdditiveLM(nn.Module):
    """Every position's logits are ``W @ (sum of the embeddings up to it)``, embeddings of width
    1 holding ``CONTRIB``; only the target row of ``W`` is non-zero (1). The target logit at the
    last position is the sum of the tokens' contributions, and gradient x input of a token is its
    contribution exactly."""

    def __init__(self, tok, target: str):
        super().__init__()
        self.embed = nn.Embedding(len(tok), 1)
        self.head = nn.Linear(1, len(tok), bias=False)
        with torch.no_grad():
            self.embed.weight.zero_()
            for token, value in CONTRIB.items():
                self.embed.weight[tok.convert_tokens_to_ids(token)] = value
            self.head.weight.zero_()
            self.head.weight[tok.convert_tokens_to_ids(target)] = 1.0

    def get_input_embeddings(self):
        return self.embed

    def forward(self, inputs_embeds=None, attention_mask=None, **_):
        return SimpleNamespace(logits=self.head(inputs_embeds.cumsum(1)))


@pytest.fixture(scope="module")
def tok():
    return task.build_tokenizer()


@pytest.fixture(scope="module")
def additive(tok):
    return AdditiveLM(tok, "k1")


def hand(additive, tok, **kw):
    r = perturbation_curves(additive, tok, ["k1 k2 k3"], ["gradxinput"], targets=["k1"], **kw)
    return r, r.curves["gradxinput"][0]


def test_hand_built_zero_removal(additive, tok):
    """Contributions k1 3, k2 1, k3 2 (<bos> 0.5 stays). MoRF removes k1, k3, k2: logits 6.5, 3.5,
    1.5, 0.5, normalised (y - 0.5) / 6 = 1, 1/2, 1/6, 0; LeRF removes k2, k3, k1: 6.5, 5.5, 3.5,
    0.5 -> 1, 5/6, 1/2, 0. Fractions 0, 1/3, 2/3, 1: A(MoRF) = 1/3 (1/2 + 1/2 + 1/6) = 7/18,
    A(LeRF) = 1/3 (1/2 + 5/6 + 1/2) = 11/18, ABPC = 4/18 = 2/9."""
    r, c = hand(additive, tok)
    assert c.relevance == [0.5, 3.0, 1.0, 2.0]          # gradient x input = contributions
    assert c.removable == [1, 2, 3] and c.counts == [0, 1, 2, 3]
    assert c.morf_order == [1, 3, 2] and c.lerf_order == [2, 3, 1]
    assert c.morf_raw == pytest.approx([6.5, 3.5, 1.5, 0.5], abs=1e-6)
    assert c.lerf_raw == pytest.approx([6.5, 5.5, 3.5, 0.5], abs=1e-6)
    assert c.morf == pytest.approx([1, 1 / 2, 1 / 6, 0], abs=1e-9)
    assert c.lerf == pytest.approx([1, 5 / 6, 1 / 2, 0], abs=1e-9)
    assert c.abpc == pytest.approx(2 / 9, abs=1e-9)
    assert r.abpc("gradxinput") == pytest.approx(2 / 9, abs=1e-9)
    s = r.summary()[0]
    assert s["area_morf"] == pytest.approx(7 / 18, abs=1e-9)
    assert s["area_lerf"] == pytest.approx(11 / 18, abs=1e-9)
    # in logits: 1/3 (1/2 (6.5 + 5.5) + ...) differences: (5.5 - 3.5) + (3.5 - 1.5) = 4 -> 4/3
    assert s["abpc_raw"] == pytest.approx(4 / 3, abs=1e-6)


def test_hand_built_replace_removal(additive, tok):
    """A removed token now contributes <unk>'s 0.25: MoRF 6.5, 3.75, 2, 1.25; LeRF 6.5, 5.75, 4,
    1.25; y_0 - y_S = 5.25. ABPC = 1/3 ((4.5 - 2.5) + (2.75 - 0.75)) / 5.25 = 16/63."""
    r, c = hand(additive, tok, removal="replace")
    assert r.baseline_token == "<unk>"
    assert c.morf_raw == pytest.approx([6.5, 3.75, 2.0, 1.25], abs=1e-6)
    assert c.lerf_raw == pytest.approx([6.5, 5.75, 4.0, 1.25], abs=1e-6)
    assert c.abpc == pytest.approx(16 / 63, abs=1e-9)
    _, same = hand(additive, tok, removal="replace", baseline_token="<unk>")
    assert same.morf_raw == c.morf_raw
    _, pad = hand(additive, tok, removal="replace", baseline_token="<pad>")  # contributes 0
    assert pad.abpc == pytest.approx(2 / 9, abs=1e-9)


def test_hand_built_steps(additive, tok):
    """steps=2 of N=3: k_j = floor(3 j / 2) = 0, 1, 3. MoRF 1, 1/2, 0 and LeRF 1, 5/6, 0 at
    fractions 0, 1/3, 1: A(MoRF) = 1/3 * 3/4 + 2/3 * 1/4 = 5/12, A(LeRF) = 1/3 * 11/12 + 2/3 *
    5/12 = 7/12, ABPC = 1/6. steps=1: both curves 1, 0 (ABPC 0); steps > N: one token a step."""
    _, c = hand(additive, tok, steps=2)
    assert c.counts == [0, 1, 3] and c.fractions == pytest.approx([0, 1 / 3, 1])
    assert c.abpc == pytest.approx(1 / 6, abs=1e-9)
    _, one = hand(additive, tok, steps=1)
    assert one.counts == [0, 3] and one.abpc == pytest.approx(0, abs=1e-12)
    _, many = hand(additive, tok, steps=50)
    assert many.counts == [0, 1, 2, 3] and many.abpc == pytest.approx(2 / 9, abs=1e-9)
    _, split = hand(additive, tok, forward_tokens=4)   # one sequence (4 tokens) per forward
    assert split.morf_raw == many.morf_raw and split.lerf_raw == many.lerf_raw


def test_hand_built_probability(additive, tok):
    """score="probability": the target's logit is y, every other logit 0 (123 tokens), so
    p = e^y / (e^y + 122); normalised and integrated as for logits."""
    _, c = hand(additive, tok, score="probability")
    p = [math.exp(y) / (math.exp(y) + len(tok) - 1) for y in (6.5, 3.5, 1.5, 0.5, 5.5, 3.5)]
    assert c.morf_raw == pytest.approx([p[0], p[1], p[2], p[3]], rel=1e-5)
    assert c.lerf_raw == pytest.approx([p[0], p[4], p[5], p[3]], rel=1e-5)
    x = [0, 1 / 3, 2 / 3, 1]
    norm = [(v - p[3]) / (p[0] - p[3]) for v in (p[0], p[4], p[5], p[3])], \
        [(v - p[3]) / (p[0] - p[3]) for v in (p[0], p[1], p[2], p[3])]
    assert c.abpc == pytest.approx(area(x, norm[0]) - area(x, norm[1]), rel=1e-5)


KEYS = [f"k{i}" for i in range(8)]


@settings(max_examples=25, deadline=None)
@given(contrib=st.lists(st.floats(-3, 3, allow_nan=False).map(lambda v: round(v, 2)),
                        min_size=8, max_size=8, unique=True),
       n_tokens=st.integers(1, 8), steps=st.one_of(st.none(), st.integers(1, 9)),
       removal=st.sampled_from(["zero", "replace"]))
def test_additive_models_against_sorted_contributions(tok, contrib, n_tokens, steps, removal):
    """Any additive model: gradient x input is each token's contribution, MoRF removes them in
    decreasing order, and the curves are partial sums of the sorted contributions (computed here
    with plain Python, no model). Removing the largest contributions first is the fastest way
    down, so gradient x input's MoRF curve lies on or below the random attribution's."""
    model = AdditiveLM(tok, "k0")
    unk = 0.25 if removal == "replace" else 0.0
    with torch.no_grad():
        for key, value in zip(KEYS, contrib):
            model.embed.weight[tok.convert_tokens_to_ids(key)] = value
    c = dict(zip(KEYS, contrib))
    words = KEYS[:n_tokens]
    total = 0.5 + sum(c[w] for w in words)
    assume(abs(sum(c[w] - unk for w in words)) > 1e-3)     # else no normalised curve
    r = perturbation_curves(model, tok, [" ".join(words)], ["gradxinput", "random"],
                            targets=["k0"], removal=removal, steps=steps, seed=1)
    g = r.curves["gradxinput"][0]
    counts = removal_counts(n_tokens, steps)
    for order, raw in ((sorted(words, key=lambda w: -c[w]), g.morf_raw),
                       (sorted(words, key=lambda w: c[w]), g.lerf_raw)):
        expected = [total - sum(c[w] - unk for w in order[:k]) for k in counts]
        assert raw == pytest.approx(expected, abs=1e-4)
    assert g.inverted == (expected[-1] > expected[0])
    rnd = r.curves["random"][0]
    assert all(a <= b + 1e-9 for a, b in zip(g.morf, rnd.morf))
    assert all(a >= b - 1e-9 for a, b in zip(g.lerf, rnd.lerf))
    assert r.abpc("gradxinput") >= r.abpc("random") - 1e-9


def test_removal_counts_remove_each_token_once():
    for n in range(1, 30):
        for steps in (None, 1, 2, 3, 7, n, n + 5):
            k = removal_counts(n, steps)
            assert k[0] == 0 and k[-1] == n and len(k) == min(steps or n, n) + 1
            assert all(b > a for a, b in zip(k, k[1:]))


def test_flat_prompts_are_left_out(tok):
    """A model whose target logit ignores the tokens: no normalised curve, an error when that is
    every prompt."""
    flat = AdditiveLM(tok, "k1")
    with torch.no_grad():
        flat.embed.weight.zero_()
    with pytest.raises(FaithfulnessError, match="unchanged"):
        perturbation_curves(flat, tok, ["k1 k2", "k3 k2"], ["random"])


def test_a_flat_prompt_is_skipped_with_a_warning(additive, tok):
    """k4 and k5 contribute 0: that prompt is left out, the other keeps its hand value 2/9."""
    with pytest.warns(UserWarning, match=r"1 of 2 prompt\(s\) left out"):
        r = perturbation_curves(additive, tok, ["k1 k2 k3", "k4 k5"], ["gradxinput"],
                                targets=["k1", "k1"])
    assert r.skipped == [1] and r.summary()[0]["prompts"] == 1
    assert r.abpc("gradxinput") == pytest.approx(2 / 9, abs=1e-9)


def test_non_finite_scores_are_an_error(tok):
    model = AdditiveLM(tok, "k1")
    with torch.no_grad():
        model.embed.weight[tok.pad_token_id] = float("inf")
    with pytest.raises(FaithfulnessError, match="non-finite target logit"):
        perturbation_curves(model, tok, ["k1 k2 k3"], ["random"], removal="replace",
                            baseline_token="<pad>")


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, needle", [
    (dict(methods=["attnlrp", "shap"]), "unknown method 'shap'"),
    (dict(methods=[]), "methods is empty"),
    (dict(methods=["random", "random"]), "twice"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=2.5), "steps must be a positive integer"),
    (dict(removal="blur"), "removal must be one of"),
    (dict(score="loss"), "score must be one of"),
    (dict(baseline_token="<unk>"), "only used with removal='replace'"),
    (dict(targets=["1", "2"]), "2 targets for 1 prompts"),
    (dict(seed="x"), "seed must be an integer"),
])
def test_bad_arguments(additive, tok, kw, needle):
    kw = dict(dict(methods=["random"]), **kw)
    with pytest.raises(FaithfulnessError, match=needle.replace("(", r"\(")):
        perturbation_curves(additive, tok, ["k1 k2"], **kw)


@pytest.mark.parametrize("prompts, needle", [([], "prompts is empty"), (["k1", "  "], "prompt 1")])
def test_bad_prompts(additive, tok, prompts, needle):
    with pytest.raises(FaithfulnessError, match=needle):
        perturbation_curves(additive, tok, prompts, ["random"])


# ----------------------------------------------------------------------------- shipped model

def test_held_out_prompts_match_the_training_script():
    """The package's generator draws what python/train_recall_model.py's make_prompt draws."""
    task.use_format_of(SHIPPED_MODEL)
    rng = random.Random(5)
    expected = [task.make_prompt(rng, rng.randint(2, task.MAX_PAIRS))["prompt"] for _ in range(50)]
    assert held_out_prompts(50, seed=5) == expected
    with pytest.raises(ValueError, match="n must be"):
        held_out_prompts(0)


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


@pytest.fixture(scope="module")
def held_out_result(shipped):
    model, tok = shipped
    return perturbation_curves(model, tok, held_out_prompts(200),
                               ["attnlrp", "gradxinput", "random"])


def test_shipped_model_ordering(held_out_result):
    """AttnLRP > gradient x input > random, each paired difference over the same 200 held-out
    prompts more than 3 standard errors (measured: 0.38 +- 0.03 and 0.16 +- 0.03)."""
    r = held_out_result
    assert r.skipped == [] and r.summary()[0]["prompts"] == 200
    for better, worse in (("attnlrp", "gradxinput"), ("gradxinput", "random")):
        d = r.difference(better, worse)
        assert d["mean"] > 3 * d["stderr"], (better, worse, d)
    assert abs(r.abpc("random")) < 3 * r.summary()[2]["abpc_stderr"]  # chance level: about 0


def _independent_score(model, token_ids, removed, target):
    """The target logit with the embeddings at ``removed`` zeroed, built without the module's
    row bookkeeping."""
    emb = model.get_input_embeddings().weight[torch.tensor(token_ids)].clone()
    emb[list(removed)] = 0.0
    with torch.no_grad():
        return float(model(inputs_embeds=emb[None], use_cache=False).logits[0, -1, target])


def test_shipped_curves_match_independent_forwards(shipped, held_out_result):
    """Every checked point equals a plain forward of the same removal; the curves start at the
    unperturbed logit (a forward of the token ids) and end with every removable token zeroed;
    both orders are permutations of the removable tokens sorted by relevance."""
    model, tok = shipped
    special = set(tok.all_special_ids)
    rng = random.Random(0)
    for i in range(0, 200, 25):
        for method in held_out_result.methods:
            c = held_out_result.curves[method][i]
            with torch.no_grad():
                y0 = float(model(torch.tensor([c.token_ids])).logits[0, -1, c.target_id])
            assert c.morf_raw[0] == pytest.approx(y0, abs=1e-4)
            assert c.lerf_raw[0] == c.morf_raw[0] and c.lerf_raw[-1] == c.morf_raw[-1]
            assert c.removable == [p for p, t in enumerate(c.token_ids) if t not in special]
            assert sorted(c.morf_order) == c.removable == sorted(c.lerf_order)
            rel = [c.relevance[p] for p in c.morf_order]
            assert rel == sorted(rel, reverse=True)
            assert [c.relevance[p] for p in c.lerf_order] == sorted(rel)
            assert c.morf_raw[-1] == pytest.approx(
                _independent_score(model, c.token_ids, c.removable, c.target_id), abs=1e-4)
            j = rng.randrange(1, len(c.counts) - 1)
            for order, raw in ((c.morf_order, c.morf_raw), (c.lerf_order, c.lerf_raw)):
                expected = _independent_score(model, c.token_ids, order[:c.counts[j]], c.target_id)
                assert raw[j] == pytest.approx(expected, abs=1e-4)


def test_random_is_seeded(shipped):
    model, tok = shipped
    prompts = held_out_prompts(4, seed=3)
    a, b, other = (perturbation_curves(model, tok, prompts, ["random"], seed=s, explain_batch=2)
                   for s in (7, 7, 8))
    assert [c.relevance for c in a.curves["random"]] == [c.relevance for c in b.curves["random"]]
    assert [c.morf_raw for c in a.curves["random"]] == [c.morf_raw for c in b.curves["random"]]
    assert [c.relevance for c in a.curves["random"]] != [c.relevance for c in other.curves["random"]]
    # the target is the model's prediction, the same whichever methods are asked for
    with_lrp = perturbation_curves(model, tok, prompts, ["attnlrp", "random"], seed=7)
    assert [c.relevance for c in with_lrp.curves["random"]] == [c.relevance for c in a.curves["random"]]
    assert [c.target_id for c in with_lrp.curves["attnlrp"]] == [c.target_id for c in a.curves["random"]]


# ----------------------------------------------------------------------------- CLI

def run_cli(capsys, *argv):
    code = main(["faithfulness", "--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_table_json_and_plot(capsys, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "k1 5 ; k4 8 ; ? k4", "target": "8"}\n\n'
                       '{"prompt": "k2 7 ; k9 3 ; k5 1 ; ? k2"}\n')
    png = tmp_path / "c.png"
    code, out, err = run_cli(capsys, "--prompts", str(prompts), "--methods", "attnlrp,gradient,random",
                             "--removal", "replace", "--plot", str(png))
    assert code == 0, err
    rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert [r["method"] for r in rows] == ["attnlrp", "gradxinput", "random"]
    assert all(r["prompts"] == 2 and r["removal"] == "replace" and r["baseline_token"] == "<unk>"
               for r in rows)
    assert out.splitlines()[0].split()[:3] == ["method", "prompts", "ABPC"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_default_held_out_prompts(capsys):
    code, out, err = run_cli(capsys, "--n", "3", "--methods", "random", "--steps", "4")
    assert code == 0, err
    row = json.loads(out.splitlines()[-1])
    assert row["prompts"] == 3 and row["steps"] == 4


@pytest.mark.parametrize("content, argv, needle", [
    ("", [], "has no prompts (it is empty)"),
    ("\n  \n", [], "has no prompts"),
    ('{"prompt": "k1 2 ; ? k1"}\n{"prompt": 3}\n', [], "line 2: expected an object"),
    ('{"prompt": "k1 2 ; ? k1"}\nnot json\n', [], "line 2: not valid JSON"),
    ("k1 2 ; ? k1\n", ["--methods", "attnlrp,shap"], "unknown method 'shap'"),
    ("k1 2 ; ? k1\n", ["--steps", "0"], "--steps: must be a positive integer"),
    ("k1 2 ; ? k1\n", ["--plot", "x.pdf"], "--plot must end in .png"),
    ("k1 2 ; ? k1\n", ["--baseline-token", "<unk>"], "only used with --removal replace"),
])
def test_cli_one_line_errors(capsys, tmp_path, content, argv, needle):
    path = tmp_path / ("p.jsonl" if content.startswith("{") or not content.strip() else "p.txt")
    path.write_text(content)
    code, out, err = run_cli(capsys, "--prompts", str(path), *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("lrp-kernels faithfulness: error:") and needle in lines[0], lines[0]


def test_cli_other_model_needs_prompts(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--model", str(tmp_path))
    assert code == 2 and "give --prompts FILE" in err and len(err.strip().splitlines()) == 1
