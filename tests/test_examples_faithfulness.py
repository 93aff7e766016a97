"""Smoke test of python/faithfulness.py on a few held-out prompts of the shipped model."""
import importlib.util
import os

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "python", "faithfulness.py")


def test_faithfulness_script_table_and_plot(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("faithfulness_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    png = tmp_path / "curves.png"
    assert mod.main(["--prompts", "4", "--removal", "replace", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:5]}
    assert set(rows) == {"attnlrp", "cp-lrp", "gradxinput", "random"}
    assert all(r[1] == "4" for r in rows.values())
    assert "AttnLRP - gradient x input" in out and f"wrote {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
