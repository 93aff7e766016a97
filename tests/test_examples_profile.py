"""Smoke test of python/profile_long_context.py on llama-tiny (CPU, short lengths)."""
import importlib.util
import json
import os

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "python", "profile_long_context.py")


def load_script():
    spec = importlib.util.spec_from_file_location("profile_long_context", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_script_table_json_and_plot(tmp_path, capsys):
    mod = load_script()
    png, js = tmp_path / "p.png", tmp_path / "rows.jsonl"
    assert mod.main(["--model", "llama-tiny", "--seq", "16,32", "--device", "cpu",
                     "--plot", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "x time" in out and "wrote" in out
    assert png.exists() and png.stat().st_size > 0
    rows = [json.loads(x) for x in js.read_text().splitlines()]
    assert [(r["seq"], r["mode"]) for r in rows] == [(16, "plain"), (16, "lrp"), (32, "plain"), (32, "lrp")]
    assert all(r["finite"] for r in rows)
