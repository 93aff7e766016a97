"""Smoke tests of the explain examples in python/ (subprocess, tiny inputs)."""
import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)


def run(*argv, timeout=600):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=timeout)


def test_explain_prompt(tmp_path):
    out = tmp_path / "e.json"
    proc = run("python/explain_prompt.py", "k4 11 ; k9 30 ; ? k9", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "target '30'" in proc.stdout
    d = json.loads(out.read_text())
    assert d["target"]["text"] == "30" and len(d["relevance"]) == 9


def test_explain_prompt_generate_html(tmp_path):
    out = tmp_path / "g.html"
    proc = run("python/explain_prompt.py", "k4 11 ; k2 6 ; ? k4", "--generate", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "g-0.html").exists() and (tmp_path / "g-1.html").exists()


def test_compare_backends(tmp_path):
    proc = run("python/compare_backends.py", "--sizes", "5,7,3", "--ops",
               "linear_epsilon_backward,softmax_dt_backward", "--backends", "torch,triton")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "linear_epsilon_backward" in proc.stdout and "end to end" in proc.stdout


def test_train_script_runs_and_refuses_an_untrained_model(tmp_path):
    """CI never trains; this only checks the script runs and does not save a failed model."""
    out = tmp_path / "m"
    proc = run("python/train_recall_model.py", "--out", str(out), "--max-steps", "4",
               "--eval-every", "2")
    assert proc.returncode == 1
    assert "step 2 " in proc.stdout and "did not reach 95%" in proc.stderr
    assert not out.exists()
