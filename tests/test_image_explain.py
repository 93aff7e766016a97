"""``explain_image`` and ``lrp-kernels explain-image``: an image against captions (tiny CLIP /
SigLIP saved with a tokenizer and image processor built here, no hub), a vision embedding
(DINOv2) and a class logit (ViT), each against the independent float64 reference of the rules;
the PNG; one clear error (CLI: exit 2, one line) for every kind of bad image."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lrp_kernels.cli import main
from lrp_kernels.explanations.api import ExplainError
from lrp_kernels.explanations.image import ImageError, explain_image

import transformers as tr

from helpers.dual_encoders import (TEXT, VISION, build_dinov2, build_dual, image_processor, images, reference_dual, save_tiny,
                                   similarity_relevance, tiny_tokenizer)
from helpers.models import build, reference_model

CAPTIONS = ["a dog", "a photo of a cat", "the car"]


def _rel_err(got, want):
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: save_tiny(name, str(tmp_path_factory.mktemp(name))) for name in ("clip", "siglip", "dinov2")}


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(path)
    return str(path)


# ----------------------------------------------------------------------------- API

@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_similarity_matches_reference(name):
    """Pixels and the explained caption's tokens, one backward; the default target is the most
    likely caption, and naming it (text or index) explains the same."""
    model, tok = build_dual(name), tiny_tokenizer()
    pixels = images(batch=1)[0]
    exp = explain_image(model, None, pixels, CAPTIONS, tokenizer=tok, epsilon=1e-12)
    c = exp.meta["target_index"]
    assert exp.target == CAPTIONS[c] and c == int(np.argmax(exp.logits))
    padding = "max_length" if name == "siglip" else True
    enc = tok(CAPTIONS, padding=padding, truncation=True, max_length=16, return_tensors="pt")
    text = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    want_pix, want_tok, logits = similarity_relevance(reference_dual(model), text, pixels[None], torch.tensor([c]))
    assert _rel_err(exp.relevance.double(), want_pix[0].sum(0)) < 1e-5
    real = enc["attention_mask"][c].bool() if name == "clip" else torch.ones(16, dtype=torch.bool)
    assert _rel_err(exp.token_relevance.double(), want_tok[c][real]) < 1e-5
    assert len(exp.tokens) == int(real.sum()) and exp.tokens[0] == "<|startoftext|>"
    assert [w for w in CAPTIONS[c].split() if w in exp.tokens] == CAPTIONS[c].split()  # whole words, no </w>
    torch.testing.assert_close(torch.tensor(exp.logits, dtype=torch.float64), logits[0].float().double())
    probs = torch.tensor(exp.probabilities)
    want = torch.sigmoid(logits[0]) if name == "siglip" else torch.softmax(logits[0], -1)
    torch.testing.assert_close(probs, want.float())
    other = (c + 1) % 3
    by_text = explain_image(model, None, pixels, CAPTIONS, tokenizer=tok, target=CAPTIONS[other])
    by_index = explain_image(model, None, pixels, CAPTIONS, tokenizer=tok, target=other)
    assert by_text.target == CAPTIONS[other] and torch.equal(by_text.relevance, by_index.relevance)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_embedding_norm_and_class_logits_match_reference():
    """DINOv2's embedding norm (``e . e/|e|``, the unit vector a constant), a ViT class logit and
    a CLIP classifier's (a "clip" model type without captions)."""
    model = build_dinov2(classifier=False)
    pixels = images(batch=1)
    x = pixels.clone().requires_grad_(True)
    e = reference_model(model)(pixel_values=x).pooler_output[0]
    (e * (e / e.norm()).detach()).sum().backward()
    exp = explain_image(model, None, pixels, epsilon=1e-12)
    assert exp.target == "embedding norm" and abs(exp.score - e.norm().item()) < 1e-5
    assert _rel_err(exp.relevance.double(), (x * x.grad)[0].sum(0)) < 1e-5

    vit, _ = build("vit")
    pixels = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    x = pixels.clone().requires_grad_(True)
    reference_model(vit)(pixel_values=x).logits[0, 2].backward()
    exp = explain_image(vit, None, pixels, target=2, epsilon=1e-12)
    assert exp.meta["objective"] == "class logit" and exp.target == vit.config.id2label[2]
    assert _rel_err(exp.relevance.double(), (x * x.grad)[0].sum(0)) < 1e-5

    torch.manual_seed(0)
    config = tr.CLIPConfig(vision_config=VISION, text_config=dict(TEXT), num_labels=3)
    clf = tr.CLIPForImageClassification(config).double().eval()
    pixels = images(batch=1)
    x = pixels.clone().requires_grad_(True)
    logits = reference_model(clf)(pixel_values=x).logits[0]
    logits[int(logits.argmax())].backward()
    exp = explain_image(clf, None, pixels, epsilon=1e-12)
    assert exp.meta["target_index"] == int(logits.argmax())
    assert _rel_err(exp.relevance.double(), (x * x.grad)[0].sum(0)) < 1e-5


def test_pil_image_goes_through_the_processor_and_png_has_both_panels(tmp_path, photo):
    model, proc = build_dual("clip").float(), image_processor("clip")
    exp = explain_image(model, proc, photo, CAPTIONS, tokenizer=tiny_tokenizer())
    direct = explain_image(model, None, proc(images=Image.open(photo), return_tensors="pt")["pixel_values"],
                           CAPTIONS, tokenizer=tiny_tokenizer())
    assert torch.equal(exp.relevance, direct.relevance) and torch.isfinite(exp.relevance).all()
    # the overlay shows the image (grey) where the relevance is 0, the heatmap's colour where it is largest
    exp.relevance[0, 0] = 0.0
    grey = exp.image[0, 0].astype(float).mean()
    assert np.abs(exp.overlay()[0, 0].astype(float) - grey).max() <= 1
    top = np.unravel_index(int(exp.relevance.abs().argmax()), exp.relevance.shape)
    assert (exp.overlay(alpha=1.0)[top] == exp.heatmap()[top]).all()
    out = Image.open(exp.to_png(str(tmp_path / "h.png"), scale=3))
    assert out.size == (2 * 32 * 3 + 4, 32 * 3) and out.mode == "RGB"


def _write(tmp_path, name, mode, size=(20, 20)):
    path = tmp_path / name
    Image.new(mode, size).save(path)
    return str(path)


def test_bad_images_and_arguments_are_clear_errors(tmp_path):
    model, tok = build_dual("clip"), tiny_tokenizer()
    proc = image_processor("clip")
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    cases = [
        (str(tmp_path / "missing.png"), "no such file"),
        (str(tmp_path), "is a folder"),
        (str(text_file), "not an image"),
        (_write(tmp_path, "deep.png", "I;16"), "mode 'I;16'"),
        (Image.new("F", (8, 8)), "mode 'F'"),
        (Image.new("CMYK", (8, 8)), "mode 'CMYK'"),
        (torch.zeros(3, 16, 16), "3 x 32 x 32"),
        (torch.zeros(2, 3, 32, 32), "one image"),
        (torch.full((3, 32, 32), float("nan")), "NaN"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), "floating point"),
        ([1, 2, 3], "got list"),
    ]
    for image, needle in cases:
        with pytest.raises(ImageError, match=needle.replace("(", r"\(")):
            explain_image(model, proc, image, CAPTIONS, tokenizer=tok)
    with pytest.raises(ImageError, match="processor="):
        explain_image(model, None, Image.new("RGB", (8, 8)), CAPTIONS, tokenizer=tok)
    pixels = images(batch=1)
    for kwargs, needle in [({"captions": None}, "pass captions="), ({"captions": []}, "non-empty"),
                           ({"captions": CAPTIONS, "target": "a bus"}, "not one of"),
                           ({"captions": CAPTIONS, "target": 7}, "out of range"),
                           ({"captions": CAPTIONS, "rules": "gradient"}, "rules")]:
        with pytest.raises(ExplainError, match=needle):
            explain_image(model, None, pixels, tokenizer=tok, **kwargs)
    with pytest.raises(ExplainError, match="image-text model"):
        explain_image(build_dinov2(), None, pixels, CAPTIONS)
    with pytest.raises(ExplainError, match="tokenizer"):
        explain_image(model, proc, pixels, CAPTIONS)


# ----------------------------------------------------------------------------- CLI

def run_cli(capsys, *argv):
    code = main(["explain-image", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_captions_png_and_json(capsys, tmp_path, folders, photo):
    out_png = str(tmp_path / "heat.png")
    code, out, err = run_cli(capsys, photo, "--model", folders["clip"], "--caption", "a dog", "--caption",
                             "a photo of a cat", "--out", out_png)
    assert code == 0, err
    assert "[0] 'a dog'" in out and "[1] 'a photo of a cat'" in out and "<- explained" in out
    probs = [float(line.split("probability")[1].split()[0]) for line in out.splitlines() if "probability" in line]
    assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-3  # CLIP: softmax over the captions
    assert "top tokens of" in out and f"wrote {out_png}" in out
    assert Image.open(out_png).size[0] > Image.open(out_png).size[1]  # two panels side by side
    out_json = str(tmp_path / "h.json")
    code, out, err = run_cli(capsys, photo, "--model", folders["siglip"], "--caption", "a dog", "--caption",
                             "the car", "--target", "the car", "--out", out_json)
    assert code == 0, err
    data = json.loads(open(out_json).read())
    assert data["target"] == "the car" and len(data["relevance"]) == 32 and data["captions"] == ["a dog", "the car"]
    code, out, err = run_cli(capsys, photo, "--model", folders["dinov2"], "--target", "0")
    assert code == 2 and "embedding" in err  # an embedding model has no caption / class to pick
    code, out, err = run_cli(capsys, photo, "--model", folders["dinov2"])
    assert code == 0 and "embedding norm" in out, err


def test_cli_bad_input_is_one_line(capsys, tmp_path, folders, photo):
    text_file = tmp_path / "x.jpg"
    text_file.write_text("hello")
    clip = folders["clip"]
    cases = [
        ((str(tmp_path / "none.png"), "--model", clip, "--caption", "a dog"), "no such file"),
        ((str(text_file), "--model", clip, "--caption", "a dog"), "not an image"),
        ((_write(tmp_path, "d.png", "I;16"), "--model", clip, "--caption", "a dog"), "mode 'I;16'"),
        ((photo, "--model", clip, "--caption", "a dog", "--out", str(tmp_path / "h.html")), "--out must end"),
        ((photo, "--model", folders["dinov2"], "--caption", "a dog"), "image-text model"),
        ((photo, "--model", str(tmp_path / "nomodel"), "--caption", "a dog"), "no such folder"),
        ((photo, "--model", clip), "pass captions="),
        ((photo, "--model", clip, "--caption", "a dog", "--target", "a bus"), "not one of"),
        ((photo, "--model", clip, "--caption", "a dog", "--device", "nodevice"), "--device 'nodevice'"),
    ]
    for argv, needle in cases:
        code, out, err = run_cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (argv, err)
        assert lines[0].startswith("lrp-kernels explain-image: error:") and needle in lines[0], lines[0]


# ----------------------------------------------------------------------------- invariant

from hypothesis import given, settings, strategies as st  # noqa: E402

_WORDS = ["a", "dog", "cat", "car", "photo", "of", "the"]
_caption = st.lists(st.sampled_from(_WORDS), min_size=1, max_size=5).map(" ".join)


@settings(max_examples=3)  # about 1 s per example on a quiet CPU
@given(target=_caption, others=st.lists(_caption, min_size=1, max_size=3), order=st.randoms())
def test_a_captions_explanation_does_not_depend_on_the_other_captions(target, others, order):
    """The explained similarity logit depends on its own caption only: other captions, their
    order and (CLIP) the padding they add after its end-of-text token change nothing."""
    model, tok = _cached_clip()
    pixels = images(batch=1, seed=4)[0]
    alone = explain_image(model, None, pixels, [target], tokenizer=tok, target=0)
    captions = [target] + others
    order.shuffle(captions)
    index = captions.index(target)
    among = explain_image(model, None, pixels, captions, tokenizer=tok, target=index)
    assert among.tokens == alone.tokens and abs(among.score - alone.score) < 1e-9
    torch.testing.assert_close(among.relevance, alone.relevance, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(among.token_relevance, alone.token_relevance, rtol=1e-6, atol=1e-9)


_CLIP = []


def _cached_clip():
    if not _CLIP:
        _CLIP.append((build_dual("clip"), tiny_tokenizer()))
    return _CLIP[0]
