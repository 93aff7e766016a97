"""Input records of :func:`~lrp_kernels.explanations.batch.explain_dataset`: one JSON object per
line, checked field by field, every problem reported with its line number.

A line::

    {"id": "q17", "prompt": "k4 17 ; k9 42 ; ? k9", "target": "42", "contrast": "17"}

* ``prompt`` (required): a non-empty string.
* ``id``: a string or an integer, unique in the file; default: the line number (1-based).
  Resuming matches ids as text, so ``7`` and ``"7"`` are the same id (a duplicate).
* ``target``, ``contrast``: a token string (``"42"``) or a token **id** (the JSON integer
  ``42``); ``continuation``: a non-empty string (the sum of its tokens' logits is explained;
  not together with ``target``). Their meaning is :func:`~lrp_kernels.explanations.api.explain`'s.
* ``meta``: any JSON value, copied to the output line unchanged (labels, sources, ...).

Any other field is a mistake (a misspelt ``contrast`` would otherwise be silently ignored).
Blank lines are skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Tuple, Union

FIELDS = ("id", "prompt", "target", "continuation", "contrast", "meta")


@dataclass(frozen=True)
class Record:
    """One checked input line: ``line`` is its 1-based line number (or list position + 1)."""
    line: int
    id: Union[str, int]
    prompt: str
    target: Optional[Union[str, int]] = None
    continuation: Optional[str] = None
    contrast: Optional[Union[str, int]] = None
    meta: Any = None

    @property
    def key(self) -> str:
        """The id as text: what resuming and the merge match on."""
        return record_key(self.id)


@dataclass(frozen=True)
class Problem:
    """A line that cannot be explained: its number and why."""
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def record_key(record_id: Union[str, int]) -> str:
    return str(record_id)


def _token_field(obj: dict, name: str) -> Optional[str]:
    """The problem with a ``target`` / ``contrast`` value, or None."""
    value = obj.get(name)
    if value is None or (isinstance(value, str) and value) or \
            (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return None
    return (f"{name!r} must be a token string or a token id (an integer >= 0), "
            f"got {json.dumps(value)}")


def check_object(obj: Any, line: int) -> Tuple[Optional[Record], Optional[Problem]]:
    """A :class:`Record` from one parsed JSON value, or the :class:`Problem` with it."""
    def bad(message: str):
        return None, Problem(line, message)

    if not isinstance(obj, dict):
        return bad(f"expected a JSON object, got {type(obj).__name__ if obj is not None else 'null'}")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        return bad(f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    if "prompt" not in obj:
        return bad("no 'prompt'")
    prompt = obj["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        return bad(f"'prompt' must be a non-empty string, got {json.dumps(prompt)[:60]}")
    rid = obj.get("id", line)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        return bad(f"'id' must be a non-empty string or an integer, got {json.dumps(rid)[:60]}")
    for name in ("target", "contrast"):
        problem = _token_field(obj, name)
        if problem:
            return bad(problem)
    cont = obj.get("continuation")
    if cont is not None and (not isinstance(cont, str) or not cont.strip()):
        return bad(f"'continuation' must be a non-empty string, got {json.dumps(cont)[:60]}")
    if cont is not None and obj.get("target") is not None:
        return bad("give either 'target' or 'continuation', not both")
    return Record(line=line, id=rid, prompt=prompt, target=obj.get("target"),
                  continuation=cont, contrast=obj.get("contrast"), meta=obj.get("meta")), None


def _dedupe(records: List[Record], problems: List[Problem]) -> List[Record]:
    first = {}
    kept = []
    for r in records:
        if r.key in first:
            problems.append(Problem(r.line, f"duplicate id {json.dumps(r.id)} (first on line "
                                            f"{first[r.key]})"))
            continue
        first[r.key] = r.line
        kept.append(r)
    return kept


def parse_lines(lines: Iterable[Union[str, bytes]]) -> Tuple[List[Record], List[Problem]]:
    """Records and problems (in line order) from the lines of a JSONL text."""
    records, problems = [], []
    for n, raw in enumerate(lines, 1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.append(Problem(n, f"not UTF-8 text (byte {err.start})"))
                continue
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            problems.append(Problem(n, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        record, problem = check_object(obj, n)
        (records.append(record) if record else problems.append(problem))
    records = _dedupe(records, problems)
    problems.sort(key=lambda p: p.line)
    return records, problems


def read_records(path: str) -> Tuple[List[Record], List[Problem]]:
    """The records of a JSONL file and the problems of its malformed lines."""
    with open(path, "rb") as f:
        return parse_lines(f.read().split(b"\n"))


def records_from_objects(objects: Iterable[Any]) -> Tuple[List[Record], List[Problem]]:
    """Records from already-parsed objects (dicts); ``line`` is the position + 1."""
    records, problems = [], []
    for n, obj in enumerate(objects, 1):
        record, problem = check_object(obj, n)
        (records.append(record) if record else problems.append(problem))
    records = _dedupe(records, problems)
    problems.sort(key=lambda p: p.line)
    return records, problems
