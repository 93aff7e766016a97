"""Every ``lrp-kernels`` subcommand, every class of user mistake: exit code 2, exactly one
non-empty line on stderr, no traceback (reliability findings on the command line).

Argparse's own errors count too: the parser prints them as one line
(``PROG: error: MESSAGE (see PROG --help)``) instead of argparse's usage block + error line.
In-process calls of :func:`lrp_kernels.cli.main` (fast); one subprocess checks the real process.
Models are tiny random configs saved to temporary folders (no hub, no downloads).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from lrp_kernels.cli import main

from helpers.recall_task import save_tiny_llama, task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPT = "k1 = 5 ; k2 = 7 ; ? k1 ="


# ---------------------------------------------------------------------------- model folders

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> folder: a tiny Llama (supported), OPT (causal LM, no AttnLRP family), T5 (no
    causal-LM head), a config.json without model_type, a folder without config.json."""
    from transformers import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("models")
    tok = task.build_tokenizer()
    out = {"llama": save_tiny_llama(root / "llama", tok)}
    out["opt"] = root / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=64,
                             word_embed_proj_dim=16)).save_pretrained(out["opt"])
    tok.save_pretrained(out["opt"])
    out["t5"] = root / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=16, d_ff=32, num_layers=1,
                                        num_heads=2, d_kv=8)).save_pretrained(out["t5"])
    tok.save_pretrained(out["t5"])
    out["notype"] = root / "notype"
    out["notype"].mkdir()
    (out["notype"] / "config.json").write_text(json.dumps({"hidden_size": 16}))
    out["empty"] = root / "empty"
    out["empty"].mkdir()
    out["missing"] = root / "does-not-exist"
    return {k: str(v) for k, v in out.items()}


def fill(argv, folders, tmp_path):
    """Replace {llama}, {opt}, ..., {tmp} placeholders in the argument list."""
    return [a.format(tmp=str(tmp_path), **folders) for a in argv]


def assert_one_line_error(code, err, *needles):
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lrp-kernels"), lines[0]
    assert "error:" in lines[0], lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ---------------------------------------------------------------------------- the matrix

EXPLAIN = ["explain", PROMPT, "--model", "{llama}"]
PROFILE = ["profile", "--no-progress", "--device", "cpu", "--seq", "8"]

CASES = {
    # --- explain: missing / nonexistent paths
    "explain-model-missing": (["explain", PROMPT, "--model", "{missing}"], "no such folder"),
    "explain-file-missing": (["explain", "--file", "{tmp}/absent.txt", "--model", "{llama}"], "absent.txt"),
    "explain-out-folder-missing": (EXPLAIN + ["--out", "{tmp}/no/dir/h.html"], "does not exist"),
    "explain-tokenizer-missing": (EXPLAIN + ["--tokenizer", "{missing}"], "--tokenizer"),
    # --- explain: wrong type
    "explain-top-not-int": (EXPLAIN + ["--top", "x"], "--top"),
    "explain-generate-not-int": (EXPLAIN + ["--generate", "two"], "--generate"),
    "explain-max-length-float": (EXPLAIN + ["--max-length", "1.5"], "--max-length"),
    "explain-epsilon-not-number": (EXPLAIN + ["--epsilon", "small"], "--epsilon"),
    "explain-target-bad-id": (EXPLAIN + ["--target", "id:x"], "--target"),
    # --- explain: out of range
    "explain-top-negative": (EXPLAIN + ["--top", "-1"], "--top"),
    "explain-generate-zero": (EXPLAIN + ["--generate", "0"], "--generate"),
    "explain-max-length-zero": (EXPLAIN + ["--max-length", "0"], "--max-length"),
    "explain-max-length-too-small": (EXPLAIN + ["--max-length", "4"], "limit of 4"),
    "explain-epsilon-zero": (EXPLAIN + ["--epsilon", "0"], "--epsilon"),
    "explain-epsilon-negative": (EXPLAIN + ["--epsilon=-1e-6"], "--epsilon"),
    "explain-epsilon-nan": (EXPLAIN + ["--epsilon", "nan"], "--epsilon"),
    "explain-epsilon-inf": (EXPLAIN + ["--epsilon", "inf"], "--epsilon"),
    "explain-target-id-outside-vocab": (EXPLAIN + ["--target", "id:99999"], "vocabulary"),
    # --- explain: unknown choices and options
    "explain-rules-choice": (EXPLAIN + ["--rules", "deeplift"], "--rules"),
    "explain-backend-choice": (EXPLAIN + ["--backend", "gpu"], "--backend"),
    "explain-dtype-choice": (EXPLAIN + ["--dtype", "float8"], "--dtype"),
    "explain-pdf-backend-choice": (EXPLAIN + ["--pdf-backend", "lualatex"], "--pdf-backend"),
    "explain-out-extension": (EXPLAIN + ["--out", "{tmp}/h.txt"], "--out"),
    "explain-device": (EXPLAIN + ["--device", "tpu"], "--device"),
    "explain-unknown-option": (EXPLAIN + ["--bogus"], "--bogus"),
    # --- explain: unsupported / unusable model folders
    "explain-model-opt": (["explain", PROMPT, "--model", "{opt}"], "--no-strict"),
    "explain-model-t5": (["explain", PROMPT, "--model", "{t5}"], "causal"),
    "explain-model-no-model-type": (["explain", PROMPT, "--model", "{notype}"], "model_type"),
    "explain-model-no-config": (["explain", PROMPT, "--model", "{empty}"], "config.json"),
    # --- explain: empty or degenerate requests
    "explain-empty-prompt": (["explain", "", "--model", "{llama}"], "empty"),
    "explain-blank-prompt": (["explain", "  \n", "--model", "{llama}"], "empty"),
    "explain-no-prompt": (["explain", "--model", "{llama}"], "no prompt"),
    "explain-empty-continuation": (EXPLAIN + ["--continuation", ""], "--continuation"),
    "explain-unknown-continuation": (EXPLAIN + ["--continuation", "999"], "--continuation"),
    "explain-contrast-is-target": (EXPLAIN + ["--target", "5", "--contrast", "5"], "contrast"),
    # --- compare
    "compare-sizes-two": (["compare", "--sizes", "5,7"], "--sizes"),
    "compare-sizes-not-int": (["compare", "--sizes", "a,b,c"], "--sizes"),
    "compare-sizes-zero": (["compare", "--sizes", "5,0,3"], "--sizes"),
    "compare-seed-not-int": (["compare", "--seed", "x"], "--seed"),
    "compare-seed-negative": (["compare", "--seed", "-1"], "--seed"),
    "compare-seed-huge": (["compare", "--seed", str(2 ** 70)], "--seed"),
    "compare-dtype-choice": (["compare", "--dtype", "float8"], "--dtype"),
    "compare-device": (["compare", "--device", "tpu"], "--device"),
    "compare-ops": (["compare", "--ops", "nope"], "--ops"),
    "compare-backends": (["compare", "--backends", "tpu"], "--backends"),
    "compare-unknown-option": (["compare", "--bogus"], "--bogus"),
    # --- profile
    "profile-model-missing": (PROFILE + ["--model", "{missing}"], "--model"),
    "profile-seq-not-int": (["profile", "--seq", "abc"], "--seq"),
    "profile-seq-zero": (["profile", "--seq", "0"], "--seq"),
    "profile-batch-zero": (PROFILE + ["--batch", "0"], "--batch"),
    "profile-batch-not-int": (PROFILE + ["--batch", "x"], "--batch"),
    "profile-dtype-choice": (PROFILE + ["--dtype", "float8"], "--dtype"),
    "profile-backend-choice": (PROFILE + ["--backend", "gpu"], "--backend"),
    "profile-rules-choice": (PROFILE + ["--rules", "gradient"], "--rules"),
    "profile-device": (PROFILE + ["--device", "tpu"], "--device"),
    "profile-model-no-model-type": (PROFILE + ["--model", "{notype}"], "model_type"),
    "profile-model-no-config": (PROFILE + ["--model", "{empty}"], "config.json"),
    "profile-model-opt": (PROFILE + ["--model", "{opt}"], "no rule"),
    "profile-model-t5": (PROFILE + ["--model", "{t5}"], "causal"),
    # --- build-ext, info, the top level
    "build-ext-unknown-option": (["build-ext", "--bogus"], "--bogus"),
    "info-unknown-option": (["info", "--bogus"], "--bogus"),
    "no-such-command": (["explian"], "explian"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_mistake_is_one_line(name, folders, tmp_path, capsys):
    argv, needle = CASES[name]
    code = main(fill(argv, folders, tmp_path))
    assert_one_line_error(code, capsys.readouterr().err, needle)


@pytest.mark.parametrize("argv", [
    EXPLAIN, ["compare"], PROFILE + ["--model", "llama-tiny"], ["build-ext"]])
def test_bad_backend_env_is_one_line(argv, folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LRP_KERNELS_BACKEND", "gpu")
    code = main(fill(argv, folders, tmp_path))
    assert_one_line_error(code, capsys.readouterr().err, "LRP_KERNELS_BACKEND", "'gpu'")


@pytest.mark.parametrize("as_json", [False, True])
def test_info_reports_bad_backend_env_and_the_rest(as_json, monkeypatch, capsys):
    """info is the diagnostic: it prints everything, shows the bad variable, exits 2."""
    monkeypatch.setenv("LRP_KERNELS_BACKEND", "gpu")
    code = main(["info"] + (["--json"] if as_json else []))
    out, err = capsys.readouterr()
    assert_one_line_error(code, err, "LRP_KERNELS_BACKEND", "'gpu'")
    if as_json:
        info = json.loads(out)
        assert info["selected_backend"] is None and "'gpu'" in info["problems"][0]
        assert set(info["backends"]) >= {"torch", "cpp", "triton"} and info["devices"]
    else:
        assert "INVALID" in out and "'gpu'" in out
        assert "torch" in out and "backends:" in out and "devices:" in out


def test_info_with_good_env_exits_0(monkeypatch, capsys):
    monkeypatch.setenv("LRP_KERNELS_BACKEND", "torch")
    assert main(["info"]) == 0
    out, err = capsys.readouterr()
    assert "selected       torch" in out and err == ""


def test_hub_id_offline_fails_fast(monkeypatch, capsys):
    """A hub id that is neither reachable nor cached: one line within seconds (was ~50 s of
    retries), whether HF_HUB_OFFLINE is set or the endpoint refuses connections."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for offline in (False, True):
        if offline:
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        t0 = time.monotonic()
        code = main(["explain", PROMPT, "--model", "no-such-org/no-such-model"])
        assert time.monotonic() - t0 < 10
        assert_one_line_error(code, capsys.readouterr().err, "'no-such-org/no-such-model'",
                              "HF_HUB_OFFLINE" if offline else "not reachable", "local model folder")


def test_no_strict_patches_the_rest_with_a_one_line_warning(folders, capsys):
    code = main(["explain", PROMPT, "--model", folders["opt"], "--no-strict", "--top", "2"])
    out, err = capsys.readouterr()
    assert code == 0 and "target" in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lrp-kernels explain: warning:"), err
    assert "OPTForCausalLM" in lines[0]


def test_internal_error_keeps_its_traceback(monkeypatch):
    """Only user mistakes are shortened: a bug still raises (and so prints its traceback)."""
    from lrp_kernels.cli import info

    def broken():
        raise RuntimeError("internal bug")
    monkeypatch.setattr(info, "collect", broken)
    with pytest.raises(RuntimeError, match="internal bug"):
        main(["info"])


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert main(["explain", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--no-strict" in out and "--epsilon" in out


def test_real_process_bad_env_info_no_traceback():
    env = dict(os.environ, LRP_KERNELS_BACKEND="gpu")
    proc = subprocess.run([sys.executable, "-m", "lrp_kernels.cli", "info"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, "LRP_KERNELS_BACKEND")
    assert "backends:" in proc.stdout and "devices:" in proc.stdout


@pytest.mark.parametrize("command", ["sources", "batch", "faithfulness"])
def test_model_without_rules_is_one_line_in_every_explaining_command(command, folders, tmp_path, capsys):
    """The commands that explain share one report of a model the patch has no rule for
    (``cli._models.model_errors``): one line naming ``--model``."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "a", "text": "k1 = 5 ;"}) + "\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p", "prompt": PROMPT}) + "\n")
    argv = {"sources": ["sources", str(docs), "--question", "? k1", "--template", "key-value", "--answer", " 5", "--no-progress"],
            "batch": ["batch", str(prompts), "--out", str(tmp_path / "out.jsonl"), "--quiet"],
            "faithfulness": ["faithfulness", "--prompts", str(prompts), "--no-progress"]}[command]
    code = main(argv + ["--model", str(folders["opt"])])
    assert_one_line_error(code, capsys.readouterr().err, "--model", "no rule for")


@pytest.mark.parametrize("command", ["explain", "sources", "batch", "faithfulness", "explain-image"])
def test_unusable_device_is_one_line_in_every_explaining_command(command, folders, tmp_path, capsys):
    """``cli._models.usable_device``: a device torch cannot allocate on is one line naming
    ``--device``, before any model loads."""
    from PIL import Image

    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "a", "text": "k1 = 5 ;"}) + "\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p", "prompt": PROMPT}) + "\n")
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    argv = {"explain": ["explain", PROMPT, "--model", str(folders["llama"])],
            "sources": ["sources", str(docs), "--question", "? k1", "--answer", " 5"],
            "batch": ["batch", str(prompts), "--out", str(tmp_path / "out.jsonl")],
            "faithfulness": ["faithfulness", "--prompts", str(prompts)],
            "explain-image": ["explain-image", str(image), "--model", str(tmp_path)]}[command]
    code = main(argv + ["--device", "cuda:97"])
    assert_one_line_error(code, capsys.readouterr().err, "--device 'cuda:97'", "not usable here")
