"""Heatmap renderers: token cleaning, HTML, LaTeX source and its error path, PNG."""
import html.parser
import os
import re
import shutil
import subprocess

import pytest

from lrp_kernels.explanations import heatmap as hm


def test_clean_tokens_markers_and_bytes():
    raw = ["<s>", "\u2581Hello", "\u0120world", "\u010a", "<0x0A>", "<0x41>", "<0x01>",
           "a\u2581b", "plain"]
    assert hm.clean_tokens(raw) == ["<s>", " Hello", " world", "\n", "\n", "A", "<0x01>",
                                    "a b", "plain"]


def test_clean_tokens_rejects_non_strings():
    with pytest.raises(TypeError, match="strings"):
        hm.clean_tokens(["a", 3])


def test_relevance_color_diverging():
    assert hm.relevance_color(0) == (255, 255, 255)
    assert hm.relevance_color(1) == (255, 0, 0)
    assert hm.relevance_color(-1) == (0, 0, 255)
    assert hm.relevance_color(5) == (255, 0, 0)  # clipped
    r, g, b = hm.relevance_color(0.5)
    assert r == 255 and g == b and 0 < g < 255


class _Spans(html.parser.HTMLParser):
    """Collect (title, text) of every token span and reject scripts / remote resources."""

    def __init__(self):
        super().__init__()
        self.spans, self._cur, self.tags = [], None, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        assert tag != "script"
        for k in ("src", "href"):
            assert k not in a, f"external resource in {tag}"
        if tag == "span" and a.get("class") == "lrp-tok":
            self._cur = [a["title"], a["style"], ""]

    def handle_data(self, data):
        if self._cur is not None:
            self._cur[2] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._cur is not None:
            self.spans.append(tuple(self._cur))
            self._cur = None


def test_html_self_contained_keeps_text_and_values():
    tokens = ["<bos>", "if", " a < b", " &&", "\n", "  x = \"y\"", "\t'z'"]
    rel = [0.0, 0.5, -2.0, 1.0, 0.0, 0.25, -0.125]
    doc = hm.html_heatmap(tokens, rel, target="tgt <1>")
    p = _Spans()
    p.feed(doc)
    assert [s[2] for s in p.spans] == tokens  # whitespace, newlines and specials survive
    for (title, style, _), r in zip(p.spans, rel):
        assert title.endswith(f"{r:+.4g}")
        # colour derived from the normalised value (max |r| = 2)
        assert f"rgb{hm.relevance_color(r / 2.0)}" in style
    assert "white-space:pre-wrap" in doc
    assert "tgt &lt;1&gt;" in doc  # legend with the target, escaped
    assert "http" not in doc


def test_html_all_zero_and_bad_input():
    doc = hm.html_heatmap(["a", "b"], [0.0, 0.0])
    assert "rgb(255, 255, 255)" in doc
    with pytest.raises(ValueError, match="same length"):
        hm.html_heatmap(["a"], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        hm.html_heatmap(["a"], [float("nan")])


def test_tex_escapes_every_special_character():
    specials = "\\{}$&#%_^~<>|\"'`-"
    src = hm.tex_heatmap(["x" + specials], [1.0], target="t_1")
    body = src.split(r"\begin{document}")[1]
    box = re.search(r"\\colorbox\[RGB\]\{255,0,0\}\{\\strut (.*)\}", body).group(1)
    # after removing the escape macros, no raw special may remain
    stripped = box
    for macro in (r"\textbackslash{}", r"\textasciicircum{}", r"\textasciitilde{}",
                  r"\textless{}", r"\textgreater{}", r"\textbar{}", r"\textquotedbl{}",
                  r"\textquotesingle{}", r"\textasciigrave{}", "{-}"):
        stripped = stripped.replace(macro, "")
    for esc in (r"\{", r"\}", r"\$", r"\&", r"\#", r"\%", r"\_"):
        stripped = stripped.replace(esc, "")
    assert stripped == "x"
    assert r"t\_1" in body


def test_tex_keeps_newlines_and_spaces():
    src = hm.tex_heatmap(["a", " b", "\n", "c"], [1, 0, 0, -1], backend="pdflatex")
    body = src.split(r"\raggedright")[1]
    assert r"\newline" in body
    assert r"\usepackage[utf8]{inputenc}" in src and "fontspec" not in src
    assert re.search(r"\{\\strut a\} \\colorbox", body)  # the space before ' b' is kept
    assert r"\colorbox[RGB]{0,0,255}{\strut c}" in body
    assert "fontspec" in hm.tex_heatmap(["a"], [1.0], backend="xelatex")


def test_pdf_missing_latex_names_alternatives(monkeypatch, tmp_path):
    monkeypatch.setattr(hm.shutil, "which", lambda name: None)
    for backend in ("xelatex", "pdflatex"):
        with pytest.raises(hm.HeatmapError) as err:
            hm.pdf_heatmap(["a"], [1.0], str(tmp_path / "h.pdf"), backend=backend)
        msg = str(err.value)
        assert backend in msg and ".html" in msg and ".png" in msg
    assert not (tmp_path / "h.pdf").exists()
    with pytest.raises(ValueError, match="backend"):
        hm.pdf_heatmap(["a"], [1.0], str(tmp_path / "h.pdf"), backend="lualatex")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_pdf_compiles_when_latex_is_installed(tmp_path):
    path = hm.pdf_heatmap(["a_b", " {c}", "\n", "50%"], [1, -1, 0, 0.5], str(tmp_path / "h.pdf"),
                          backend="pdflatex")
    assert open(path, "rb").read(4) == b"%PDF"


def test_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = hm.png_heatmap(["<bos>", " a", "\n", " very" * 40, " b"], [0, 1, 0, -0.5, 0.2],
                          str(tmp_path / "h.png"), target="b")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib(monkeypatch, tmp_path):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(hm.HeatmapError, match="matplotlib.*html"):
        hm.png_heatmap(["a"], [1.0], str(tmp_path / "h.png"))


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="headless chromium not installed")
def test_html_renders_in_headless_chromium(tmp_path):
    doc = hm.html_heatmap(["hello", " world", "\n", "next"], [1.0, -1.0, 0.0, 0.3], target="x")
    page = tmp_path / "h.html"
    page.write_text(doc, encoding="utf-8")
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.count('class="lrp-tok"') == 4
    assert "hello" in proc.stdout and "next" in proc.stdout
