"""Output files of :func:`~lrp_kernels.explanations.batch.explain_dataset`: durable appends,
resuming, and the merge into one ordered file (JSONL or Parquet).

Why it survives interrupts: results are only ever *appended*, one batch per ``write`` followed
by ``flush`` and ``fsync``, and every line ends with ``\\n``. A hard kill in the middle of a write
can only leave an unterminated last line; :func:`scan` finds it and the owner truncates it before
appending again. Whole lines are never rewritten in place: the final ordering (and Parquet)
is written to a temporary file that replaces the output in one ``os.replace``.

Files for an output ``OUT``:

* JSONL, one process: ``OUT`` itself is appended to, then reordered by input line at the end;
* Parquet, or several processes: each rank appends to ``OUT.rank<R>.part.jsonl``; the merge
  (rank 0 after the others finished, or the next run) writes ``OUT`` and deletes the parts.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

from .records import record_key

FORMATS = ("jsonl", "parquet")


class OutputFileError(ValueError):
    """An output file that this pipeline cannot continue (not written by it, other rules)."""


@dataclass
class Scan:
    """What an output (or part) file already holds."""
    keys: Set[str] = field(default_factory=set)
    rules: Set[str] = field(default_factory=set)
    good_bytes: int = 0        # length of the complete lines
    partial_bytes: int = 0     # an unterminated last line left by a hard kill


def format_for(path: str, fmt: Optional[str]) -> str:
    """``fmt`` when given, else ``parquet`` for a ``.parquet`` / ``.pq`` path, else ``jsonl``."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        return fmt
    return "parquet" if path.lower().endswith((".parquet", ".pq")) else "jsonl"


def require_pyarrow():
    """The ``pyarrow.parquet`` module, or an ImportError that says how to get it."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("Parquet output needs pyarrow (pip install pyarrow); "
                          "or write JSONL (an .jsonl output path)") from None
    return pq


def part_path(out: str, rank: int) -> str:
    return f"{out}.rank{rank}.part.jsonl"


def part_paths(out: str) -> List[str]:
    """Every rank's part file of ``out`` that exists, by rank (any earlier world size too)."""
    found = glob.glob(glob.escape(out) + ".rank*.part.jsonl")
    pattern = re.compile(re.escape(out) + r"\.rank(\d+)\.part\.jsonl$")
    ranked = [(int(m.group(1)), p) for p in found if (m := pattern.match(p))]
    return [p for _, p in sorted(ranked)]


def encode_row(row: dict) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def _split_lines(data: bytes) -> Tuple[List[bytes], int]:
    """Complete lines (with their ``\\n``) and the length of an unterminated tail."""
    end = data.rfind(b"\n") + 1
    return data[:end].splitlines(keepends=True), len(data) - end


def scan_jsonl(path: str) -> Scan:
    """Ids and rules of the complete lines of a JSONL output; the partial tail is measured, not
    read. A complete line that is not one of ours is an error (never overwritten)."""
    scan = Scan()
    if not os.path.exists(path):
        return scan
    with open(path, "rb") as f:
        data = f.read()
    lines, scan.partial_bytes = _split_lines(data)
    scan.good_bytes = len(data) - scan.partial_bytes
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, rules = record_key(row["id"]), row["rules"]
        except (ValueError, KeyError, TypeError):
            raise OutputFileError(f"{path} line {n} is not an explanation written by "
                                  "lrp-kernels batch; give another output path") from None
        scan.keys.add(key)
        scan.rules.add(rules)
    return scan


def scan_parquet(path: str) -> Scan:
    scan = Scan()
    if not os.path.exists(path):
        return scan
    pq = require_pyarrow()
    try:
        table = pq.read_table(path, columns=["id", "rules"])
    except Exception as err:  # pyarrow raises several types for a foreign or broken file
        raise OutputFileError(f"{path} is not a Parquet file written by lrp-kernels batch "
                              f"({str(err).splitlines()[0]})") from None
    scan.keys.update(record_key(k) for k in table.column("id").to_pylist())
    scan.rules.update(table.column("rules").to_pylist())
    return scan


def scan(path: str, fmt: str = "jsonl") -> Scan:
    return scan_parquet(path) if fmt == "parquet" else scan_jsonl(path)


def drop_partial_line(path: str, found: Scan) -> int:
    """Truncate the unterminated last line a hard kill left (only the file's owner calls this);
    returns the number of bytes dropped."""
    if found.partial_bytes:
        os.truncate(path, found.good_bytes)
    return found.partial_bytes


def append_batch(f, rows: List[dict]) -> None:
    """One write for the whole batch, then flush and fsync: after a crash the batch is either
    on disk or (at worst) an unterminated last line that the next run drops."""
    f.write(b"".join(encode_row(r) for r in rows))
    f.flush()
    os.fsync(f.fileno())


def _replace_atomically(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable (not possible on every platform)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _jsonl_rows(path: str) -> List[Tuple[str, bytes]]:
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines, _ = _split_lines(f.read())
    return [(record_key(json.loads(line)["id"]), line) for line in lines if line.strip()]


# ---- Parquet: one explicit schema, so that an all-null column (no foil anywhere) and the id
# (text, as resuming matches it) have the same type in every file -------------------------------

def _parquet_schema():
    import pyarrow as pa
    target = pa.struct([("ids", pa.list_(pa.int64())), ("text", pa.string()),
                        ("logit", pa.float64()), ("probability", pa.float64()),
                        ("foil_id", pa.int64()), ("foil_text", pa.string())])
    return pa.schema([("id", pa.string()), ("prompt", pa.string()), ("rules", pa.string()),
                      ("tokens", pa.list_(pa.string())), ("token_ids", pa.list_(pa.int64())),
                      ("relevance", pa.list_(pa.float64())), ("target", target),
                      ("objective", pa.string()), ("padding_relevance", pa.float64()),
                      ("meta", pa.string())])


def _parquet_row(row: dict) -> dict:
    """A JSONL row in the Parquet schema: id as text, ``meta`` as its JSON text."""
    out = dict(row)
    out["id"] = record_key(row["id"])
    out["meta"] = None if row.get("meta") is None else json.dumps(row["meta"], ensure_ascii=False)
    return out


def read_parquet_rows(path: str) -> List[dict]:
    """The rows of a Parquet output as dicts (``meta`` decoded back from its JSON text)."""
    pq = require_pyarrow()
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row["meta"] = None if row["meta"] is None else json.loads(row["meta"])
        if row["meta"] is None:
            del row["meta"]
    return rows


def merge(out: str, fmt: str, order: Dict[str, int], parts: List[str]) -> int:
    """Write ``out`` as one file: its own rows then the parts' (first occurrence of an id wins),
    ordered by ``order`` (id -> input position; ids not in it keep their order, at the end).
    Deletes the parts afterwards. Returns the number of rows."""
    if fmt == "parquet":
        rows = [(r["id"], _parquet_row(r)) for r in
                (read_parquet_rows(out) if os.path.exists(out) else [])]
        for p in parts:
            rows += [(k, _parquet_row(json.loads(line))) for k, line in _jsonl_rows(p)]
    else:
        rows = _jsonl_rows(out)
        for p in parts:
            rows += _jsonl_rows(p) if p != out else []
    seen, unique = set(), []
    for key, row in rows:
        if key not in seen:
            seen.add(key)
            unique.append((key, row))
    last = len(order)
    unique = [row for _, _, row in sorted(
        ((order.get(key, last), i, row) for i, (key, row) in enumerate(unique)),
        key=lambda t: (t[0], t[1]))]

    if fmt == "parquet":
        pq = require_pyarrow()
        import pyarrow as pa
        table = pa.Table.from_pylist(unique, schema=_parquet_schema())
        _replace_atomically(out, lambda tmp: pq.write_table(table, tmp))
    else:
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(b"".join(unique))
        _replace_atomically(out, write)
    for p in parts:
        if p != out and os.path.exists(p):
            os.remove(p)
    return len(unique)
