"""Explain a whole dataset: length buckets under a token budget, durable and resumable output,
data-parallel over processes.

::

    from lrp_kernels.explanations.batch import explain_dataset
    report = explain_dataset(model, tok, "prompts.jsonl", "relevance.jsonl")

Input: one JSON object per line (:mod:`~lrp_kernels.explanations.records`: ``prompt``, optional
``id``, ``target``, ``continuation``, ``contrast``, ``meta``). Output: one line per record,
``{"id": ..., **Explanation.to_dict()}`` (tokens, token ids, relevance per token, the target
with its logit and probability, the rules), in input order once the run completes.

How it is computed: every batch is one call of :func:`~lrp_kernels.explanations.api.explain`
with a list of prompts (one left-padded forward and one backward), so a record gets what
``explain`` gives it alone up to float32 rounding (padding only changes the summation order).
``explain`` takes one continuation and one contrast per call, so records are grouped by
``(continuation, contrast)`` first; targets vary freely within a batch. The model is patched
once for the whole run.

Buckets and the memory budget: within a group records are sorted by length (prompt tokens plus
continuation tokens but the last) and cut greedily into batches whose *padded* size
``batch x longest`` stays within ``max_tokens`` (and at most ``max_batch_size`` records); a
record longer than ``max_tokens`` runs alone. The memory an explanation keeps between forward
and backward is linear in the padded tokens: for a Llama-like decoder under the patch, autograd
saves ``max_tokens x layers x (9 x hidden + 2 x intermediate)`` elements (measured on two random
Llamas, the same for every batch shape: ``benchmarks/bench_batch.py --memory-model``), plus the
backward's transient gradients, plus with eager attention ``batch x heads x width^2`` scores per
layer (SDPA and the chunked exact path do not store them).
Batches run longest first, so a budget that is too large fails in the first seconds.

Resuming: ids already in the output are skipped. The batch plan is a function of the input and
the options only, and a batch with some records already written is recomputed whole (only the
missing records are written), so an interrupted and resumed run writes exactly the numbers of
an uninterrupted one.

Data-parallel: under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE > 1``) rank ``r``
takes batches ``r, r + W, r + 2W, ...`` of the same plan (so every record is computed in the
same batch as in one process) and appends to its own part file; after a barrier rank 0 merges
the parts into the output. ``shard=(r, W)`` does the same for independent jobs (no
``torch.distributed``; array jobs on a cluster): each writes its part, and one more run without
a shard merges them.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import batch_store as store
from .api import (ExplainError, _check_options, _context_limit, explain, resolve_token,
                  _patch_context)
from .records import Problem, Record, read_records, records_from_objects

__all__ = ["explain_dataset", "plan_batches", "Batch", "BatchReport", "BatchError",
           "DEFAULT_MAX_TOKENS", "DEFAULT_MAX_BATCH_SIZE"]

DEFAULT_MAX_TOKENS = 2048
DEFAULT_MAX_BATCH_SIZE = 64


class BatchError(ExplainError):
    """A dataset that cannot be explained as asked: a malformed line with ``strict=True``, an
    output file of another run, a bad option."""


@dataclass
class Batch:
    """Records explained by one ``explain`` call (same continuation and contrast)."""
    records: List[Record]
    width: int                       # padded length: the longest record's tokens
    continuation: Optional[str] = None
    contrast: Optional[Union[str, int]] = None

    @property
    def padded_tokens(self) -> int:
        return len(self.records) * self.width


@dataclass
class BatchReport:
    """What one run did (per process under data parallelism)."""
    out: str
    written: int = 0                 # records explained and appended in this run
    already_done: int = 0            # records skipped: their ids were in the output
    malformed: List[Problem] = field(default_factory=list)   # input lines skipped
    failed: List[Problem] = field(default_factory=list)      # refused by explain, not written
    batches: int = 0
    seconds: float = 0.0
    dropped_partial_bytes: int = 0   # an unterminated line of a killed run, removed
    merged_rows: Optional[int] = None  # rows of the output after the merge (None: no merge)
    rank: int = 0
    world_size: int = 1

    @property
    def examples_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------- planning

def plan_batches(records: Sequence[Record], lengths: Sequence[int], *,
                 max_tokens: int = DEFAULT_MAX_TOKENS,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> List[Batch]:
    """Padding-aware buckets: per ``(continuation, contrast)`` group, records sorted by length
    (ties by input order) and cut so that ``len(batch) * longest <= max_tokens`` (a longer
    record alone) and ``len(batch) <= max_batch_size``; longest batches first."""
    groups: Dict[tuple, List[Tuple[int, int, Record]]] = {}
    for i, (r, n) in enumerate(zip(records, lengths)):
        key = (r.continuation, type(r.contrast).__name__, r.contrast)
        groups.setdefault(key, []).append((n, i, r))
    batches: List[Batch] = []
    for members in groups.values():
        members.sort(key=lambda t: (t[0], t[1]))
        current: List[Record] = []
        width = 0
        for n, _, r in members:
            if current and ((len(current) + 1) * max(width, n) > max_tokens
                            or len(current) >= max_batch_size):
                batches.append(Batch(current, width, current[0].continuation, current[0].contrast))
                current, width = [], 0
            current.append(r)
            width = max(width, n)
        if current:
            batches.append(Batch(current, width, current[0].continuation, current[0].contrast))
    # stable: equal widths keep group and length order
    return sorted(batches, key=lambda b: -b.width)


def _check_with_model(records: List[Record], model, tokenizer, max_length: Optional[int]
                      ) -> Tuple[List[Record], List[int], List[Problem]]:
    """What only the tokenizer and model can tell, per record and before any work: tokens,
    context length, single-token targets and foils (``explain``'s own resolution)."""
    limit = _context_limit(model, max_length)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    cont_len: Dict[str, int] = {}
    ok, lengths, problems = [], [], []
    for r in records:
        try:
            ids = tokenizer(r.prompt)["input_ids"]
            if not ids or all(t in special for t in ids):
                raise ExplainError("the prompt has no tokens after tokenization")
            extra = 0
            if r.continuation is not None:
                if r.continuation not in cont_len:
                    cont_len[r.continuation] = len(tokenizer(r.continuation,
                                                             add_special_tokens=False)["input_ids"])
                if cont_len[r.continuation] == 0:
                    raise ExplainError("'continuation' is empty after tokenization")
                extra = cont_len[r.continuation] - 1
            n = len(ids) + extra
            if limit is not None and n > limit:
                raise ExplainError(f"the prompt has {n} tokens"
                                   f"{' with the continuation' if extra else ''}, more than the "
                                   f"limit of {limit} (the model's context or max_length)")
            target = None if r.target is None else resolve_token(tokenizer, r.target, "target")
            if r.contrast is not None:
                foil = resolve_token(tokenizer, r.contrast, "contrast")
                if foil == target:
                    raise ExplainError("'contrast' is the target token itself: the explained "
                                       "difference is 0")
        except ExplainError as err:
            problems.append(Problem(r.line, str(err)))
            continue
        ok.append(r)
        lengths.append(n)
    return ok, lengths, problems


# ---------------------------------------------------------------------------- processes

def _process_group(model, distributed: Optional[bool], shard: Optional[Tuple[int, int]]
                   ) -> Tuple[int, int, Optional[Callable[[], None]]]:
    """``(rank, world_size, barrier)``; barrier is None when the ranks cannot wait for each
    other (independent shards), which also means nobody merges."""
    if shard is not None:
        if distributed:
            raise BatchError("give either shard= or distributed=True, not both")
        rank, world = shard
        if not (isinstance(rank, int) and isinstance(world, int) and 0 <= rank < world):
            raise BatchError(f"shard must be (rank, world_size) with 0 <= rank < world_size, "
                             f"got {shard!r}")
        return rank, world, (lambda: None) if world == 1 else None
    if distributed is None:
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:
        return 0, 1, lambda: None
    from accelerate import PartialState
    on_cpu = next(model.parameters()).device.type == "cpu"
    state = PartialState(cpu=on_cpu)  # gloo on CPU, the accelerator's backend otherwise
    return state.process_index, state.num_processes, state.wait_for_everyone


class _Interrupts:
    """Ctrl-C and SIGTERM become KeyboardInterrupt between batches, never inside the write of
    one (a signal that arrives while a batch is written is raised right after it)."""

    def __init__(self):
        self.writing = False
        self.pending = False
        self.saved = {}

    def _handle(self, signum, frame):
        if self.writing:
            self.pending = True
            return
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    @contextlib.contextmanager
    def write(self):
        self.writing = True
        try:
            yield
        finally:
            self.writing = False
        if self.pending:
            raise KeyboardInterrupt


# ---------------------------------------------------------------------------- the run

def _row(record: Record, exp) -> dict:
    row = {"id": record.id, **exp.to_dict()}
    if record.meta is not None:
        row["meta"] = record.meta
    return row


def _explain_rows(model, tokenizer, batch: Batch, opts: dict, failed: List[Problem]
                  ) -> List[Tuple[Record, dict]]:
    """One ``explain`` call for the batch; when it refuses (a record whose foil is its own
    predicted token, say) each record alone, so only the offending ones are lost."""
    prompts = [r.prompt for r in batch.records]
    targets = [r.target for r in batch.records]
    kw = dict(continuation=batch.continuation, contrast=batch.contrast, **opts)
    try:
        exps = explain(model, tokenizer, prompts,
                       None if all(t is None for t in targets) else targets, **kw)
        return [(r, _row(r, e)) for r, e in zip(batch.records, exps)]
    except ExplainError as err:
        if len(batch.records) == 1:
            failed.append(Problem(batch.records[0].line, f"id {batch.records[0].id!r}: {err}"))
            return []
    rows = []
    for r in batch.records:
        try:
            rows.append((r, _row(r, explain(model, tokenizer, r.prompt, r.target, **kw))))
        except ExplainError as err:
            failed.append(Problem(r.line, f"id {r.id!r}: {err}"))
    return rows


def _load_records(records) -> Tuple[List[Record], List[Problem]]:
    if isinstance(records, (str, os.PathLike)):
        path = os.fspath(records)
        if not os.path.isfile(path):
            raise BatchError(f"records {path!r}: no such file")
        return read_records(path)
    if isinstance(records, (bytes, dict)):
        raise BatchError("records must be a JSONL path or an iterable of dicts, "
                         f"got {type(records).__name__}")
    return records_from_objects(records)


def _strict_error(problems: List[Problem], what: str) -> BatchError:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return BatchError(f"{what} {problems[0]}{more} (strict mode; otherwise skipped and counted)")


def explain_dataset(model, tokenizer, records: Union[str, os.PathLike, Iterable[dict]],
                    out: Union[str, os.PathLike], *, rules: str = "attnlrp",
                    epsilon: Optional[float] = None, backend: Optional[str] = None,
                    max_length: Optional[int] = None, patch_strict: bool = True,
                    max_tokens: int = DEFAULT_MAX_TOKENS,
                    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, format: Optional[str] = None,
                    strict: bool = False, progress: bool = True,
                    distributed: Optional[bool] = None,
                    shard: Optional[Tuple[int, int]] = None) -> BatchReport:
    """Explain every record and append the results to ``out``; resumable (see the module text).

    ``records``: a JSONL path or an iterable of dicts (fields of
    :mod:`~lrp_kernels.explanations.records`). ``out``: the output path; ``format``
    ``"jsonl"`` or ``"parquet"`` (default: by extension, ``.parquet`` / ``.pq``; Parquet needs
    ``pyarrow``). ``rules``, ``epsilon``, ``backend``, ``max_length`` and ``patch_strict``
    (``explain``'s ``strict``) are :func:`~lrp_kernels.explanations.api.explain`'s.
    ``max_tokens`` / ``max_batch_size``: the bucket budget. ``strict=True``: a malformed line or
    a record ``explain`` refuses is a :class:`BatchError` (before any work for input lines);
    otherwise they are skipped and listed in the report. ``progress``: a tqdm bar on stderr
    (rate, ETA) on rank 0. ``distributed``: default: when ``WORLD_SIZE > 1`` (launched by
    ``accelerate launch`` / ``torchrun``). ``shard=(rank, world_size)``: this job's share
    without a process group (merge: run once more without ``shard``).

    Returns a :class:`BatchReport`. The model's parameters and ``requires_grad`` are left as
    they were; an interrupt (``KeyboardInterrupt``, SIGTERM) loses at most the batch in flight.
    """
    for name, value in (("max_tokens", max_tokens), ("max_batch_size", max_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BatchError(f"{name} must be a positive integer, got {value!r}")
    _check_options(rules, epsilon, max_length, patch_strict)
    out = os.fspath(out)
    try:
        fmt = store.format_for(out, format)
    except ValueError as err:
        raise BatchError(str(err)) from None
    if fmt == "parquet":
        store.require_pyarrow()
    recs, malformed = _load_records(records)
    if strict and malformed:
        raise _strict_error(malformed, "malformed input:")
    recs, lengths, refused = _check_with_model(recs, model, tokenizer, max_length)
    if strict and refused:
        raise _strict_error(refused, "cannot explain input")
    rank, world, barrier = _process_group(model, distributed, shard)
    report = BatchReport(out=out, malformed=sorted(malformed + refused, key=lambda p: p.line),
                         rank=rank, world_size=world)

    # what is already done: the output and every part file (of any earlier world size)
    work = out if (fmt == "jsonl" and world == 1) else store.part_path(out, rank)
    try:
        scans = {out: store.scan(out, fmt)}
        for p in store.part_paths(out):
            scans[p] = store.scan_jsonl(p)
        scans.setdefault(work, store.scan_jsonl(work))
    except store.OutputFileError as err:
        raise BatchError(str(err)) from None
    others = sorted(set().union(*(s.rules for s in scans.values())) - {rules})
    if others:
        raise BatchError(f"{out!r} holds explanations with rules={others[0]!r}, this run has "
                         f"rules={rules!r}; give another output path or the same rules")
    report.dropped_partial_bytes = store.drop_partial_line(work, scans[work])
    done = set().union(*(s.keys for s in scans.values()))
    if barrier is not None:
        barrier()  # no rank appends before every rank has read the parts

    mine = plan_batches(recs, lengths, max_tokens=max_tokens,
                        max_batch_size=max_batch_size)[rank::world]
    todo = [[r for r in b.records if r.key not in done] for b in mine]
    report.already_done = sum(len(b.records) - len(t) for b, t in zip(mine, todo))
    total = sum(len(t) for t in todo)
    opts = dict(rules=rules, epsilon=epsilon, backend=backend, max_length=max_length,
                strict=patch_strict)
    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="ex", desc="explaining" + (f" (rank 0 of {world})" if world > 1 else ""),
               file=sys.stderr, disable=not progress or rank != 0, dynamic_ncols=True)
    start = time.perf_counter()
    stop = None
    try:
        with _Interrupts() as interrupts, \
                _patch_context(model, rules, epsilon, backend, patch_strict), \
                open(work, "ab") as f:
            for batch, missing in zip(mine, todo):
                if not missing:
                    continue
                # the whole batch, even when part of it was written: same numbers as one run
                failed_before = len(report.failed)
                rows = _explain_rows(model, tokenizer, batch, opts, report.failed)
                wanted = {r.key for r in missing}
                rows = [row for r, row in rows if r.key in wanted]
                with interrupts.write():
                    store.append_batch(f, rows)
                report.written += len(rows)
                report.batches += 1
                bar.update(len(missing))
                if strict and len(report.failed) > failed_before:
                    stop = _strict_error(report.failed[failed_before:], "explain refused")
                    break
    finally:
        bar.close()
        report.seconds = time.perf_counter() - start
    if world > 1 and not os.path.getsize(work):
        os.remove(work)
    if barrier is not None:
        barrier()  # every part is complete
        if rank == 0:
            order = {r.key: i for i, r in enumerate(recs)}
            report.merged_rows = store.merge(out, fmt, order, store.part_paths(out))
    if stop is not None:
        raise stop
    return report
