"""CLIP and SigLIP in ``patch`` (lrp_kernels.hf.families.clip / siglip): the image-text
similarity explained on pixels and caption tokens in one backward, against the independent
float64 reference of the rules (tests/helpers/dual_encoders.py), with padded captions and a
batch of images; the vision towers alone; the forward bit for bit; batched explanations equal
each image alone (CLIP, SigLIP, ViT, DINOv2). DINOv2's rules are also in the family-wide tests
(helpers.models.FAMILIES)."""
import pytest
import torch
import transformers as tr

import lrp_kernels
from helpers.dual_encoders import (VISION, build_dual, captions, images, reference_dual, reference_tower,
                                   similarity_relevance)
from helpers.models import build, make_inputs, relevance

EPS = 1e-12


def _rel_err(got, want):
    return ((got - want).norm() / want.norm()).item()


# CP-LRP on SigLIP: its probe attention's branch (the towers' CP-LRP is in test_patch_families)
@pytest.mark.parametrize("name, rule", [("clip", "attnlrp"), ("siglip", "attnlrp"), ("siglip", "cp-lrp")])
def test_similarity_matches_reference(name, rule):
    model = build_dual(name)
    text, pixels = captions(batch=3), images(batch=2)
    pick = torch.tensor([0, 2])  # image 0 vs caption 0, image 1 vs the shortest (most padded) caption
    want_pix, want_tok, want_logits = similarity_relevance(reference_dual(model, rule), text, pixels, pick)
    with lrp_kernels.patch(model, rules=rule, epsilon=EPS) as handle:
        assert not handle.unsupported
        pix, tok, logits = similarity_relevance(model, text, pixels, pick)
    torch.testing.assert_close(logits, want_logits, rtol=1e-12, atol=1e-12)
    for what, got, want in (("pixels", pix, want_pix), ("tokens", tok, want_tok)):
        assert torch.isfinite(got).all() and want.abs().sum() > 0, what
        assert _rel_err(got, want) < 1e-6, f"{name}/{rule}/{what}: {_rel_err(got, want):.2e}"
    assert not tok[1].any()  # caption 1 is explained by no picked logit: no relevance
    if name == "clip":  # causal text tower, pooled at EOS: the padding after it is never seen
        pad = text["attention_mask"] == 0
        assert pad.any() and (tok[pad] == 0).all()


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_pixels_alone_get_the_whole_similarity(name):
    """The uniform rule of ``t_hat @ i_hat^T`` gives a constant side's half to the other side:
    explaining the pixels only (the text is a constant) doubles their relevance, exactly."""
    model = build_dual(name)
    text, pixels, pick = captions(), images(batch=2), torch.tensor([1, 0])
    with lrp_kernels.patch(model, epsilon=EPS):
        both, _, _ = similarity_relevance(model, text, pixels, pick)
        alone, tok, _ = similarity_relevance(model, text, pixels, pick, with_text=False)
    assert tok is None
    torch.testing.assert_close(alone, 2 * both, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name, dtype", [("clip", torch.float32), ("siglip", torch.bfloat16)], ids=str)
def test_forward_bit_identical_and_restored(name, dtype):
    model = build_dual(name).to(dtype)
    text, pixels = captions(), images(batch=2).to(dtype)
    forward = model.forward

    def run(**kw):
        with torch.no_grad():
            return model(pixel_values=pixels, **text, **kw)
    before = run()
    for attention in ("auto", "exact"):
        with lrp_kernels.patch(model, attention=attention):
            during = run()
            as_tuple = run(return_dict=False)
            with pytest.raises(ValueError, match="return_loss"):
                run(return_loss=True)
        for key in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
            assert torch.equal(during[key], before[key]), (attention, key)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], before.logits_per_image)
    assert "forward" not in vars(model) and model.forward == forward
    assert torch.equal(run().logits_per_image, before.logits_per_image)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_vision_tower_embedding_matches_reference(tower):
    """A vision embedding explained alone: CLIP's projected CLS embedding, SigLIP's attention-
    pooled embedding (its probe is a constant query: the keys get the whole score relevance)."""
    torch.manual_seed(0)
    if tower == "clip":
        model = tr.CLIPVisionModelWithProjection(tr.CLIPVisionConfig(**VISION, projection_dim=16))
    else:
        model = tr.SiglipVisionModel(tr.SiglipVisionConfig(**VISION))
    model = model.double().eval()
    pixels = images(batch=2)
    direction = torch.randn(2, 16 if tower == "clip" else 32, dtype=torch.float64)

    def explain(m):
        x = pixels.clone().requires_grad_(True)
        out = m(pixel_values=x)
        emb = out.image_embeds if tower == "clip" else out.pooler_output
        (emb * direction).sum().backward()
        return (x * x.grad).detach()
    want = explain(reference_tower(model))
    with lrp_kernels.patch(model, epsilon=EPS) as handle:
        assert not handle.unsupported
        got = explain(model)
    assert torch.isfinite(got).all() and _rel_err(got, want) < 1e-6


def _alone_vs_batched(explain_rows, n):
    batched = explain_rows(list(range(n)))
    for i in range(n):
        alone = explain_rows([i])
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_batched_images_equal_each_alone(name):
    model = build_dual(name)
    text, pixels, pick = captions(), images(batch=2), torch.tensor([2, 0])
    with lrp_kernels.patch(model, epsilon=EPS):
        _alone_vs_batched(lambda rows: similarity_relevance(model, text, pixels[rows], pick[rows],
                                                            with_text=False)[0], 2)


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_batched_vision_classifier_equals_each_image_alone(family):
    model, kind = build(family)
    pixels = make_inputs(model, kind, batch=3)["pixel_values"]
    with lrp_kernels.patch(model, epsilon=EPS):
        # target: each row's top logit (helpers.models.target), so rows stay independent
        _alone_vs_batched(lambda rows: relevance(model, kind, {"pixel_values": pixels[rows]})[0]["pixel_values"], 3)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_relevance_view_seeds_the_similarity(name):
    """``patch(view="relevance")``: seeding ``logits_per_image`` (or ``logits_per_text``) with a
    logit's relevance gives ``pixel_values.grad`` = the gradient view's ``x * x.grad``."""
    model = build_dual(name)
    text, pixels, pick = captions(), images(batch=2), torch.tensor([1, 2])
    with lrp_kernels.patch(model, epsilon=EPS):
        want, _, _ = similarity_relevance(model, text, pixels, pick, with_text=False)
    rows = torch.arange(2)
    for side in ("logits_per_image", "logits_per_text"):
        with lrp_kernels.patch(model, epsilon=EPS, view="relevance"):
            x = pixels.clone().requires_grad_(True)
            logits = getattr(model(pixel_values=x, **text), side)
            seed = torch.zeros_like(logits)
            if side == "logits_per_image":
                seed[rows, pick] = logits[rows, pick].detach()
            else:
                seed[pick, rows] = logits[pick, rows].detach()
            logits.backward(seed)
        torch.testing.assert_close(x.grad, want, rtol=1e-9, atol=1e-14)
