"""The interactive viewer (lrp_kernels.explanations.viewer): structure and data checked with
Python's HTML parser (CI), behaviour in headless Chromium where it is installed (skipped
otherwise): a click on an answer token recolours the context with that row's relevance.

The data checks decode the embedded JSON here, independently of the viewer's code: base64 of
int8 ``q = round(127 r / scale)`` per row, ``scale = max |r|``, so every decoded value lies
within ``scale / 254`` of the exact relevance.
"""
import json
import os
import re
import subprocess

import pytest

from lrp_kernels.explanations import sources as S
from lrp_kernels.explanations import viewer as V

from helpers.matrices import make_matrix
from helpers.viewer_page import decode, parse

CHROMIUM = "/usr/bin/chromium"
IDS = ("lrp-title", "lrp-answer", "lrp-legend", "lrp-lo", "lrp-hi", "lrp-status", "lrp-context",
       "lrp-sources", "lrp-data")


def rag_report(seed=0):
    sp = S.build_prompt(["Red apples grow. They are sweet.", "Blue skies.", "Green grass."],
                        "What is sweet?")
    pieces, at = [], 0
    for a, b in S.split_words(sp.prompt):
        pieces.append(sp.prompt[at:b])
        at = b
    m = make_matrix(pieces, [" Apples", " are", " sweet", ".", " Yes", "."], seed=seed)
    return S.attribute_sources(m, sp, level="sentence"), m


def test_structure_and_data_round_trip():
    report, m = rag_report()
    doc = V.viewer_html(report, title="demo <b>")
    page, data = parse(doc)
    assert set(IDS) <= page.ids
    assert "<title>demo &lt;b&gt;</title>" in doc
    assert data["tokens"] == m.tokens and data["prompt_length"] == m.prompt_length
    p = m.prompt_length
    assert len(data["rows"]) == m.continuation_length
    for k, entry in enumerate(data["rows"]):
        exact = m.relevance[k].double()
        got = decode(entry)
        assert len(got) == p + k                        # only the entries before the row's position
        assert entry["scale"] == pytest.approx(float(exact.abs().max()))
        assert (got - exact[:p + k]).abs().max() <= entry["scale"] / 254 + 1e-9
        assert not exact[p + k:].any()                   # what is left out is 0 by the contract
    for entry, s in zip(data["sentences"], report.sentences):
        assert entry["rows"] == s.sentence.rows and entry["text"] == s.sentence.text
        exact = m.relevance[s.sentence.rows].double().sum(0)[:p + max(s.sentence.rows)]
        assert (decode(entry) - exact).abs().max() <= entry["scale"] / 254 + 1e-9
        assert [x["id"] for x in entry["sources"]] == [x.id for x in s.top]
        assert [x["share"] for x in entry["sources"]] == [x.share for x in s.top]
        for x in entry["sources"]:       # first and last token of the source lie inside it
            seg = next(g for g in report.segments if g.id == x["id"])
            for t in x["tokens"]:
                a, b = m.offsets[t]
                assert seg.start < b and a < seg.end
    assert [d["id"] for d in data["documents"]] == ["1", "2", "3"]


def test_self_contained():
    report, _ = rag_report()
    doc = V.viewer_html(report)
    page, _ = parse(doc)
    assert not {"link", "img", "iframe", "object", "embed"} & set(page.tags)
    assert not [v for k, v in page.attrs if k in ("src", "href")]      # no loaded resources
    assert not re.search(r"https?://|@import|url\(|fetch\(|XMLHttpRequest", doc)
    assert all(attrs.get("src") is None for attrs, _ in page.scripts)


def test_token_text_cannot_break_out():
    m = make_matrix(["</script><img src=x onerror=alert(1)>", " <!-- x"], [" \u00e9&amp;"], seed=1)
    doc = V.viewer_html(m)
    page, data = parse(doc)
    assert "img" not in page.tags and len(page.scripts) == 2
    assert data["tokens"] == m.tokens


def test_matrix_without_sources_and_bad_input():
    m = make_matrix(["Some", " context", "."], [" One", ".", " Two", "."], seed=2)
    page, data = parse(V.viewer_html(m))
    assert [s["text"] for s in data["sentences"]] == ["One.", "Two."]
    assert "sources" not in data["sentences"][0] and data["documents"] == []
    m.relevance[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        V.viewer_html(m)
    with pytest.raises(TypeError, match="RelevanceMatrix or a SourceReport"):
        V.viewer_html("nope")


def test_size_is_about_a_byte_per_entry(tmp_path):
    """10k context tokens, 16 answer tokens: the relevance costs ~4/3 byte per stored entry
    (base64 of int8; one row per answer token and one per answer sentence, each only up to
    its position), the rest is the tokens' text and a fixed page."""
    m = long_matrix(10_000, 16)
    path = V.write_viewer(m, str(tmp_path / "long.html"))
    size = os.path.getsize(path)
    entries = sum(m.prompt_length + k for k in range(m.continuation_length)) + \
        sum(m.prompt_length + max(s.rows) for s in S.answer_sentences(m))
    text = sum(len(json.dumps(t)) + 1 for t in m.tokens)
    assert size <= 4 / 3 * entries + text + 64_000, size


def long_matrix(n_context, n_answer, seed=0):
    import random
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "model"]
    pieces = [(" " if i else "") + rng.choice(words) + ("." if rng.random() < 0.1 else "")
              for i in range(n_context - 1)]
    answer = [" The", " answer", " is", " gamma", "."] * (n_answer // 5 + 1)
    return make_matrix(pieces, answer[:n_answer], seed=seed)


# ----------------------------------------------------------------------------- Chromium

def chromium(*args, timeout=180):
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-800:]
    return proc.stdout


def context_classes(dom):
    body = re.search(r'<div id="lrp-context"[^>]*>(.*?)</div>', dom, re.S).group(1)
    return re.findall(r'<span class="t ?([^"]*)">', body)


def expected_levels(values, scale):
    """Colour step per token, computed here from the exact relevance: sign * round(10 |q| /
    127) with q = round(127 r / scale)."""
    out = []
    for r in values.tolist():
        q = round(127 * r / scale) if scale else 0
        lv = round(abs(q) * 10 / 127)
        out.append("" if lv == 0 else ("p" if q > 0 else "n") + str(lv))
    return out


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="headless chromium not installed")
def test_click_recolours_the_context_in_chromium(tmp_path):
    """``#token=K`` makes the page click answer token K (the user's click path); the context
    spans must then carry the colour steps of row K, and differ from the page's first view
    (answer sentence 1). A screenshot is written for a person to look at."""
    report, m = rag_report(seed=3)
    page = tmp_path / "v.html"
    V.write_viewer(report, str(page))
    first = chromium("--dump-dom", page.as_uri())
    assert 'data-ready="1"' in first and 'data-selection="sentence:0"' in first
    k = 4
    clicked = chromium("--dump-dom", page.as_uri() + f"#token={k}")
    assert f'data-selection="token:{k}"' in clicked
    p = m.prompt_length
    row = m.relevance[k].double()
    assert context_classes(clicked) == expected_levels(row[:p], float(row[:p + k].abs().max()))
    sent = m.relevance[report.sentences[0].sentence.rows].double().sum(0)
    assert context_classes(first) == expected_levels(
        sent[:p], float(sent[:p + max(report.sentences[0].sentence.rows)].abs().max()))
    assert context_classes(first) != context_classes(clicked)
    assert re.search(rf'<span class="a sel" data-k="{k}">', clicked)
    shot = tmp_path / "v.png"
    chromium("--window-size=1200,700", f"--screenshot={shot}", page.as_uri() + f"#token={k}")
    assert shot.stat().st_size > 10_000


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="headless chromium not installed")
def test_10k_context_opens_in_chromium(tmp_path):
    """A 10k-token context renders and recolours (render / paint times are reported by the
    page in data-render-ms / data-paint-ms; printed, not asserted)."""
    m = long_matrix(10_000, 16, seed=1)
    page = tmp_path / "long.html"
    V.write_viewer(m, str(page))
    dom = chromium("--dump-dom", page.as_uri() + "#token=3")
    assert 'data-ready="1"' in dom and 'data-selection="token:3"' in dom
    classes = context_classes(dom)
    assert len(classes) == m.prompt_length
    row = m.relevance[3].double()
    assert classes == expected_levels(row[:m.prompt_length],
                                      float(row[:m.prompt_length + 3].abs().max()))
    times = re.search(r'data-render-ms="([\d.]+)" data-paint-ms="([\d.]+)"', dom)
    print(f"10k tokens: render {times.group(1)} ms, first paint {times.group(2)} ms")


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="headless chromium not installed")
def test_arrow_key_and_jump_in_chromium(tmp_path):
    """A script appended to a copy of the page (test only) clicks answer token 2, presses
    ArrowRight, then "most relevant token": the selection must be token 3 and the outlined
    context token the largest entry of row 3, computed here."""
    m = long_matrix(400, 8, seed=4)
    doc = V.viewer_html(m)
    hook = """<script>
document.querySelector('.a[data-k="2"]').click();
document.dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowRight"}));
document.getElementById("lrp-jump").click();  // before any frame: the jump paints the pending selection
const lit = [...document.querySelectorAll("#lrp-context .t")].findIndex(x => x.classList.contains("hl"));
document.body.dataset.after = document.body.dataset.selection + "|" + lit;
</script></body>"""
    page = tmp_path / "hook.html"
    page.write_text(doc.replace("</body>", hook), encoding="utf-8")
    dom = chromium("--virtual-time-budget=3000", "--dump-dom", page.as_uri())
    best = int(m.relevance[3, :m.prompt_length + 3].argmax())
    assert f'data-after="token:3|{best}"' in dom
