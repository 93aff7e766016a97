"""``lrp-kernels explain``: outputs, stdin/--file, and one-line errors for bad input.

Uses a tiny random Llama saved to a temporary folder (offline, no hub), not the shipped model
(tests/test_shipped_model.py covers that one).
"""
import json
import os
import subprocess
import sys

import pytest

from lrp_kernels.cli import main

from helpers.recall_task import save_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPT = "k1 = 5 ; k2 = 7 ; ? k1 ="


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def run_cli(capsys, *argv):
    code = main(["explain", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lrp-kernels explain: error:")
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_lists_every_option():
    proc = subprocess.run([sys.executable, "-m", "lrp_kernels.cli", "explain", "--help"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0
    for opt in ("--file", "--model", "--target", "--continuation", "--contrast", "--generate",
                "--out", "--backend", "--dtype", "--device", "--max-length", "stdin"):
        assert opt in proc.stdout, opt


def test_json_output_and_top_list(model_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    code, text, _ = run_cli(capsys, PROMPT, "--model", model_dir, "--out", str(out),
                            "--rules", "gradient", "--top", "3")
    assert code == 0
    d = json.loads(out.read_text())
    assert d["tokens"][0] == "<bos>" and "".join(d["tokens"][1:]) == PROMPT
    assert "target" in text and f"wrote {out}" in text
    assert len([ln for ln in text.splitlines() if ln.startswith("    ")]) == 3


@pytest.mark.parametrize("ext", [".html", ".png"])
def test_html_and_png(model_dir, tmp_path, capsys, ext):
    if ext == ".png":
        pytest.importorskip("matplotlib")
    out = tmp_path / f"h{ext}"
    code, _, _ = run_cli(capsys, PROMPT, "--model", model_dir, "--out", str(out), "--target", "5")
    assert code == 0 and out.stat().st_size > 0


def test_stdin_file_target_contrast_generate(model_dir, tmp_path, capsys, monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    code, text, _ = run_cli(capsys, "-", "--model", model_dir, "--target", "5", "--contrast", "7")
    assert code == 0 and "'5' vs '7'" in text
    f = tmp_path / "p.txt"
    f.write_text(PROMPT, encoding="utf-8")
    out = tmp_path / "g.json"
    code, text, err = run_cli(capsys, "--file", str(f), "--model", model_dir, "--generate", "2",
                              "--out", str(out), "--top=1")
    assert code == 0
    assert (tmp_path / "g-0.json").exists() and (tmp_path / "g-1.json").exists()
    assert len(json.loads((tmp_path / "g-1.json").read_text())["tokens"]) == 13
    code, text, _ = run_cli(capsys, PROMPT, "--model", model_dir, "--continuation", "5 ;",
                            "--top=2")
    assert code == 0 and "'5 ;'" in text


def test_errors_are_one_line(model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, PROMPT, "--model", str(tmp_path / "nope"))
    one_line_error(code, err, "--model", "no such folder")
    long = " ".join(["k1 = 5 ;"] * 20)
    code, _, err = run_cli(capsys, long, "--model", model_dir)
    one_line_error(code, err, "81 tokens", "64")
    code, _, err = run_cli(capsys, PROMPT, "--model", model_dir, "--max-length", "4")
    one_line_error(code, err, "limit of 4")
    code, _, err = run_cli(capsys, PROMPT, "--model", model_dir, "--target", "banana")
    one_line_error(code, err, "'banana' is not a single token")
    code, _, err = run_cli(capsys, PROMPT, "--model", model_dir, "--target", "id:9999")
    one_line_error(code, err, "9999", "vocabulary")
    code, _, err = run_cli(capsys, PROMPT, "--model", model_dir, "--out",
                           str(tmp_path / "missing" / "h.html"))
    one_line_error(code, err, "does not exist")
    (tmp_path / "dir.html").mkdir()
    code, _, err = run_cli(capsys, PROMPT, "--model", model_dir, "--out", str(tmp_path / "dir.html"))
    one_line_error(code, err, "cannot write", "folder")
    code, _, err = run_cli(capsys, PROMPT, "--model", model_dir, "--out", str(tmp_path / "h.txt"))
    one_line_error(code, err, ".html, .pdf, .png or .json")
    code, _, err = run_cli(capsys, "--model", model_dir)
    one_line_error(code, err, "no prompt")
    code, _, err = run_cli(capsys, "--file", str(tmp_path / "absent.txt"), "--model", model_dir)
    one_line_error(code, err, "absent.txt")
    code, _, err = run_cli(capsys, "   ", "--model", model_dir)
    one_line_error(code, err, "empty")
    code, _, err = run_cli(capsys, "k1 = 5 ; k2 = 999 ; ? k1 =", "--model", model_dir)
    one_line_error(code, err, "does not know '999'")
    code, _, err = run_cli(capsys, PROMPT, "--model", model_dir, "--generate", "0")
    one_line_error(code, err, "--generate")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(model_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run_cli(capsys, PROMPT, "--model", model_dir, "--out", str(ro / "h.html"))
        one_line_error(code, err, "permission denied")
    finally:
        ro.chmod(0o700)


def test_pdf_without_latex_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)  # the CLI's check and heatmap's
    code, _, err = run_cli(capsys, PROMPT, "--model", model_dir, "--out", str(tmp_path / "h.pdf"))
    one_line_error(code, err, "xelatex", ".html", ".png")


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lrp_kernels.cli", "explain", PROMPT,
                           "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"lrp-kernels explain: error: --model {str(tmp_path / 'nope')!r}: no such folder"]


def test_unreachable_hub_id_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "lrp_kernels.cli", "explain", PROMPT,
                           "--model", "no-such-org/no-such-model"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot load model 'no-such-org/no-such-model'" in lines[0]
