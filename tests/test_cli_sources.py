"""``lrp-kernels sources`` and ``lrp-kernels explain --generate K --out answer.html`` on the
shipped recall model (the default model): outputs, the known answer, and one-line errors."""
import csv
import json

import pytest

from lrp_kernels.cli import main

from helpers.viewer_page import parse

DOCS = [{"id": "a", "text": "k4 17"}, {"id": "b", "text": "k9 42"}, {"text": "k2 8"}]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, command, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lrp-kernels {command}: error:"), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def docs(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in DOCS[:2]) + "\n\n" + json.dumps(DOCS[2])
                    + "\n", encoding="utf-8")
    return path


def test_sources_answer_prints_and_writes(docs, tmp_path, capsys):
    out = tmp_path / "answer.html"
    code, text, err = run_cli(capsys, "sources", str(docs), "--question", "? k9", "--answer",
                              "42", "--out", str(out), "--no-progress")
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0] == "answer: '42'" and lines[1] == "[1] '42'"
    assert lines[2].split()[1:] == ["b", "'k9", "42'"]     # top source: the queried pair
    _, data = parse(out.read_text(encoding="utf-8"))
    assert data["sentences"][0]["sources"][0]["id"] == "b"
    report = json.loads((tmp_path / "answer.json").read_text(encoding="utf-8"))
    assert report["prompt"] == "k4 17 ; k9 42 ; k2 8 ; ? k9"
    assert [d["id"] for d in report["documents"]] == ["a", "b", "4"]   # line 4: the default id
    assert report["sentences"][0]["top"][0]["id"] == "b"
    assert len(report["matrix"]["relevance"]) == 1
    rows = list(csv.DictReader((tmp_path / "answer.csv").open(encoding="utf-8")))
    assert rows[0]["source"] == "b" and float(rows[0]["share"]) > 0.5


def test_sources_generate_levels(docs, capsys):
    code, text, err = run_cli(capsys, "sources", str(docs), "--question", "? k2", "--generate",
                              "1", "--level", "word", "--top", "1", "--no-progress")
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0] == "answer: '8'"
    assert lines[2].split()[1:] == ["4:2", "'8'"]          # the value word of the queried pair


@pytest.mark.parametrize("content, needle", [
    ('{"id": "a", "text": "k4 17"}\n{"id": "b" "text": "k9 42"}\n',
     "line 2: not valid JSON (Expecting ',' delimiter at column 12)"),
    ('{"id": "a", "text": "k4 17"}\n[1, 2]\n', "line 2: expected a JSON object"),
    ('{"id": "a"}\n', 'line 1: no "text"'),
    ('{"id": "a", "text": "  "}\n', 'line 1: "text" is empty'),
    ('{"id": "a", "text": 5}\n', '"text" must be a string, got int'),
    ('{"id": [1], "text": "x"}\n', '"id" must be a string or an integer'),
    ('{"id": "a", "text": "k1 2"}\n{"id": "a", "text": "k3 4"}\n',
     "line 2: duplicate id 'a' (first on line 1)"),
    ("\n  \n", "has no documents"),
])
def test_sources_bad_documents(tmp_path, capsys, content, needle):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    code, _, err = run_cli(capsys, "sources", str(path), "--question", "? k1")
    one_line_error(code, err, "sources", needle)


def test_sources_bad_arguments(docs, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sources", str(docs))
    one_line_error(code, err, "sources", "required: --question")
    code, _, err = run_cli(capsys, "sources", str(docs), "--question", "  ")
    one_line_error(code, err, "sources", "--question is empty")
    code, _, err = run_cli(capsys, "sources", str(tmp_path / "none.jsonl"), "--question", "? k9")
    one_line_error(code, err, "sources", "does not exist")
    code, _, err = run_cli(capsys, "sources", str(docs), "--question", "? k9", "--out", "x.png")
    one_line_error(code, err, "sources", "--out must end in .html")
    code, _, err = run_cli(capsys, "sources", str(docs), "--question", "? k9", "--answer", "1",
                           "--generate", "2")
    one_line_error(code, err, "sources", "not allowed with argument")
    # after loading the model: K too large for the context, a template the model cannot read
    code, _, err = run_cli(capsys, "sources", str(docs), "--question", "? k9", "--generate",
                           "100", "--no-progress")
    one_line_error(code, err, "sources", "100 generated tokens", "limit of 64")
    code, _, err = run_cli(capsys, "sources", str(docs), "--question", "? k9", "--template", "qa",
                           "--no-progress")
    one_line_error(code, err, "sources", "does not know 'Document'", "--template key-value")


def test_explain_generate_writes_one_viewer(tmp_path, capsys):
    out = tmp_path / "answer.html"
    code, text, err = run_cli(capsys, "explain", "k4 17 ; k9 42 ; k2 8 ; ? k9", "--generate",
                              "2", "--out", str(out), "--no-progress", "--top", "1")
    assert code == 0, err
    assert text.splitlines()[0].startswith("[0] target '42': logit")
    assert "[1] target" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer.html", "answer.json"]
    _, data = parse(out.read_text(encoding="utf-8"))
    matrix = json.loads((tmp_path / "answer.json").read_text(encoding="utf-8"))
    assert data["tokens"] == matrix["tokens"] and len(matrix["relevance"]) == 2
    assert matrix["prompt_length"] == data["prompt_length"] == 12
    code, _, err = run_cli(capsys, "explain", "k4 17 ; ? k4", "--generate", "2", "--target", "17")
    one_line_error(code, err, "explain", "--generate picks its own targets")
    code, _, err = run_cli(capsys, "explain", "k4 17 ; ? k4", "--generate", "60", "--out",
                           str(tmp_path / "long.html"), "--no-progress")
    one_line_error(code, err, "explain", "60 generated tokens", "limit of 64")
