"""The interactive viewer: one self-contained HTML file for a whole answer.

The answer is on top; hovering an answer token (or its sentence) previews, clicking pins the
relevance of every earlier token for it: the context (and the earlier answer) is coloured red
(for) / blue (against), scaled to the selection's largest ``|relevance|`` (legend). A sources
panel lists each answer sentence's top sources with their share (from a
:class:`~lrp_kernels.explanations.sources.SourceReport`); clicking a source scrolls to it.

Built for long contexts (10k tokens and more): no network and no external file (inline CSS
and script); the data is one compact JSON block (tokens once, each row quantised to int8
with its own scale and stored base64, only the entries before the row's position, which are
the only non-zero ones); the context is rendered once, and a selection only changes the CSS
class of the tokens whose colour changes, in one ``requestAnimationFrame``. Values shown on
hover are the quantised ones (within ``scale / 254`` of the exact relevance; the exact
numbers are in the JSON files written beside the viewer). "most relevant token" scrolls to the
selection's largest positive relevance; with a token pinned, the arrow keys move it.

Deep links: ``viewer.html#token=K`` opens with answer token ``K`` (0-based) selected,
``#sentence=S`` with answer sentence ``S``.
"""
from __future__ import annotations

import base64
import html
import json
from typing import Any, Dict, List, Optional, Union

import torch

from .matrix import RelevanceMatrix
from .sources import SourceReport, _segment_owner, answer_sentences

__all__ = ["viewer_data", "viewer_html", "write_viewer", "LEVELS_PER_SIGN"]

LEVELS_PER_SIGN = 10  # colour steps per sign (CSS classes p1..p10, n1..n10)
QMAX = 127            # int8 quantisation: q = round(QMAX * r / scale)


def _quantise(values: torch.Tensor) -> Dict[str, Any]:
    """``{"scale": max|v|, "q": base64 of int8 round(127 v / scale)}`` of a 1-D tensor."""
    v = values.double()
    scale = float(v.abs().max()) if v.numel() else 0.0
    q = torch.zeros(v.numel(), dtype=torch.int8) if scale == 0 else \
        torch.round(v * (QMAX / scale)).clamp(-QMAX, QMAX).to(torch.int8)
    return {"scale": scale, "q": base64.b64encode(q.numpy().tobytes()).decode("ascii")}


def viewer_data(source: Union[RelevanceMatrix, SourceReport], *,
                title: Optional[str] = None) -> Dict[str, Any]:
    """The JSON the viewer embeds (see the module docstring for the encoding): ``tokens``,
    ``prompt_length``, ``rows`` (one per answer token), ``sentences`` (answer sentences with
    their summed rows and, from a report, their top ``sources``), ``documents``."""
    report = source if isinstance(source, SourceReport) else None
    matrix = report.matrix if report is not None else source
    if not isinstance(matrix, RelevanceMatrix):
        raise TypeError(f"source must be a RelevanceMatrix or a SourceReport, got "
                        f"{type(source).__name__}")
    rel = matrix.relevance
    if not torch.isfinite(rel).all():
        raise ValueError("the relevance matrix contains NaN or Inf; refusing to draw a "
                         "misleading viewer")
    p = matrix.prompt_length
    rows = [_quantise(rel[k, :p + k]) for k in range(matrix.continuation_length)]
    sentences: List[Dict[str, Any]] = []
    sents = [s.sentence for s in report.sentences] if report is not None \
        else answer_sentences(matrix)
    first_last: Dict[str, List[int]] = {}  # segment id -> [first token, last token]
    if report is not None:
        owner = _segment_owner(matrix, [(x.start, x.end) for x in report.segments])
        for j, seg in enumerate(report.segments):
            idx = (owner == j).nonzero().flatten().tolist()
            first_last[seg.id] = [idx[0], idx[-1]] if idx else []
    for i, sent in enumerate(sents):
        summed = rel[sent.rows].double().sum(0)[:p + max(sent.rows)]
        entry = {"text": sent.text, "rows": sent.rows, **_quantise(summed)}
        if report is not None:
            s = report.sentences[i]
            entry["sources"] = [
                {"id": x.id, "kind": x.kind, "document": x.document, "text": x.text,
                 "relevance": x.relevance, "share": x.share, "tokens": first_last[x.id]}
                for x in s.top]
            entry["other"] = s.other
        sentences.append(entry)
    documents = []
    if report is not None:
        owner = _segment_owner(matrix, [(d.start, d.end) for d in report.documents])
        for j, d in enumerate(report.documents):
            idx = (owner == j).nonzero().flatten().tolist()
            if idx:
                documents.append({"id": d.id, "first": idx[0], "last": idx[-1]})
    answer = "".join(matrix.tokens[p:])
    return {"version": 1, "title": title or f"{matrix.rules} relevance: {answer.strip()[:80]}",
            "rules": matrix.rules, "tokens": matrix.tokens, "prompt_length": p,
            "target_logits": [round(float(x), 6) for x in matrix.target_logits],
            "target_probabilities": [round(float(x), 6) for x in matrix.target_probabilities],
            "rows": rows, "sentences": sentences, "documents": documents,
            "level": report.level if report is not None else None}


def _json_for_script(data: Dict[str, Any]) -> str:
    # "<" as \u003c: no "</script>" or "<!--" can end the block early; JSON.parse undoes it
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


_CSS = """
:root{--line:#ddd;--muted:#666}
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#222;background:#fafafa}
header{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line);
padding:.6em 1.2em}
h1{font-size:17px;margin:0 0 .4em 0}
h2{font-size:14px;margin:.2em 0 .5em 0;color:#444;text-transform:uppercase;letter-spacing:.04em}
#lrp-answer{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;
font-size:15px;line-height:1.9;max-height:22vh;overflow:auto}
.s{border-radius:3px;padding:1px 0}
.s.on{background:#fff7d6;box-shadow:0 0 0 1px #e0c060}
.a{cursor:pointer;border-radius:2px}
.a:hover{outline:1px solid #888}
.a.sel{outline:2px solid #000}
#lrp-legend{display:flex;align-items:center;gap:.6em;font-size:12px;color:var(--muted);margin-top:.3em}
#lrp-jump{font-size:12px;padding:1px 6px;cursor:pointer}
#lrp-bar{width:200px;height:11px;border:1px solid #aaa;
background:linear-gradient(to right,rgb(0,0,255),#fff,rgb(255,0,0))}
main{display:flex;gap:1em;padding:1em 1.2em;align-items:flex-start}
#lrp-context-panel{flex:3;min-width:0}
#lrp-sources{flex:1;min-width:260px;max-height:75vh;overflow:auto;font-size:13px}
#lrp-context{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;
font-size:14px;line-height:1.8;background:#fff;border:1px solid var(--line);border-radius:4px;
padding:.8em;max-height:75vh;overflow:auto;contain:content}
.t{border-radius:2px}
.t.hl{outline:2px solid #e0a000}
.blk{background:#fff;border:1px solid var(--line);border-radius:4px;padding:.5em .7em;margin-bottom:.7em}
.blk.on{border-color:#e0c060;box-shadow:0 0 0 1px #e0c060}
.blk h3{font-size:13px;margin:0 0 .4em 0;cursor:pointer;font-weight:600}
.src{display:flex;gap:.5em;align-items:center;cursor:pointer;padding:2px 0}
.src:hover{background:#f3f3f3}
.share{flex:0 0 46px;height:9px;background:#eee;border-radius:2px;overflow:hidden}
.share i{display:block;height:100%;background:#d33}
.sid{font-weight:600;white-space:nowrap}
.stx{color:#444;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.oth{color:var(--muted);font-size:12px;margin-top:.3em}
.muted{color:var(--muted);font-size:12px}
"""


def _palette_css() -> str:
    """CSS classes of the colour steps: ``p1..pL`` red, ``n1..nL`` blue (white at 0)."""
    rules = []
    for level in range(1, LEVELS_PER_SIGN + 1):
        fade = round(255 * (1 - level / LEVELS_PER_SIGN))
        rules.append(f".p{level}{{background:rgb(255,{fade},{fade})}}")
        rules.append(f".n{level}{{background:rgb({fade},{fade},255)}}")
    return "".join(rules)


_SCRIPT = r"""
(function(){
"use strict";
const D = JSON.parse(document.getElementById("lrp-data").textContent);
const L = __LEVELS__, QMAX = __QMAX__, P = D.prompt_length, N = D.tokens.length;
const ctx = document.getElementById("lrp-context"), ans = document.getElementById("lrp-answer");
const status = document.getElementById("lrp-status"), srcPanel = document.getElementById("lrp-sources");
const lo = document.getElementById("lrp-lo"), hi = document.getElementById("lrp-hi");
const jump = document.getElementById("lrp-jump");
const t0 = performance.now();
const el = new Array(N);        // token elements: context (i < P) and answer (i >= P)
const level = new Int8Array(N); // colour step now shown per token
const cache = new Map();

function decode(entry){  // base64 int8 -> Int8Array (cached per row / sentence)
  let q = cache.get(entry);
  if (!q){
    const bin = atob(entry.q), u = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i);
    q = new Int8Array(u.buffer); cache.set(entry, q);
  }
  return q;
}
function cls(lv){ return lv > 0 ? "p" + lv : lv < 0 ? "n" + (-lv) : ""; }

// ---- render once: context tokens, answer tokens grouped by sentence
const frag = document.createDocumentFragment();
for (let i = 0; i < P; i++){
  const s = document.createElement("span"); s.className = "t"; s.textContent = D.tokens[i];
  el[i] = s; frag.appendChild(s);
}
ctx.appendChild(frag);
const sentOf = new Int32Array(N - P).fill(-1);
D.sentences.forEach((s, j) => s.rows.forEach(k => { sentOf[k] = j; }));
const sentEl = [], blkEl = [];
let open = null, openIdx = -2;
for (let k = 0; k < N - P; k++){
  const j = sentOf[k];
  if (j !== openIdx){
    open = document.createElement("span"); openIdx = j;
    if (j >= 0){ open.className = "s"; open.dataset.s = j; sentEl[j] = open; }
    ans.appendChild(open);
  }
  const a = document.createElement("span"); a.className = "a"; a.dataset.k = k;
  a.textContent = D.tokens[P + k]; el[P + k] = a; open.appendChild(a);
}

// ---- sources panel
D.sentences.forEach((s, j) => {
  const b = document.createElement("div"); b.className = "blk"; b.dataset.s = j;
  const h = document.createElement("h3"); h.dataset.s = j;
  h.textContent = "Sentence " + (j + 1) + ": " + s.text.trim();
  b.appendChild(h);
  if (s.sources){
    if (!s.sources.length){
      const m = document.createElement("div"); m.className = "muted";
      m.textContent = "no source with positive relevance"; b.appendChild(m);
    }
    s.sources.forEach(x => {
      const r = document.createElement("div"); r.className = "src";
      r.dataset.first = x.tokens.length ? x.tokens[0] : -1;
      r.dataset.last = x.tokens.length ? x.tokens[1] : -2;
      const bar = document.createElement("span"); bar.className = "share";
      const fill = document.createElement("i");
      fill.style.width = Math.max(0, Math.min(100, 100 * x.share)).toFixed(1) + "%";
      bar.appendChild(fill);
      const pct = document.createElement("span"); pct.textContent = (100 * x.share).toFixed(1) + "%";
      const id = document.createElement("span"); id.className = "sid"; id.textContent = x.id;
      const tx = document.createElement("span"); tx.className = "stx"; tx.textContent = x.text;
      r.title = x.text; r.append(bar, pct, id, tx); b.appendChild(r);
    });
    const o = document.createElement("div"); o.className = "oth";
    o.textContent = "other: " + Object.entries(s.other).map(
      ([k, v]) => k + " " + (100 * v).toFixed(1) + "%").join(", ");
    b.appendChild(o);
  } else {
    const m = document.createElement("div"); m.className = "muted";
    m.textContent = "tokens " + (s.rows[0] + 1) + "-" + (s.rows[s.rows.length - 1] + 1);
    b.appendChild(m);
  }
  srcPanel.appendChild(b); blkEl[j] = b;
});
if (!D.sentences.length){ srcPanel.appendChild(document.createTextNode("no answer sentences")); }

// ---- selection and recolouring (only changed tokens, once per frame)
let pinned = null, shown = null, pending = null, frame = 0;
function entryOf(sel){ return sel.kind === "token" ? D.rows[sel.i] : D.sentences[sel.i]; }
function paint(){
  frame = 0;
  const sel = pending; if (!sel) return;
  const e = entryOf(sel), q = decode(e), f = L / QMAX;
  let best = -1;
  for (let i = 0; i < q.length; i++) if (best < 0 || q[i] > q[best]) best = i;
  jump.dataset.i = best;
  for (let i = 0; i < N; i++){
    const lv = i < q.length ? Math.sign(q[i]) * Math.round(Math.abs(q[i]) * f) : 0;
    if (lv !== level[i]){
      level[i] = lv;
      const base = i < P ? "t" : "a", c = cls(lv);
      el[i].className = c ? base + " " + c : base;
    }
  }
  document.querySelectorAll(".sel,.s.on,.blk.on").forEach(x => x.classList.remove("sel", "on"));
  if (sel.kind === "token"){
    el[P + sel.i].classList.add("sel");
    const j = sentOf[sel.i]; if (j >= 0) blkEl[j].classList.add("on");
  } else {
    sentEl[sel.i].classList.add("on"); blkEl[sel.i].classList.add("on");
  }
  lo.textContent = (-e.scale).toPrecision(3); hi.textContent = "+" + e.scale.toPrecision(3);
  const what = sel.kind === "token"
    ? "token " + sel.i + " " + JSON.stringify(D.tokens[P + sel.i]) + " (p=" +
      D.target_probabilities[sel.i].toPrecision(3) + ")"
    : "sentence " + (sel.i + 1) + " " + JSON.stringify(D.sentences[sel.i].text.trim());
  status.textContent = (sel === pinned ? "selected: " : "preview: ") + what;
  document.body.dataset.selection = sel.kind + ":" + sel.i;
  shown = sel;
}
function show(sel){ pending = sel; if (!frame) frame = requestAnimationFrame(paint); }
function flush(){ if (frame){ cancelAnimationFrame(frame); paint(); } }
function pick(target){
  const a = target.closest(".a");
  if (a) return {kind: "token", i: +a.dataset.k};
  const s = target.closest("[data-s]");
  if (s && !target.closest(".src")) return {kind: "sentence", i: +s.dataset.s};
  return null;
}
for (const root of [ans, srcPanel]){
  root.addEventListener("click", ev => { const s = pick(ev.target); if (s){ pinned = s; show(s); } });
  root.addEventListener("mouseover", ev => { const s = pick(ev.target); if (s) show(s); });
  root.addEventListener("mouseleave", () => { if (pinned) show(pinned); });
}
// a source: outline its tokens on hover, scroll to it on click
let lit = [];
srcPanel.addEventListener("mouseover", ev => {
  const r = ev.target.closest(".src"); lit.forEach(x => x.classList.remove("hl")); lit = [];
  if (!r) return;
  for (let i = +r.dataset.first; i <= +r.dataset.last; i++){ el[i].classList.add("hl"); lit.push(el[i]); }
});
srcPanel.addEventListener("click", ev => {
  const r = ev.target.closest(".src");
  if (r && +r.dataset.first >= 0) el[+r.dataset.first].scrollIntoView({block: "center"});
});
// the most relevant token of the selection: scroll to it and outline it
jump.addEventListener("click", () => {
  flush();                   // a selection still waiting for its frame decides the target
  const i = +jump.dataset.i; if (!(i >= 0)) return;
  lit.forEach(x => x.classList.remove("hl")); lit = [el[i]];
  el[i].classList.add("hl"); el[i].scrollIntoView({block: "center"});
});
// arrow keys move a pinned token selection
document.addEventListener("keydown", ev => {
  if (!pinned || pinned.kind !== "token" || (ev.key !== "ArrowLeft" && ev.key !== "ArrowRight")) return;
  const k = pinned.i + (ev.key === "ArrowLeft" ? -1 : 1);
  if (k >= 0 && k < N - P){ pinned = {kind: "token", i: k}; show(pinned); ev.preventDefault(); }
});
// value on hover, set lazily (no title on 10k spans up front)
function onTip(ev){
  const t = ev.target; if (!t.classList || !(t.classList.contains("t") || t.classList.contains("a")) || !shown) return;
  const i = el.indexOf(t), e = entryOf(shown), q = decode(e);
  const v = i < q.length ? q[i] * e.scale / QMAX : 0;
  t.title = JSON.stringify(D.tokens[i]) + ": \u2248" + (v >= 0 ? "+" : "") + v.toPrecision(3);
}
ctx.addEventListener("mouseover", onTip); ans.addEventListener("mouseover", onTip);

// ---- first selection: the deep link (#token=K, #sentence=S), else the first sentence
const m = /^#(token|sentence)=(\d+)$/.exec(location.hash);
const t1 = performance.now();
if (m && (m[1] === "token" ? +m[2] < N - P : +m[2] < D.sentences.length)){
  const target = m[1] === "token" ? el[P + +m[2]] : blkEl[+m[2]].querySelector("h3");
  target.click();            // the same path as a user's click
} else if (D.sentences.length){ pinned = {kind: "sentence", i: 0}; show(pinned); }
else if (N > P){ pinned = {kind: "token", i: 0}; show(pinned); }
flush();
document.body.dataset.renderMs = (t1 - t0).toFixed(1);
document.body.dataset.paintMs = (performance.now() - t1).toFixed(1);
document.body.dataset.ready = "1";
})();
"""


def viewer_html(source: Union[RelevanceMatrix, SourceReport], *,
                title: Optional[str] = None) -> str:
    """The viewer as one HTML string (see the module docstring): from a relevance matrix
    (answer sentences by :func:`~lrp_kernels.explanations.sources.answer_sentences`) or from
    a :class:`~lrp_kernels.explanations.sources.SourceReport` (with its sources panel)."""
    data = viewer_data(source, title=title)
    script = _SCRIPT.replace("__LEVELS__", str(LEVELS_PER_SIGN)).replace("__QMAX__", str(QMAX))
    head = html.escape(data["title"])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{head}</title><style>{_CSS}{_palette_css()}</style></head><body>"
            f"<header><h1 id=\"lrp-title\">{head}</h1>"
            "<h2>Answer <span class=\"muted\">(hover or click a token or sentence)</span></h2>"
            "<div id=\"lrp-answer\"></div>"
            "<div id=\"lrp-legend\"><span id=\"lrp-lo\">0</span><span id=\"lrp-bar\"></span>"
            "<span id=\"lrp-hi\">0</span><span>relevance for the selection (red: for, blue: "
            "against; scaled to its largest |value|)</span>"
            "<button id=\"lrp-jump\" type=\"button\">most relevant token</button>"
            "<span id=\"lrp-status\"></span></div></header>"
            "<main><section id=\"lrp-context-panel\"><h2>Context</h2>"
            "<div id=\"lrp-context\"></div></section>"
            "<aside id=\"lrp-sources\"><h2>Sources</h2></aside></main>"
            f"<script type=\"application/json\" id=\"lrp-data\">{_json_for_script(data)}</script>"
            f"<script>{script}</script></body></html>\n")


def write_viewer(source: Union[RelevanceMatrix, SourceReport], path: str, *,
                 title: Optional[str] = None) -> str:
    """Write :func:`viewer_html` to ``path`` (UTF-8); returns ``path``."""
    doc = viewer_html(source, title=title)
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)
    return path
