"""From token relevance to words, sentences, paragraphs and documents: which source supports
which sentence of an answer (RAG source attribution).

A :class:`~lrp_kernels.explanations.matrix.RelevanceMatrix` holds the relevance of every token
for every answer token. Here tokens are grouped into *segments* (character spans of the
prompt) and answer tokens into *answer sentences*; the relevance of a segment for a sentence is

    R(sentence, segment) = sum over answer tokens a in the sentence,
                                    prompt tokens t in the segment, of R[a, t]

which, LRP being linear in the explained quantity, is exactly the relevance of the segment for
the sum of the sentence's token logits (what ``explain(..., continuation=sentence)`` explains).
Its **share** is ``R / total`` with ``total = sum over all tokens t of |sum_a R[a, t]|``
(context, question, template text, special tokens and earlier answer tokens): signed, in
[-1, 1], and the absolute shares of disjoint segments add up to at most 1, so what the sources
do not explain (the question, the answer so far, ``<bos>``) stays visible in ``other``.

Documents and a question become a prompt through a :class:`PromptTemplate`, which records
where each document's text lies in the prompt::

    sp = build_prompt(["Paris is the capital of France.", "Berlin is in Germany."],
                      "What is the capital of France?")
    m = explain_matrix(model, tok, sp.prompt, generate=20)
    report = attribute_sources(m, sp, level="sentence")
    print(report.format()); report.to_json("sources.json"); report.to_csv("sources.csv")

Splitting (deterministic, no model, no download; :func:`split_sentences`): a sentence ends
after ``.``, ``!`` or ``?`` (and any closing quotes or brackets right after them) that is
followed by whitespace or the end of the text, and at a blank line; abbreviations ("e.g. x")
are not special-cased. A paragraph ends at a blank line (a line holding only whitespace). A
word is a run of non-whitespace characters. A token belongs to the segment its character span
overlaps most (the first on a tie); a token overlapping no segment (template text, the
question, special tokens with an empty span) counts only towards ``other``.
"""
from __future__ import annotations

import bisect
import csv
import io
import json
import re
import string
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .matrix import RelevanceMatrix

__all__ = ["PromptTemplate", "QA_TEMPLATE", "KEY_VALUE_TEMPLATE", "TEMPLATES", "Segment",
           "SourcePrompt", "build_prompt", "split_sentences", "split_paragraphs", "split_words",
           "token_spans", "aggregate", "answer_sentences", "AnswerSentence", "Source",
           "SentenceSources", "SourceReport", "attribute_sources", "explain_sources",
           "SourcesError"]

LEVELS = ("document", "paragraph", "sentence", "word")

# a sentence ends after . ! or ? plus closing quotes/brackets, before whitespace or the end
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_WORD = re.compile(r"\S+")


class SourcesError(ValueError):
    """Bad input to source attribution (empty documents, a template without ``{text}``, ...)."""


# ----------------------------------------------------------------------------- splitting

def _strip(text: str, start: int, end: int) -> Optional[Tuple[int, int]]:
    """``(start, end)`` without surrounding whitespace, or None when only whitespace is left."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def split_paragraphs(text: str, start: int = 0, end: Optional[int] = None) -> List[Tuple[int, int]]:
    """Character spans of the paragraphs of ``text[start:end]`` (separated by blank lines),
    whitespace trimmed, in ``text``'s coordinates."""
    end = len(text) if end is None else end
    spans, at = [], start
    for m in _BLANK_LINE.finditer(text, start, end):
        span = _strip(text, at, m.start())
        if span:
            spans.append(span)
        at = m.end()
    span = _strip(text, at, end)
    if span:
        spans.append(span)
    return spans


def split_sentences(text: str, start: int = 0, end: Optional[int] = None) -> List[Tuple[int, int]]:
    """Character spans of the sentences of ``text[start:end]``, whitespace trimmed, in
    ``text``'s coordinates (rule in the module docstring: ``.``/``!``/``?`` before whitespace,
    and blank lines)."""
    spans = []
    for p_start, p_end in split_paragraphs(text, start, end):
        at = p_start
        for m in _SENTENCE_END.finditer(text, p_start, p_end):
            span = _strip(text, at, m.end())
            if span:
                spans.append(span)
            at = m.end()
        span = _strip(text, at, p_end)
        if span:
            spans.append(span)
    return spans


def split_words(text: str, start: int = 0, end: Optional[int] = None) -> List[Tuple[int, int]]:
    """Character spans of the words (runs of non-whitespace) of ``text[start:end]``."""
    end = len(text) if end is None else end
    return [m.span() for m in _WORD.finditer(text, start, end)]


_SPLITTERS = {"paragraph": split_paragraphs, "sentence": split_sentences, "word": split_words}


# ----------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class PromptTemplate:
    """How documents and a question become one prompt:
    ``prefix + document(1) + separator + document(2) + ... + suffix``.

    ``document`` holds ``{text}`` exactly once and may use ``{id}`` and ``{index}`` (1-based);
    ``suffix`` holds ``{question}`` exactly once. Literal braces are written ``{{`` / ``}}``
    (``str.format``).
    """
    prefix: str = ""
    document: str = "Document [{index}]: {text}"
    separator: str = "\n\n"
    suffix: str = "\n\nQuestion: {question}\nAnswer:"

    def __post_init__(self) -> None:
        for name, slot in (("document", "{text}"), ("suffix", "{question}")):
            value = getattr(self, name)
            if not isinstance(value, str) or _count_field(value, slot[1:-1]) != 1:
                raise SourcesError(f"template {name} must contain {slot} exactly once, got "
                                   f"{value!r}")
        for name in ("prefix", "separator"):
            if not isinstance(getattr(self, name), str):
                raise SourcesError(f"template {name} must be a string")
        for name in ("prefix", "document", "separator", "suffix"):
            fields = _fields(getattr(self, name))
            allowed = {"document": {"text", "id", "index"}, "suffix": {"question"}}.get(name, set())
            if not fields <= allowed:
                raise SourcesError(f"template {name} uses unknown placeholder(s) "
                                   f"{sorted(fields - allowed)}; allowed: {sorted(allowed)}")


def _fields(fmt: str) -> set:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None}
    except ValueError as err:
        raise SourcesError(f"template part {fmt!r} is not a valid format string: {err}") from None


def _count_field(fmt: str, name: str) -> int:
    return sum(1 for _, f, _, _ in string.Formatter().parse(fmt) if f == name)


QA_TEMPLATE = PromptTemplate()
#: the shipped recall model's format: documents ``k4 17``, question ``? k9`` ->
#: ``k4 17 ; k9 42 ; ? k9``
KEY_VALUE_TEMPLATE = PromptTemplate(prefix="", document="{text}", separator=" ; ",
                                    suffix=" ; {question}")
TEMPLATES = {"qa": QA_TEMPLATE, "key-value": KEY_VALUE_TEMPLATE}


@dataclass(frozen=True)
class Segment:
    """A character span ``[start, end)`` of the prompt: a document, or a paragraph, sentence
    or word (``document``: the id of the document it lies in, if any)."""
    id: str
    kind: str
    start: int
    end: int
    text: str
    document: Optional[str] = None


@dataclass
class SourcePrompt:
    """A prompt and where its sources lie in it: ``documents`` (character spans of each
    document's text) and ``question`` (the span of the question, if known)."""
    prompt: str
    documents: List[Segment]
    question: Optional[Tuple[int, int]] = None

    @classmethod
    def from_spans(cls, prompt: str, spans: Union[Mapping[str, Tuple[int, int]],
                                                  Sequence[Tuple[int, int]]],
                   question: Optional[Tuple[int, int]] = None) -> "SourcePrompt":
        """Sources given as character spans of ``prompt``: a mapping ``id -> (start, end)``
        or a list of spans (ids ``"1"``, ``"2"``, ...). Spans must lie in the prompt, be
        non-empty and not overlap."""
        if not isinstance(prompt, str) or not prompt:
            raise SourcesError("prompt must be a non-empty string")
        items = list(spans.items()) if isinstance(spans, Mapping) else \
            [(str(i + 1), s) for i, s in enumerate(spans)]
        if not items:
            raise SourcesError("spans is empty: give at least one (start, end) source span")
        docs = []
        for key, span in items:
            start, end = _check_span(span, len(prompt), f"spans[{key!r}]")
            docs.append(Segment(str(key), "document", start, end, prompt[start:end], str(key)))
        if question is not None:
            question = _check_span(question, len(prompt), "question")
        ordered = sorted(docs, key=lambda s: s.start)
        for a, b in zip(ordered, ordered[1:]):
            if b.start < a.end:
                raise SourcesError(f"source spans {a.id!r} ({a.start}, {a.end}) and {b.id!r} "
                                   f"({b.start}, {b.end}) overlap")
        return cls(prompt, docs, question)

    def segments(self, level: str = "document") -> List[Segment]:
        """The documents (``level="document"``) or their paragraphs, sentences or words, in
        prompt order, with ids ``"<document id>"`` / ``"<document id>:<n>"`` (1-based)."""
        if level not in LEVELS:
            raise SourcesError(f"level must be one of {LEVELS}, got {level!r}")
        if level == "document":
            return list(self.documents)
        out = []
        for doc in self.documents:
            for n, (a, b) in enumerate(_SPLITTERS[level](self.prompt, doc.start, doc.end), 1):
                out.append(Segment(f"{doc.id}:{n}", level, a, b, self.prompt[a:b], doc.id))
        return out


def _check_span(span, length: int, what: str) -> Tuple[int, int]:
    try:
        start, end = (int(v) for v in span)
    except (TypeError, ValueError):
        raise SourcesError(f"{what} must be a (start, end) pair of integers, got {span!r}") from None
    if not 0 <= start < end <= length:
        raise SourcesError(f"{what} = ({start}, {end}) must satisfy 0 <= start < end <= "
                           f"{length} (the prompt's length)")
    return start, end


def _document_items(documents) -> List[Tuple[str, str]]:
    if isinstance(documents, (str, bytes)) or documents is None:
        raise SourcesError("documents must be a list of texts or of {'id': ..., 'text': ...} "
                           f"mappings, got {type(documents).__name__}")
    items = []
    for i, doc in enumerate(documents):
        if isinstance(doc, str):
            key, text = str(i + 1), doc
        elif isinstance(doc, Mapping):
            if "text" not in doc:
                raise SourcesError(f"documents[{i}] has no 'text'")
            text = doc["text"]
            key = doc.get("id", i + 1)
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise SourcesError(f"documents[{i}]['id'] must be a string or an integer, got "
                                   f"{type(key).__name__}")
            key = str(key)
        else:
            raise SourcesError(f"documents[{i}] must be a text or a mapping with 'text', got "
                               f"{type(doc).__name__}")
        if not isinstance(text, str):
            raise SourcesError(f"documents[{i}]['text'] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise SourcesError(f"document {key!r} (documents[{i}]) is empty")
        items.append((key, text))
    if not items:
        raise SourcesError("documents is empty: give at least one document")
    seen = set()
    for i, (key, _) in enumerate(items):
        if key in seen:
            raise SourcesError(f"document id {key!r} occurs more than once (documents[{i}])")
        seen.add(key)
    return items


def build_prompt(documents, question: str, *,
                 template: Union[PromptTemplate, str] = QA_TEMPLATE) -> SourcePrompt:
    """The prompt for ``documents`` (texts, or mappings with ``"text"`` and an optional
    ``"id"``; ids default to ``"1"``, ``"2"``, ...) and ``question``, with each document's
    character span. ``template``: a :class:`PromptTemplate` or a name in :data:`TEMPLATES`
    (``"qa"``, the default: ``Document [1]: ...`` blocks, then ``Question: ...`` and
    ``Answer:``; ``"key-value"``: the shipped recall model's ``k4 17 ; k9 42 ; ? k9``)."""
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise SourcesError(f"template must be a PromptTemplate or one of {sorted(TEMPLATES)}, "
                               f"got {template!r}")
        template = TEMPLATES[template]
    if not isinstance(template, PromptTemplate):
        raise SourcesError(f"template must be a PromptTemplate or a name, got "
                           f"{type(template).__name__}")
    if not isinstance(question, str) or not question.strip():
        raise SourcesError(f"question must be a non-empty string, got {question!r}")
    items = _document_items(documents)
    parts, docs, at = [], [], 0

    def put(piece: str) -> None:
        nonlocal at
        parts.append(piece)
        at += len(piece)

    put(template.prefix.format())
    before, after = template.document.split("{text}", 1)
    for index, (key, text) in enumerate(items, 1):
        if index > 1:
            put(template.separator.format())
        put(before.format(id=key, index=index))
        docs.append(Segment(key, "document", at, at + len(text), text, key))
        put(text)
        put(after.format(id=key, index=index))
    q_before, q_after = template.suffix.split("{question}", 1)
    put(q_before.format())
    q_span = (at, at + len(question))
    put(question)
    put(q_after.format())
    return SourcePrompt("".join(parts), docs, q_span)


# ----------------------------------------------------------------------------- aggregation

def token_spans(matrix: RelevanceMatrix) -> List[Tuple[int, int]]:
    """The character span of each token in ``matrix.text`` (``matrix.offsets``; without them,
    the display tokens when they concatenate to the text). Special tokens have empty spans."""
    if matrix.offsets is not None:
        return [(0, 0) if o is None else (int(o[0]), int(o[1])) for o in matrix.offsets]
    if "".join(matrix.tokens) == matrix.text:
        spans, at = [], 0
        for tok in matrix.tokens:
            spans.append((at, at + len(tok)))
            at += len(tok)
        return spans
    raise SourcesError("the relevance matrix has no character offsets (a slow tokenizer?) and "
                       "its tokens do not spell its text; use a fast tokenizer")


def _owners(spans: Sequence[Tuple[int, int]], segments: Sequence[Tuple[int, int]],
            tokens: range) -> torch.Tensor:
    """For each token (only those in ``tokens``; others get -1), the index of the segment its
    span overlaps most (-1: none; the first on a tie). ``segments`` sorted by start, disjoint."""
    owner = [-1] * len(spans)
    starts = [s for s, _ in segments]
    for t in tokens:
        a, b = spans[t]
        if b <= a:
            continue
        j = max(0, bisect.bisect_right(starts, a) - 1)
        best, best_len = -1, 0
        while j < len(segments) and segments[j][0] < b:
            overlap = min(b, segments[j][1]) - max(a, segments[j][0])
            if overlap > best_len:
                best, best_len = j, overlap
            j += 1
        owner[t] = best
    return torch.tensor(owner, dtype=torch.long)


def _segment_owner(matrix: RelevanceMatrix, segments: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """Owner of each token of ``matrix`` among ``segments`` (any order, disjoint), as an index
    into ``segments``; ``len(segments)`` for a token owned by none and for every answer token
    (answer tokens are never a source)."""
    order = sorted(range(len(segments)), key=lambda i: segments[i][0])
    ordered = [(int(segments[i][0]), int(segments[i][1])) for i in order]
    for (a0, b0), (a1, b1) in zip(ordered, ordered[1:]):
        if a1 < b0:
            raise SourcesError(f"segments ({a0}, {b0}) and ({a1}, {b1}) overlap")
    owner = _owners(token_spans(matrix), ordered, range(matrix.prompt_length))
    lookup = torch.tensor(order + [len(segments)], dtype=torch.long)
    return lookup[torch.where(owner >= 0, owner, len(segments))]


def _sum_by_owner(token_rel: torch.Tensor, owner: torch.Tensor, n_segments: int) -> torch.Tensor:
    """``[R, N]`` token relevance -> ``[R, n_segments]`` (the unowned column dropped)."""
    out = torch.zeros(token_rel.shape[0], n_segments + 1, dtype=token_rel.dtype)
    out.index_add_(1, owner, token_rel)
    return out[:, :n_segments]


def aggregate(matrix: RelevanceMatrix, segments: Sequence[Tuple[int, int]],
              rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Relevance of each character span of ``matrix.text`` (``segments``: disjoint
    ``(start, end)`` pairs, any order) for each matrix row (or only ``rows``): ``[K, S]``
    float64, the sum of the relevance of the prompt tokens each span owns (module docstring).
    Answer tokens are never a source."""
    owner = _segment_owner(matrix, segments)
    rel = matrix.relevance.double() if rows is None else matrix.relevance[list(rows)].double()
    return _sum_by_owner(rel, owner, len(segments))


@dataclass(frozen=True)
class AnswerSentence:
    """One sentence of the answer: its text, its character span in ``matrix.text`` and the
    matrix rows (answer tokens) it holds."""
    index: int
    text: str
    start: int
    end: int
    rows: List[int]


def answer_sentences(matrix: RelevanceMatrix,
                     spans: Optional[Sequence[Tuple[int, int]]] = None) -> List[AnswerSentence]:
    """The answer (the continuation part of ``matrix.text``) split into sentences
    (:func:`split_sentences`), or into the given character ``spans`` of ``matrix.text``.
    Each answer token goes to the sentence it overlaps most; with the default split, a token
    overlapping none (whitespace, an end-of-sequence token with an empty span) joins the
    sentence before it (the first one if there is none); with explicit ``spans`` it is left
    out."""
    tspans = token_spans(matrix)
    p, n = matrix.prompt_length, len(matrix.token_ids)
    starts = [a for a, b in tspans[p:] if b > a]
    answer_start = min(starts) if starts else len(matrix.text)
    if spans is None:
        sent_spans = split_sentences(matrix.text, answer_start, len(matrix.text))
        fill = True
    else:
        sent_spans = sorted(_check_span(s, len(matrix.text), "answer span") for s in spans)
        fill = False
    if not sent_spans:  # an answer of whitespace or special tokens only: one sentence
        sent_spans, fill = [(answer_start, len(matrix.text))], True
    owner = _owners(tspans, sent_spans, range(p, n))
    rows: List[List[int]] = [[] for _ in sent_spans]
    last = 0
    for t in range(p, n):
        j = int(owner[t])
        if j >= 0:
            rows[j].append(t - p)
            last = j
        elif fill:
            rows[last].append(t - p)
    return [AnswerSentence(i, matrix.text[a:b], a, b, r)
            for i, ((a, b), r) in enumerate(zip(sent_spans, rows)) if r]


# ----------------------------------------------------------------------------- report

@dataclass
class Source:
    """A segment's relevance for one answer sentence and its share (module docstring)."""
    id: str
    kind: str
    text: str
    start: int
    end: int
    relevance: float
    share: float
    document: Optional[str] = None


@dataclass
class SentenceSources:
    """The sources of one answer sentence, most relevant first (``sources``: every segment;
    ``top``: the first ``k`` with positive relevance), the sentence's ``total`` absolute
    token relevance and the shares of what is not a source (``other``: ``question``,
    ``answer`` (earlier answer tokens), ``rest`` (template text, special tokens))."""
    sentence: AnswerSentence
    sources: List[Source]
    top: List[Source]
    total: float
    other: Dict[str, float]


@dataclass
class SourceReport:
    """Per answer sentence, its sources: see :func:`attribute_sources`."""
    prompt: str
    answer: str
    level: str
    sentences: List[SentenceSources]
    matrix: RelevanceMatrix
    segments: List[Segment]
    documents: List[Segment] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (JSON-ready); the relevance matrix is not included (``matrix.to_dict()``)."""
        def src(s: Source) -> Dict[str, Any]:
            return {"id": s.id, "kind": s.kind, "document": s.document, "start": s.start,
                    "end": s.end, "text": s.text, "relevance": s.relevance, "share": s.share}
        return {
            "prompt": self.prompt, "answer": self.answer, "level": self.level,
            "rules": self.matrix.rules,
            "documents": [{"id": d.id, "start": d.start, "end": d.end} for d in self.documents],
            "sentences": [{"index": s.sentence.index, "text": s.sentence.text,
                           "start": s.sentence.start, "end": s.sentence.end,
                           "rows": s.sentence.rows, "total": s.total, "other": s.other,
                           "top": [src(x) for x in s.top],
                           "sources": [src(x) for x in s.sources]}
                          for s in self.sentences]}

    def to_json(self, path: Optional[str] = None) -> str:
        """JSON of :meth:`to_dict`; written to ``path`` when given."""
        text = json.dumps(self.to_dict(), ensure_ascii=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    CSV_COLUMNS = ("sentence", "sentence_text", "rank", "source", "kind", "document",
                   "relevance", "share", "source_text")

    def to_csv(self, path: Optional[str] = None, *, all_sources: bool = False) -> str:
        """One row per (answer sentence, source): the ``top`` sources (every segment with
        ``all_sources=True``), ranked from 1; written to ``path`` when given."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.CSV_COLUMNS)
        for s in self.sentences:
            for rank, x in enumerate(s.sources if all_sources else s.top, 1):
                w.writerow([s.sentence.index, s.sentence.text, rank, x.id, x.kind,
                            x.document or "", f"{x.relevance:.6g}", f"{x.share:.6g}", x.text])
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        return text

    def format(self, width: int = 60) -> str:
        """Readable text: each answer sentence, then its top sources with their shares."""
        lines = []
        for s in self.sentences:
            lines.append(f"[{s.sentence.index + 1}] {s.sentence.text.strip()!r}")
            if not s.top:
                lines.append("    no source with positive relevance")
            for x in s.top:
                text = " ".join(x.text.split())
                text = text if len(text) <= width else text[:width - 3] + "..."
                lines.append(f"    {x.share:6.1%}  {x.id:<10} {text!r}")
            other = ", ".join(f"{k} {v:.1%}" for k, v in s.other.items())
            lines.append(f"    (other: {other})")
        return "\n".join(lines)


def attribute_sources(matrix: RelevanceMatrix, sources: SourcePrompt, *,
                      level: str = "document", top: int = 3,
                      answer_spans: Optional[Sequence[Tuple[int, int]]] = None) -> SourceReport:
    """Per answer sentence of ``matrix`` (:func:`answer_sentences`; ``answer_spans``: your
    own character spans of ``matrix.text`` instead), the relevance and share of every source
    segment of ``sources`` at ``level`` (``"document"``, ``"paragraph"``, ``"sentence"``,
    ``"word"``), and the ``top`` most relevant ones with positive relevance.
    ``matrix.text`` must start with ``sources.prompt`` (as ``explain_matrix`` makes it)."""
    if not isinstance(matrix, RelevanceMatrix):
        raise SourcesError(f"matrix must be a RelevanceMatrix, got {type(matrix).__name__}")
    if not isinstance(sources, SourcePrompt):
        raise SourcesError(f"sources must be a SourcePrompt (build_prompt or "
                           f"SourcePrompt.from_spans), got {type(sources).__name__}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise SourcesError(f"top must be an integer >= 0, got {top!r}")
    if not matrix.text.startswith(sources.prompt):
        raise SourcesError("the matrix was not computed for this prompt: matrix.text does not "
                           "start with sources.prompt")
    segs = sources.segments(level)
    p = matrix.prompt_length
    sentences = answer_sentences(matrix, answer_spans)
    rel = matrix.relevance.double()
    # [sentences, N]: each token's relevance for each answer sentence (sum of its rows)
    token_rel = torch.stack([rel[s.rows].sum(0) for s in sentences]) if sentences else \
        rel[:0]
    seg_rel = _sum_by_owner(token_rel, _segment_owner(matrix, [(s.start, s.end) for s in segs]),
                            len(segs))
    q_span = [sources.question] if sources.question else []
    q_rel = _sum_by_owner(token_rel, _segment_owner(matrix, q_span), len(q_span)).sum(1)
    doc_spans = [(d.start, d.end) for d in sources.documents]
    doc_rel = _sum_by_owner(token_rel, _segment_owner(matrix, doc_spans), len(doc_spans)).sum(1)
    out = []
    for i, sent in enumerate(sentences):
        total = float(token_rel[i].abs().sum())

        def share(r: float) -> float:
            return r / total if total > 0 else 0.0
        items = [Source(s.id, s.kind, s.text, s.start, s.end, float(r), share(float(r)),
                        s.document) for s, r in zip(segs, seg_rel[i].tolist())]
        items.sort(key=lambda x: -x.relevance)
        # "rest": prompt tokens in neither a document nor the question (template, <bos>)
        rest = float(token_rel[i, :p].sum() - doc_rel[i] - q_rel[i])
        out.append(SentenceSources(
            sentence=sent, sources=items, top=[x for x in items if x.relevance > 0][:top],
            total=total, other={"question": share(float(q_rel[i])),
                                "answer": share(float(token_rel[i, p:].sum())),
                                "rest": share(rest)}))
    answer = matrix.text[len(sources.prompt):]
    return SourceReport(sources.prompt, answer, level, out, matrix, segs, list(sources.documents))


def explain_sources(model, tokenizer, documents, question: str, *,
                    answer: Optional[str] = None, generate: Optional[int] = None,
                    template: Union[PromptTemplate, str] = QA_TEMPLATE,
                    level: str = "document", top: int = 3, **options) -> SourceReport:
    """Build the prompt (:func:`build_prompt`), explain the ``answer`` (a given text, appended
    to the prompt as it is: start it with a space after ``"Answer:"``) or ``generate``
    greedily generated tokens with
    :func:`~lrp_kernels.explanations.matrix.explain_matrix` (``options``: its ``rules``,
    ``epsilon``, ``backend``, ``max_length``, ``memory_budget``, ``progress``, ``strict``),
    and attribute each answer sentence to its sources (:func:`attribute_sources`). The
    relevance matrix is ``report.matrix``; ``viewer.write_viewer(report, path)`` shows it."""
    from .matrix import explain_matrix
    sp = build_prompt(documents, question, template=template)
    matrix = explain_matrix(model, tokenizer, sp.prompt, continuation=answer, generate=generate,
                            **options)
    return attribute_sources(matrix, sp, level=level, top=top)
