"""Smoke test of python/explain_image_text.py on its tiny random CLIP (no download), and its
batched per-caption heatmaps checked against ``explain_image`` one image at a time."""
import importlib.util
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "python", "explain_image_text.py")


def load_script():
    spec = importlib.util.spec_from_file_location("explain_image_text", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_writes_the_grid_and_the_contrast_is_the_difference(tmp_path, capsys):
    from PIL import Image
    mod = load_script()
    out = tmp_path / "grid.png"
    assert mod.main(["--out", str(out), "--scale", "2"]) == 0
    # 2 images x (3 captions + contrast), 32 x 32 pixels each, 2 px padding, scale 2
    assert Image.open(out).size == ((4 * 32 + 3 * 2) * 2, (2 * 32 + 2) * 2)
    text = capsys.readouterr().out
    gap = float(text.split("max |.| = ")[1].split()[0])
    assert gap < 1e-5 and text.count("image ") == 2


def test_batched_maps_equal_explain_image_per_image():
    """Pixels alone (captions constant) get the similarity's whole relevance; explain_image reads
    the tokens too (half each): the script's heatmaps are twice explain_image's, image by image."""
    from lrp_kernels.explanations.image import explain_image
    mod = load_script()
    model, tok = mod.tiny_clip()
    captions = ["a photo of a dog", "the cat"]
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    maps, logits, _ = mod.explain(model, tok, pixels, captions)
    for i in range(3):
        for c in range(2):
            exp = explain_image(model, None, pixels[i], captions, tokenizer=tok, target=c)
            assert abs(exp.logits[c] - float(logits[i, c])) < 1e-5
            torch.testing.assert_close(maps[c, i], 2 * exp.relevance, rtol=1e-4, atol=1e-7)
