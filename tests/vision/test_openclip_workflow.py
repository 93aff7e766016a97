"""The OpenCLIP workflow on a real open_clip model (ViT-S-32, the smallest ViT config, random
weights, image size 64 and context 8 so that it stays fast): tracing with
lrp_kernels.explicit.openclip, Gamma hooks, the image and the caption explained.

open_clip needs torchvision, which does not import beside the main test environment's torch:
this module runs in the cached vision environment, driven by tests/test_openclip.py (which
fails if anything here is skipped); in the main environment it skips as a whole.

Tolerances: float64 1e-9 relative against the oracle; gamma = 0 against the epsilon rule 1e-7
(two formulas of one rule); the traced forward against open_clip's own 1e-6 (float32).
"""
from __future__ import annotations

import importlib.util
import math
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

try:
    import open_clip  # noqa: F401  (the guard: skip where it does not import)
    from open_clip.transformer import ResidualAttentionBlock
except Exception as err:  # ImportError, or torchvision failing to import beside this torch
    pytest.skip(f"open_clip is not importable here ({type(err).__name__}); tests/test_openclip.py runs "
                f"this module in the vision environment", allow_module_level=True)

from helpers import oracle as O
from helpers.mha_oracle import EPS, oracle_mha
from lrp_kernels.explicit import openclip as lrp_openclip
from lrp_kernels.hooks import Gamma, LayerMapComposite

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "python" / "explain_openclip.py"
NAME, IMAGE_SIZE, CONTEXT = "ViT-S-32", 64, 8
CAPTIONS = ["a dog", "a cat", "a car"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("explain_openclip", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def clip(script):
    """(model, tokenizer, image, tokens), built with every network connection refused."""
    def refuse(*args, **kwargs):
        raise AssertionError("open_clip tried to reach the network")
    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", refuse)
    try:
        model, tokenizer = script.load_model(NAME, None, IMAGE_SIZE, CONTEXT)
        tokens = tokenizer(CAPTIONS)
    finally:
        mp.undo()
    image = script.load_image(None, model)
    return model, tokenizer, image, tokens


def relevance(traced, sim, image, tokens, target, hooks=None):
    """(pixel relevance [1, 3, H, W], token relevance [n, context, width]) of similarity[0, target]."""
    ctx = hooks.context(traced) if hooks is not None else _nothing()
    with ctx:
        x = image.clone().requires_grad_(True)
        emb = sim.embed(tokens).detach().requires_grad_(True)
        traced(x, emb, tokens)[0, target].backward()
    return x.grad, emb.grad


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def gammas(conv, linear):
    return LayerMapComposite([(nn.Conv2d, Gamma(conv)), (nn.Linear, Gamma(linear))])


# ---- forward ---------------------------------------------------------------------------------

def test_traced_similarity_is_open_clips(clip):
    model, _, image, tokens = clip
    sim = lrp_openclip.CLIPSimilarity(model)
    lrp = lrp_openclip.composite()
    traced = lrp_openclip.register(lrp, sim, image, tokens)
    try:
        with torch.no_grad():
            want = model.encode_image(image, normalize=True) @ model.encode_text(tokens, normalize=True).T
            got = traced(image, sim.embed(tokens), tokens)
    finally:
        lrp.remove()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the padding after the last end token changes nothing (causal text attention)
    short = sim.trim(tokens)
    assert short.shape[1] == int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(sim(image, sim.embed(short), short), want, rtol=1e-6, atol=1e-6)
    kinds = {(r.label, r.status) for r in lrp.operations}
    assert ("module MultiheadAttention", "module rule") in kinds
    assert all(p.requires_grad for p in model.parameters())  # remove() restored the flags


# ---- one open_clip block against the oracle ----------------------------------------------------

def _block_oracle(block, x, mask, R_out):
    """Relevance of ``x`` through open_clip's ResidualAttentionBlock from the float64 rules:
    epsilon sums, LayerNorm rule, MHA (helpers.mha_oracle), epsilon linears, identity GELU."""
    x = x.double()
    ln1, ln2, fc, proj = block.ln_1, block.ln_2, block.mlp.c_fc, block.mlp.c_proj

    def p(t):
        return None if t is None else t.detach().double()
    n1 = O.layer_norm(x, p(ln1.weight), p(ln1.bias), ln1.eps)
    with torch.no_grad():
        a = block.attn(n1, n1, n1, need_weights=False, attn_mask=mask)[0].double()
    x1 = x + a
    n2 = O.layer_norm(x1, p(ln2.weight), p(ln2.bias), ln2.eps)
    h = O.linear_z(n2, p(fc.weight), p(fc.bias))
    g = torch.nn.functional.gelu(h)
    m = O.linear_z(g, p(proj.weight), p(proj.bias))
    R_x1a, R_m = O.add_R([x1, m], R_out, EPS)
    R_g = O.linear_epsilon_R(g, p(proj.weight), p(proj.bias), R_m, EPS)
    R_n2 = O.linear_epsilon_R(n2, p(fc.weight), p(fc.bias), R_g, EPS)   # identity rule on the GELU
    R_x1 = R_x1a + O.layer_norm_R(x1, p(ln2.weight), p(ln2.bias), R_n2, ln2.eps, EPS)
    R_xa, R_a = O.add_R([x, a], R_x1, EPS)
    _, _, (rq, rk, rv) = oracle_mha(block.attn, n1, n1, n1, dict(attn_mask=mask), R_a, view="R")
    return R_xa + O.layer_norm_R(x, p(ln1.weight), p(ln1.bias), rq + rk + rv, ln1.eps, EPS)


@pytest.mark.parametrize("rule_causal", [False, True])
def test_open_clip_block_matches_the_oracle(rule_causal):
    """open_clip's own ResidualAttentionBlock (odd sizes, text-style causal float mask or none),
    traced with the OpenCLIP composite (epsilon on the linears), float64."""
    torch.manual_seed(1)
    block = ResidualAttentionBlock(6, 3, mlp_ratio=1.5).double().eval()
    with torch.no_grad():
        for name, prm in block.named_parameters():
            if name.endswith("bias"):
                prm.normal_(0, 0.3)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    mask = torch.full((5, 5), -math.inf, dtype=torch.float64).triu_(1) if rule_causal else None
    R_out = torch.randn(2, 5, 6, dtype=torch.float64)
    want = _block_oracle(block, x, mask, R_out)
    lrp = lrp_openclip.composite(linear_rule="epsilon")
    dummy = {"q_x": x} if mask is None else {"q_x": x, "attn_mask": mask}
    traced = lrp.register(block, dummy_inputs=dummy)
    try:
        xx = x.clone().requires_grad_(True)
        out = traced(xx) if mask is None else traced(xx, attn_mask=mask)
        out.backward(R_out)
    finally:
        lrp.remove()
    torch.testing.assert_close(xx.grad, want, rtol=1e-9, atol=1e-12)


# ---- the rules on the whole model ------------------------------------------------------------

def test_gamma_zero_is_the_epsilon_rule(clip):
    """Gamma(0) hooks on Conv2d / Linear == the Composite's own epsilon rule on them (float64)."""
    import copy
    model, _, image, tokens = clip
    model = copy.deepcopy(model).double()
    image = image.double()
    sim = lrp_openclip.CLIPSimilarity(model)
    lrp = lrp_openclip.composite(linear_rule="epsilon")
    traced = lrp_openclip.register(lrp, sim, image, tokens)
    try:
        want_x, want_t = relevance(traced, sim, image, tokens, 1)
    finally:
        lrp.remove()
    lrp = lrp_openclip.composite()
    traced = lrp_openclip.register(lrp, sim, image, tokens)
    try:
        got_x, got_t = relevance(traced, sim, image, tokens, 1, gammas(0.0, 0.0))
    finally:
        lrp.remove()
    for got, want in ((got_x, want_x), (got_t, want_t)):
        assert torch.isfinite(got).all() and want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12 * float(want.abs().max()))


@pytest.fixture(scope="module")
def grid(script, clip):
    """The example's grid search (2 x 2) on the model: (heatmaps, token relevances)."""
    model, _, image, tokens = clip
    sim = lrp_openclip.CLIPSimilarity(model)
    lrp = lrp_openclip.composite()
    traced = lrp_openclip.register(lrp, sim, image, tokens)
    try:
        return script.grid_search(traced, sim, image, tokens, 0, [0.1, 100.0], [0.0, 1.0], verbose=False)
    finally:
        lrp.remove()


def test_grid_is_finite_and_not_degenerate(grid):
    heatmaps, texts = grid
    assert all(torch.isfinite(h).all() and h.abs().max() > 0 for h in heatmaps)
    for i in range(len(heatmaps)):
        for j in range(i + 1, len(heatmaps)):
            assert not torch.allclose(heatmaps[i], heatmaps[j], rtol=1e-3, atol=1e-4), (i, j)
    # the linear gamma changes the caption's relevance too; the conv gamma (image side) does not
    assert not torch.allclose(texts[0], texts[1]) and torch.allclose(texts[0], texts[2])


def test_caption_relevance_sits_on_its_tokens(clip, grid, script):
    """Only the explained caption's tokens up to its end token get relevance (causal text
    attention, pooling at the end token); the table decodes them."""
    model, tokenizer, image, tokens = clip
    _, texts = grid
    end = int(tokens[0].argmax())
    tok_rel = texts[0]
    assert (tok_rel[: end + 1] != 0).all() and (tok_rel[end + 1:] == 0).all()
    table = script.token_relevance(tokenizer, tokens[0], tok_rel)
    assert [t for t, _ in table] == ["<start_of_text>", "a", "dog", "<end_of_text>"]
    sim = lrp_openclip.CLIPSimilarity(model)
    lrp = lrp_openclip.composite()
    traced = lrp_openclip.register(lrp, sim, image, tokens)
    try:
        _, emb_grad = relevance(traced, sim, image, tokens, 0, gammas(0.1, 0.0))
    finally:
        lrp.remove()
    assert (emb_grad[1:] == 0).all()  # the other captions get nothing
    torch.testing.assert_close(emb_grad[0].sum(-1), tok_rel)


def test_example_writes_one_png_grid(script, tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "grid.png"
    rc = script.main(["--image-size", str(IMAGE_SIZE), "--context-length", str(CONTEXT), "--conv-gammas", "0.5",
                      "--linear-gammas", "0", "0.25", "--target", "1", "--scale", "1", "--out", str(out)])
    assert rc == 0
    img = Image.open(out)
    assert img.size == (2 * IMAGE_SIZE + 2, IMAGE_SIZE)  # one row, two cells, 2 px padding
    text = capsys.readouterr().out
    assert text.count("sum R pixels") == 2 and "'a cat'   <- explained" in text and "wrote" in text
    assert "cat" in text.split("token relevance of")[1]


def test_example_bad_arguments(script):
    with pytest.raises(SystemExit, match="--target"):
        script.main(["--target", "5", "--out", "x.png"])
    with pytest.raises(SystemExit, match="local file"):
        script.main(["--weights", "/nonexistent/model.bin", "--out", "x.png"])
