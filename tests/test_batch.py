"""The batch pipeline (lrp_kernels.explanations.batch, ``lrp-kernels batch``) in one process:
batched records equal one-by-one ``explain``, the bucket plan, malformed lines, strict mode,
resuming (partial last line, half-written batches), shards and their merge, Parquet, the CLI.

Interrupting a real process and the accelerate launch are in tests/test_batch_processes.py.
"""
import json
import os
import re
import sys

import pytest
import torch
from hypothesis import given, strategies as st

from lrp_kernels.cli import main
from lrp_kernels.explanations.api import explain
from lrp_kernels.explanations.batch import BatchError, explain_dataset, plan_batches
from lrp_kernels.explanations.records import Record, parse_lines

from helpers.batch_records import mixed_records, write_jsonl
from helpers.shipped import load_shipped

# float32: a batch row differs from the prompt alone only by padding (summation order);
# measured max |dR| / max|R| about 5e-6 on the shipped model
REL_TOL = {"relevance": 1e-4, "logit": 1e-5}
SMALL = dict(max_tokens=60, max_batch_size=8)  # several buckets, mixed lengths in each


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is ~10x faster than two on a loaded machine (no spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


@pytest.fixture(scope="module")
def records():
    return mixed_records(24, seed=3)


@pytest.fixture(scope="module")
def reference(shipped, records, tmp_path_factory):
    """One uninterrupted run: the output bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "out.jsonl"
    report = explain_dataset(*shipped, records, out, progress=False, **SMALL)
    assert report.written == len(records) and report.merged_rows == len(records)
    return out.read_bytes()


def assert_rows_close(got: dict, want: dict) -> None:
    """Equal rows up to float32 rounding of the numbers (same records in other batches)."""
    numbers = {"relevance", "padding_relevance", "target"}
    assert {k: v for k, v in got.items() if k not in numbers} == \
        {k: v for k, v in want.items() if k not in numbers}
    assert got["relevance"] == pytest.approx(want["relevance"], rel=1e-4,
                                             abs=1e-4 * max(map(abs, want["relevance"])))
    gt, wt = dict(got["target"]), dict(want["target"])
    assert gt.pop("logit") == pytest.approx(wt.pop("logit"), rel=REL_TOL["logit"])
    assert gt.pop("probability") == pytest.approx(wt.pop("probability"), abs=1e-5)
    assert gt == wt


def rows_of(data: bytes):
    return [json.loads(line) for line in data.splitlines()]


def test_batched_records_match_one_by_one_explain(shipped, records, reference):
    model, tok = shipped
    lengths = [len(tok(r["prompt"])["input_ids"]) for r in records]
    plan = plan_batches([Record(i + 1, r["id"], r["prompt"], r.get("target"), r.get("continuation"),
                                r.get("contrast")) for i, r in enumerate(records)], lengths, **SMALL)
    assert any(len({len(tok(r.prompt)["input_ids"]) for r in b.records}) > 1 for b in plan), \
        "no batch mixes lengths: padding would go untested"
    rows = rows_of(reference)
    assert [r["id"] for r in rows] == [r["id"] for r in records]  # input order
    for rec, row in zip(records, rows):
        alone = explain(model, tok, rec["prompt"], rec.get("target"),
                        continuation=rec.get("continuation"), contrast=rec.get("contrast"))
        assert row["tokens"] == alone.tokens and row["token_ids"] == alone.token_ids
        assert row["target"]["ids"] == alone.target.ids and row["target"]["text"] == alone.target.text
        assert row["target"]["foil_id"] == alone.target.foil_id
        rel = torch.tensor(row["relevance"])
        scale = alone.relevance.abs().max()
        assert (rel - alone.relevance).abs().max() <= REL_TOL["relevance"] * scale, rec
        assert row["target"]["logit"] == pytest.approx(alone.target.logit, rel=REL_TOL["logit"])
        assert row["target"]["probability"] == pytest.approx(alone.target.probability, abs=1e-5)
        assert row["prompt"] == rec["prompt"] and row["rules"] == "attnlrp"


@pytest.mark.parametrize("rules", ["cp-lrp", "gradient"])
def test_other_rules_match_one_by_one_explain(shipped, rules, tmp_path):
    model, tok = shipped
    recs = mixed_records(6, seed=9)
    flags = [p.requires_grad for p in model.parameters()]
    explain_dataset(model, tok, recs, tmp_path / "o.jsonl", rules=rules, progress=False)
    for rec, row in zip(recs, rows_of((tmp_path / "o.jsonl").read_bytes())):
        alone = explain(model, tok, rec["prompt"], rec.get("target"), rules=rules,
                        continuation=rec.get("continuation"), contrast=rec.get("contrast"))
        assert row["rules"] == rules and row["target"]["ids"] == alone.target.ids
        scale = alone.relevance.abs().max()
        assert (torch.tensor(row["relevance"]) - alone.relevance).abs().max() <= \
            REL_TOL["relevance"] * scale
    # the model is left as it was: requires_grad flags restored, no parameter gradients
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


@given(st.lists(st.tuples(st.integers(1, 40), st.sampled_from([None, "a", "b"]),
                          st.sampled_from([None, "x", 5])), min_size=1, max_size=60),
       st.integers(1, 120), st.integers(1, 9))
def test_plan_covers_every_record_once_within_budget(items, max_tokens, max_batch):
    recs = [Record(i + 1, i, "p", None, cont, foil) for i, (_, cont, foil) in enumerate(items)]
    lengths = [n for n, _, _ in items]
    plan = plan_batches(recs, lengths, max_tokens=max_tokens, max_batch_size=max_batch)
    assert sorted(r.id for b in plan for r in b.records) == list(range(len(recs)))
    for b in plan:
        widths = [lengths[r.id] for r in b.records]
        assert b.width == max(widths) and widths == sorted(widths)
        assert len(b.records) <= max_batch
        assert len(b.records) == 1 or b.padded_tokens <= max_tokens
        assert {(r.continuation, repr(r.contrast)) for r in b.records} == \
            {(b.continuation, repr(b.contrast))}
    assert [b.width for b in plan] == sorted((b.width for b in plan), reverse=True)


def test_malformed_lines_are_reported_with_their_line_numbers():
    lines = [json.dumps({"prompt": "k1 5 ; ? k1"}),                       # 1 ok, id 1
             "{not json",                                                 # 2
             "",                                                          # blank: skipped
             json.dumps(["a list"]),                                      # 4
             json.dumps({"id": "x"}),                                     # 5
             json.dumps({"prompt": 7}),                                   # 6
             json.dumps({"prompt": "k1 5 ; ? k1", "id": True}),           # 7
             json.dumps({"prompt": "k1 5 ; ? k1", "target": 1.5}),        # 8
             json.dumps({"prompt": "k1 5 ; ? k1", "contrast": [1]}),      # 9
             json.dumps({"prompt": "k1 5 ; ? k1", "continuation": " "}),  # 10
             json.dumps({"prompt": "k1 5 ; ? k1", "target": "5", "continuation": " 5"}),  # 11
             json.dumps({"prompt": "k1 5 ; ? k1", "contrats": "5"}),      # 12
             json.dumps({"prompt": "k1 5 ; ? k1", "id": "1"}),            # 13: same id as line 1
             b"\xff\xfe",                                                 # 14
             json.dumps({"prompt": "k2 6 ; ? k2", "id": "ok", "target": 6, "meta": {"a": [1]}})]
    records, problems = parse_lines([ln.encode() if isinstance(ln, str) else ln for ln in lines])
    assert [(r.line, r.id) for r in records] == [(1, 1), (15, "ok")]
    assert records[1].target == 6 and records[1].meta == {"a": [1]}
    expected = {2: "not valid JSON", 4: "expected a JSON object, got list", 5: "no 'prompt'",
                6: "'prompt' must be a non-empty string", 7: "'id' must be",
                8: "'target' must be a token string or a token id", 9: "'contrast' must be",
                10: "'continuation' must be a non-empty string", 11: "not both",
                12: "unknown field 'contrats'", 13: 'duplicate id "1" (first on line 1)',
                14: "not UTF-8"}
    assert [p.line for p in problems] == sorted(expected)
    for p in problems:
        assert expected[p.line] in p.message, str(p)


def test_lines_the_model_cannot_explain_are_skipped_or_refused(shipped, tmp_path):
    model, tok = shipped
    long_prompt = " ; ".join(f"k{i % 16} {i}" for i in range(30)) + " ; ? k1"   # > 64 tokens
    data = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "good", "prompt": "k1 5 ; k2 7 ; ? k1"}, {"prompt": long_prompt},
        {"prompt": "k1 5 ; ? k1", "target": "not-a-token"},
        {"prompt": "k1 5 ; ? k1", "target": "5", "contrast": "5"}, "{oops"])
    out = tmp_path / "out.jsonl"
    report = explain_dataset(model, tok, data, out, progress=False)
    assert report.written == 1 and [p.line for p in report.malformed] == [2, 3, 4, 5]
    assert "more than the limit of 64" in report.malformed[0].message
    assert [r["id"] for r in rows_of(out.read_bytes())] == ["good"]
    strict_out = tmp_path / "strict.jsonl"
    with pytest.raises(BatchError, match="line 5: not valid JSON"):
        explain_dataset(model, tok, data, strict_out, strict=True, progress=False)
    two = write_jsonl(tmp_path / "two.jsonl", [{"prompt": "k1 5 ; ? k1"}, {"prompt": long_prompt}])
    with pytest.raises(BatchError, match=r"cannot explain input line 2: .*limit of 64"):
        explain_dataset(model, tok, two, strict_out, strict=True, progress=False)
    assert not strict_out.exists()  # refused before any work


def test_a_record_explain_refuses_loses_only_itself(shipped, tmp_path):
    model, tok = shipped
    # the foil "5" is the prediction of the second prompt only: explain refuses that one
    recs = [{"id": "a", "prompt": "k1 5 ; k2 7 ; ? k2", "contrast": "5"},
            {"id": "b", "prompt": "k1 5 ; k2 7 ; ? k1", "contrast": "5"},
            {"id": "c", "prompt": "k3 9 ; k2 7 ; ? k3", "contrast": "5"}]
    report = explain_dataset(model, tok, recs, tmp_path / "o.jsonl", progress=False)
    assert [p.line for p in report.failed] == [2] and "'b'" in report.failed[0].message
    assert [r["id"] for r in rows_of((tmp_path / "o.jsonl").read_bytes())] == ["a", "c"]
    with pytest.raises(BatchError, match="explain refused line 2"):
        explain_dataset(model, tok, recs, tmp_path / "s.jsonl", strict=True, progress=False)


def test_resume_after_a_torn_write_equals_one_run(shipped, records, reference, tmp_path):
    """A kill in the middle of a write: complete lines of some batches (input order, so most
    batches half-written) and an unterminated line; the rerun drops that line, recomputes the
    half-written batches whole and ends with exactly the uninterrupted output."""
    lines = reference.splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(lines[:9]) + lines[9][:40])
    report = explain_dataset(*shipped, records, out, progress=False, **SMALL)
    assert report.dropped_partial_bytes == 40 and report.already_done == 9
    assert report.written == len(records) - 9
    assert out.read_bytes() == reference
    again = explain_dataset(*shipped, records, out, progress=False, **SMALL)
    assert again.written == 0 and again.batches == 0 and out.read_bytes() == reference


def test_shards_then_a_plain_run_merge_into_the_one_process_output(shipped, records, reference,
                                                                   tmp_path):
    out = tmp_path / "out.jsonl"
    r1 = explain_dataset(*shipped, records, out, shard=(1, 2), progress=False, **SMALL)
    r0 = explain_dataset(*shipped, records, out, shard=(0, 2), progress=False, **SMALL)
    assert r0.written + r1.written == len(records) and min(r0.written, r1.written) > 0
    assert r0.merged_rows is None and not out.exists()   # shards never merge
    merged = explain_dataset(*shipped, records, out, progress=False, **SMALL)
    assert merged.written == 0 and merged.merged_rows == len(records)
    assert out.read_bytes() == reference
    assert not [p for p in os.listdir(tmp_path) if ".part." in p]


def test_output_of_other_rules_or_not_ours_is_refused(shipped, records, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(reference)
    with pytest.raises(BatchError, match="rules='attnlrp'.*rules='cp-lrp'"):
        explain_dataset(*shipped, records, out, rules="cp-lrp", progress=False)
    out.write_text("hello\n")
    with pytest.raises(BatchError, match="line 1 is not an explanation written by"):
        explain_dataset(*shipped, records, out, progress=False)
    assert out.read_text() == "hello\n"  # never overwritten


def test_parquet_round_trip_and_resume(shipped, records, reference, tmp_path):
    pytest.importorskip("pyarrow")
    from lrp_kernels.explanations.batch_store import read_parquet_rows
    recs = [dict(r, meta={"n": i}) if i % 3 == 0 else r for i, r in enumerate(records)]
    out = tmp_path / "out.parquet"
    first = explain_dataset(*shipped, recs[:10], out, progress=False, **SMALL)
    rest = explain_dataset(*shipped, recs, out, progress=False, **SMALL)
    assert (first.written, rest.already_done, rest.written) == (10, 10, len(recs) - 10)
    got = read_parquet_rows(out)
    want = rows_of(reference)
    assert [g["id"] for g in got] == [w["id"] for w in want]        # ids as text, input order
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.pop("meta", None) == ({"n": i} if i % 3 == 0 else None)
        assert_rows_close(g, w)
    assert explain_dataset(*shipped, recs, out, progress=False, **SMALL).written == 0


def test_parquet_without_pyarrow_is_a_clear_error(shipped, records, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pip install pyarrow"):
        explain_dataset(*shipped, records, tmp_path / "o.parquet", progress=False)
    data = write_jsonl(tmp_path / "in.jsonl", records[:2])
    code = main(["batch", data, "--out", str(tmp_path / "o.jsonl"), "--format", "parquet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs pyarrow (pip install pyarrow)" in err[0]


# ---- the command line --------------------------------------------------------------------------

def test_cli_writes_progress_and_summary_and_resumes(records, reference, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", records + ["{broken"])
    out = tmp_path / "out.jsonl"
    out.write_bytes(reference.splitlines(keepends=True)[0])
    code = main(["batch", data, "--out", str(out), "--max-tokens", "60", "--max-batch-size", "8"])
    text, err = capsys.readouterr()
    assert code == 0 and out.read_bytes() == reference
    assert f"explained {len(records) - 1} prompts" in text and "1 already in" in text
    assert "1 malformed lines skipped" in text and f"wrote {out} ({len(records)} explanations)" in text
    assert "ex/s" in err and f"{len(records) - 1}/{len(records) - 1}" in err   # tqdm: rate, count
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", err)                       # elapsed<ETA
    assert f"warning: skipped {data} line {len(records) + 1}: not valid JSON" in err
    code = main(["batch", data, "--out", str(out), "--quiet"])
    text, err = capsys.readouterr()
    assert code == 0 and "explained 0 prompts" in text and "ex/s" not in err


@pytest.mark.parametrize("argv, needle", [
    (["missing.jsonl", "--out", "o.jsonl"], "IN 'missing.jsonl': no such file"),
    (["in.jsonl", "--out", "nofolder/o.jsonl"], "does not exist"),
    (["in.jsonl", "--out", "in.jsonl"], "--out is the input file"),
    (["in.jsonl", "--out", "o.jsonl", "--shard", "2/2"], "need 0 <= RANK < WORLD"),
    (["in.jsonl", "--out", "o.jsonl", "--max-tokens", "0"], "--max-tokens"),
    (["bad.jsonl", "--out", "o.jsonl", "--strict"], "bad.jsonl: malformed input: line 2: "
                                                     "no 'prompt'"),
])
def test_cli_mistakes_are_one_line(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_jsonl("in.jsonl", [{"prompt": "k1 5 ; ? k1"}])
    write_jsonl("bad.jsonl", [{"prompt": "k1 5 ; ? k1"}, {"id": 3}])
    code = main(["batch", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("lrp-kernels batch: error:"), err
    assert needle in err[0]
    assert not os.path.exists("o.jsonl")


def test_cli_help_lists_every_option(capsys):
    assert main(["batch", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in ("--out", "--format", "--model", "--rules", "--max-tokens", "--max-batch-size",
                "--strict", "--shard", "--quiet", "accelerate launch", "torchrun", '"prompt"'):
        assert opt in text, opt
