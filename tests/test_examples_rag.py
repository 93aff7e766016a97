"""Smoke test: python/explain_rag.py runs on the shipped model, names the right sources and
writes the viewer, JSON and CSV."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_explain_rag_example(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "rag.html"
    proc = subprocess.run([sys.executable, str(ROOT / "python" / "explain_rag.py"), "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "answer: '42'" in lines
    first = lines.index("[1] '42'")
    assert lines[first + 1].split()[1] == "k9"            # the queried pair is the top source
    two = lines.index("two answers:")
    assert lines[two + 1] == "[1] '42'" and lines[two + 2].split()[1] == "k9"
    second = lines.index("[2] '8'", two)
    assert lines[second + 1].split()[1] == "k2"
    assert out.stat().st_size > 0 and (tmp_path / "rag.csv").exists()
    report = json.loads((tmp_path / "rag.json").read_text(encoding="utf-8"))
    assert [s["top"][0]["id"] for s in report["sentences"]] == ["k9", "k2"]
