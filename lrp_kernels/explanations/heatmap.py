"""Token heatmaps: self-contained HTML, LaTeX/PDF and PNG.

Relevance keeps its sign: red is evidence *for* the target, blue evidence *against* it, on a
diverging scale symmetric around zero (``|relevance|`` is normalised by its maximum unless a
``scale`` is given). Every renderer takes display tokens (see :func:`clean_tokens`) whose
concatenation is the text to show, so spaces and newlines are kept exactly.
"""
from __future__ import annotations

import html
import math
import numbers
import os
import re
import shutil
import subprocess
import tempfile
from typing import List, Optional, Sequence, Tuple

__all__ = ["clean_tokens", "html_heatmap", "tex_heatmap", "pdf_heatmap", "png_heatmap",
           "HeatmapError", "relevance_color"]


class HeatmapError(RuntimeError):
    """A heatmap could not be written (missing LaTeX binary, missing matplotlib, bad input)."""


# ----------------------------------------------------------------------------- tokens

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Markers used by sentencepiece (▁) and byte-level BPE (Ġ space, Ċ newline, ĉ tab).
_MARKERS = {"\u2581": " ", "\u0120": " ", "\u010a": "\n", "\u0109": "\t", "\u010d": "\r"}


def clean_tokens(tokens: Sequence[str]) -> List[str]:
    """Turn raw tokenizer pieces into readable display strings.

    ``▁`` and ``Ġ`` become a space, ``Ċ`` a newline, ``ĉ`` a tab, byte tokens such as
    ``<0x0A>`` the character they encode (non-printable bytes stay as ``<0xNN>``).
    The result concatenates to the readable text (up to the tokenizer's own normalisation).
    """
    out = []
    for tok in tokens:
        if not isinstance(tok, str):
            raise TypeError(f"tokens must be strings, got {type(tok).__name__}")

        def byte(m: "re.Match[str]") -> str:
            ch = chr(int(m.group(1), 16))
            return ch if ch.isprintable() or ch in "\n\t\r" else m.group(0)

        tok = _BYTE_TOKEN.sub(byte, tok)
        out.append("".join(_MARKERS.get(c, c) for c in tok))
    return out


def _check(tokens: Sequence[str], relevance) -> Tuple[List[str], List[float]]:
    rel = [float(r) for r in (relevance.tolist() if hasattr(relevance, "tolist") else relevance)]
    tokens = list(tokens)
    if len(tokens) != len(rel):
        raise ValueError(f"tokens and relevance must have the same length, got {len(tokens)} "
                         f"tokens and {len(rel)} relevance values")
    if any(r != r or r in (float("inf"), float("-inf")) for r in rel):
        raise ValueError("relevance contains NaN or Inf; refusing to draw a misleading heatmap")
    return tokens, rel


def _positive_number(name: str, value) -> float:
    """``value`` as a float if it is a finite number > 0 (a 0-d tensor too), else ValueError."""
    try:
        number = None if isinstance(value, (bool, str)) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _check_scale(scale) -> None:
    """``scale`` is None (max |relevance|) or a finite number > 0 (0 would hide everything)."""
    if scale is not None:
        _positive_number("scale", scale)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _normalise(rel: List[float], scale: Optional[float]) -> Tuple[List[float], float]:
    m = float(scale) if scale is not None else max((abs(r) for r in rel), default=0.0)
    if m <= 0:
        return [0.0] * len(rel), 0.0
    return [max(-1.0, min(1.0, r / m)) for r in rel], m


def relevance_color(a: float) -> Tuple[int, int, int]:
    """RGB of normalised relevance ``a`` in [-1, 1]: white at 0, red at +1, blue at -1."""
    a = max(-1.0, min(1.0, float(a)))
    fade = int(round(255 * (1 - abs(a))))
    return (255, fade, fade) if a >= 0 else (fade, fade, 255)


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em;color:#222}
.lrp-text{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;
line-height:1.9;font-size:15px;border:1px solid #ddd;padding:.8em;border-radius:4px}
.lrp-tok{border-radius:2px;padding:1px 0}
.lrp-legend{display:flex;align-items:center;gap:.6em;margin:.6em 0 1em 0;font-size:13px}
.lrp-bar{width:220px;height:12px;border:1px solid #aaa;
background:linear-gradient(to right,rgb(0,0,255),rgb(255,255,255),rgb(255,0,0))}
.lrp-meta{font-size:13px;color:#555}
"""


def html_heatmap(tokens: Sequence[str], relevance, *, title: Optional[str] = None,
                 target: Optional[str] = None, scale: Optional[float] = None,
                 full_document: bool = True) -> str:
    """Self-contained HTML (no script, no network): coloured tokens, value on hover, legend.
    ``scale``: the |relevance| drawn at full colour (default: the largest), a finite number > 0."""
    _check_scale(scale)
    tokens, rel = _check(tokens, relevance)
    norm, m = _normalise(rel, scale)
    spans = []
    for tok, r, a in zip(tokens, rel, norm):
        rgb = relevance_color(a)
        tip = html.escape(f"{tok!r}: {r:+.4g}", quote=True)
        spans.append(f'<span class="lrp-tok" style="background:rgb{rgb}" title="{tip}">'
                     f"{html.escape(tok)}</span>")
    legend = (f'<div class="lrp-legend"><span>{-m:+.3g}</span><span class="lrp-bar"></span>'
              f"<span>{m:+.3g}</span><span>relevance (red: for, blue: against"
              + (f"; target: <b>{html.escape(target)}</b>" if target is not None else "")
              + ")</span></div>")
    body = (f"<h3>{html.escape(title)}</h3>" if title else "") + legend + \
        f'<div class="lrp-text">{"".join(spans)}</div>' + \
        f'<p class="lrp-meta">{len(tokens)} tokens; sum of relevance {sum(rel):+.4g}</p>'
    if not full_document:
        return body
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title or 'relevance heatmap')}</title><style>{_CSS}</style>"
            f"</head><body>{body}</body></html>\n")


# ----------------------------------------------------------------------------- LaTeX / PDF

_TEX_SPECIAL = {
    "\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#",
    "%": r"\%", "_": r"\_", "^": r"\textasciicircum{}", "~": r"\textasciitilde{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}", "\"": r"\textquotedbl{}",
    "'": r"\textquotesingle{}", "`": r"\textasciigrave{}", "-": r"{-}",
}


def tex_escape(text: str) -> str:
    """Escape every LaTeX special character (and tab) so ``text`` prints verbatim."""
    return "".join(_TEX_SPECIAL.get(c, r"\quad{}" if c == "\t" else c) for c in text)


def tex_heatmap(tokens: Sequence[str], relevance, *, backend: str = "xelatex",
                target: Optional[str] = None, scale: Optional[float] = None) -> str:
    """LaTeX source of the heatmap (one ``\\colorbox`` per token; spaces and newlines kept)."""
    if backend not in ("xelatex", "pdflatex"):
        raise ValueError(f"backend must be 'xelatex' or 'pdflatex', got {backend!r}")
    _check_scale(scale)
    tokens, rel = _check(tokens, relevance)
    norm, m = _normalise(rel, scale)
    pre = [r"\documentclass[12pt]{article}", r"\usepackage[margin=2cm]{geometry}",
           r"\usepackage[dvipsnames]{xcolor}", r"\usepackage{textcomp}"]
    pre += ([r"\usepackage{fontspec}"] if backend == "xelatex"
            else [r"\usepackage[utf8]{inputenc}", r"\usepackage[T1]{fontenc}"])
    pre += [r"\setlength{\fboxsep}{1pt}", r"\setlength{\parindent}{0pt}",
            r"\begin{document}", r"\raggedright"]
    if target is not None:
        pre.append(r"\textbf{target:} " + tex_escape(target) + r" \quad "
                   + tex_escape(f"(max |relevance| {m:.3g}; red: for, blue: against)")
                   + r"\par\medskip")
    body = []
    for tok, a in zip(tokens, norm):
        r, g, b = relevance_color(a)
        lines = tok.split("\n")
        for i, line in enumerate(lines):
            if i:
                body.append(r"\newline" + "\n")
            lead = len(line) - len(line.lstrip(" "))
            trail = len(line) - len(line.rstrip(" "))
            core = line.strip(" ")
            body.append(" " * min(lead, 1))  # a breakable space before the box
            if core:
                body.append(r"\colorbox[RGB]{%d,%d,%d}{\strut %s}" % (r, g, b, tex_escape(core)))
            body.append(" " * min(trail, 1))
    return "\n".join(pre) + "\n" + "".join(body) + "\n\\end{document}\n"


def pdf_heatmap(tokens: Sequence[str], relevance, path: str, *, backend: str = "xelatex",
                target: Optional[str] = None, scale: Optional[float] = None,
                keep_tex: bool = False) -> str:
    """Write a PDF heatmap with ``xelatex`` (any Unicode the font has) or ``pdflatex``.

    Raises :class:`HeatmapError` naming HTML and PNG as alternatives when the LaTeX binary is
    not installed, or with the end of the LaTeX log when compilation fails.
    """
    if backend not in ("xelatex", "pdflatex"):
        raise ValueError(f"backend must be 'xelatex' or 'pdflatex', got {backend!r}")
    source = tex_heatmap(tokens, relevance, backend=backend, target=target, scale=scale)
    exe = shutil.which(backend)
    if exe is None:
        raise HeatmapError(f"{backend} is not installed (needed for PDF heatmaps); install a TeX "
                           "distribution, or write an HTML (.html) or PNG (.png) heatmap instead")
    path = os.path.abspath(path)
    with tempfile.TemporaryDirectory() as tmp:
        tex = os.path.join(tmp, "heatmap.tex")
        with open(tex, "w", encoding="utf-8") as f:
            f.write(source)
        proc = subprocess.run([exe, "-interaction=nonstopmode", "-halt-on-error", "heatmap.tex"],
                              cwd=tmp, capture_output=True, text=True, errors="replace")
        pdf = os.path.join(tmp, "heatmap.pdf")
        if proc.returncode != 0 or not os.path.exists(pdf):
            tail = "\n".join(proc.stdout.splitlines()[-15:])
            raise HeatmapError(f"{backend} failed (exit {proc.returncode}):\n{tail}")
        shutil.copyfile(pdf, path)
        if keep_tex:
            shutil.copyfile(tex, os.path.splitext(path)[0] + ".tex")
    return path


# ----------------------------------------------------------------------------- PNG

def png_heatmap(tokens: Sequence[str], relevance, path: str, *, target: Optional[str] = None,
                scale: Optional[float] = None, width_chars: int = 90, dpi: int = 150) -> str:
    """Write a PNG heatmap with matplotlib (monospace layout, wrapped at ``width_chars``, a
    positive integer; ``dpi`` a finite number > 0). Arguments are checked before anything is
    drawn: ``ValueError`` naming the argument."""
    _check_scale(scale)
    _check_positive_int("width_chars", width_chars)
    _positive_number("dpi", dpi)
    tokens, rel = _check(tokens, relevance)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as err:
        raise HeatmapError("PNG heatmaps need matplotlib (pip install matplotlib, or "
                           "pip install 'lrp_kernels[png]'); or write an HTML (.html) heatmap "
                           "instead") from err
    norm, m = _normalise(rel, scale)
    # lay tokens out on a character grid: (line, column, text, normalised relevance)
    cells, line, col = [], 0, 0
    for tok, a in zip(tokens, norm):
        for i, part in enumerate(tok.replace("\t", "    ").split("\n")):
            if i:
                line, col = line + 1, 0
            while part:
                room = width_chars - col
                if room <= 0 or (len(part) > room and col > 0 and len(part) <= width_chars):
                    line, col = line + 1, 0
                    continue
                chunk, part = part[:room], part[room:]
                cells.append((line, col, chunk, a))
                col += len(chunk)
    n_lines = line + 1
    char_w, line_h = 0.1, 0.28  # inches at fontsize 10 monospace
    header = 0.5
    title = f"max |relevance| {m:.3g} (red: for, blue: against)"
    if target is not None:
        title = f"target: {target}   " + title
    used = max([c + len(t) for _, c, t, _ in cells] + [int(len(title) * 0.9)])
    fig = Figure(figsize=(min(width_chars, used) * char_w + 0.4, n_lines * line_h + header + 0.3))
    FigureCanvasAgg(fig)
    W, H = fig.get_size_inches()
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.axis("off")
    ax.text(0.2, 0.3, title, fontsize=9, family="monospace", va="center")
    for ln, c, text, a in cells:
        x, y = 0.2 + c * char_w, header + ln * line_h
        ax.add_patch(Rectangle((x, y), len(text) * char_w, line_h * 0.9,
                               color=[v / 255 for v in relevance_color(a)], lw=0))
        ax.text(x, y + line_h * 0.45, text, fontsize=10, family="monospace", va="center",
                color="white" if abs(a) > 0.6 else "black")
    fig.savefig(path, dpi=dpi)
    return path
