"""Smoke test of python/explain_vit.py on a tiny random ViT (no download)."""
import importlib.util
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("PIL")

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "python", "explain_vit.py")


def load_script():
    spec = importlib.util.spec_from_file_location("explain_vit", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_explain_vit_writes_heatmap_grid(tmp_path, capsys):
    from PIL import Image
    mod = load_script()
    out = tmp_path / "grid.png"
    rc = mod.main(["--conv-gammas", "0.1", "100", "--linear-gammas", "0", "0.5", "1",
                   "--scale", "2", "--out", str(out)])
    assert rc == 0 and out.exists()
    img = Image.open(out)
    # tiny ViT: 32 x 32 pixels per heatmap, 2 px padding, scale 2 -> (3 * 32 + 2 * 2) * 2 wide
    assert img.size == ((3 * 32 + 2 * 2) * 2, (2 * 32 + 2) * 2)
    text = capsys.readouterr().out
    assert text.count("sum R =") == 6 and "wrote" in text


def test_explain_vit_heatmaps_depend_on_gamma_and_model_is_restored():
    import torch
    mod = load_script()
    model = mod.tiny_vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pixels = mod.load_image(None, model)
    handle = mod.attnlrp_patch(model)
    try:
        maps = mod.grid_search(model, pixels, None, [0.1], [0.0, 1.0], verbose=False)
    finally:
        if handle is not None:
            handle.remove()
    assert all(torch.isfinite(m).all() for m in maps)
    assert not torch.allclose(maps[0], maps[1])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_explain_vit_bad_model_path_is_a_clear_error(tmp_path):
    mod = load_script()
    with pytest.raises(SystemExit, match="checkpoint directory"):
        mod.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
