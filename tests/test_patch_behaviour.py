"""A patched model behaves like the model: the same forward bit for bit, copies, saves, pickling
refused clearly, no nesting, options validated. (Relevance values: test_patch_families.py.)"""
from __future__ import annotations

import copy
import io
import json
import math
import pickle

import pytest
import torch

import lrp_kernels
from helpers.models import FAMILIES, build, make_inputs, relevance



def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_forward_is_bit_identical(family, dtype):
    """Every family in every dtype: the default path, and the exact path (Gemma 2's soft-capped
    eager attention always takes it), whose forward values are the model's own too."""
    model, kind = build(family)
    model = model.to(dtype)
    inputs = make_inputs(model, kind, n=9)
    before = _logits(model, inputs)
    for attention in ("auto", "exact"):
        with lrp_kernels.patch(model, attention=attention):
            during = _logits(model, inputs)
        assert torch.equal(during, before), (attention, (during.float() - before.float()).abs().max())


def test_soft_capped_attention_cannot_take_the_platform_path():
    model, kind = build("gemma2")
    with lrp_kernels.patch(model, attention="platform"), pytest.raises(ValueError, match="softcap"):
        _logits(model, make_inputs(model, kind))
    with lrp_kernels.patch(model):  # auto: the exact path serves it
        assert torch.isfinite(_logits(model, make_inputs(model, kind))[1]).all()


def test_deepcopy_gives_an_independent_unpatched_copy():
    model, kind = build("llama")
    inputs = make_inputs(model, kind)
    plain, _ = relevance(copy.deepcopy(model), kind, inputs)  # plain gradient x input
    with lrp_kernels.patch(model) as handle:
        explained, _ = relevance(model, kind, inputs)
        twin = copy.deepcopy(model)
        assert handle.active and vars(model)["_lrp_kernels_patch"] is handle
        # the original is still patched: same relevance as before the copy
        again, _ = relevance(model, kind, inputs)
        assert torch.equal(again["inputs_embeds"], explained["inputs_embeds"])
    # the copy is unpatched (plain gradient), independent (own weights), and patchable
    assert "_lrp_kernels_patch" not in vars(twin)
    assert all(p.requires_grad for p in twin.parameters())
    got, _ = relevance(twin, kind, inputs)
    assert torch.equal(got["inputs_embeds"], plain["inputs_embeds"])
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)
    assert not torch.equal(twin.lm_head.weight, model.lm_head.weight)
    with lrp_kernels.patch(twin):
        relevance(twin, kind, inputs)


def test_pickling_a_patched_model_is_refused_clearly():
    model, _ = build("llama")
    with lrp_kernels.patch(model):
        for save in (lambda: pickle.dumps(model), lambda: torch.save(model, io.BytesIO())):
            with pytest.raises(TypeError, match="remove"):
                save()
    torch.save(model, io.BytesIO())  # unpatched again: works


def test_save_pretrained_while_patched_saves_what_an_unpatched_save_would(tmp_path):
    model, _ = build("llama")
    model.save_pretrained(tmp_path / "plain")
    with lrp_kernels.patch(model) as handle:
        model.save_pretrained(tmp_path / "patched")
        assert handle.active and model.config.use_cache is False  # still patched afterwards
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    patched = json.loads((tmp_path / "patched" / "config.json").read_text())
    assert patched == plain
    a = (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert (tmp_path / "patched" / "model.safetensors").read_bytes() == a


@pytest.mark.parametrize("order", ["inner-first", "outer-first"])
def test_nested_and_overlapping_patches_are_refused_without_residue(order):
    model, kind = build("llama")
    inputs = make_inputs(model, kind)
    before = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    outer = lrp_kernels.patch(model)
    with pytest.raises(RuntimeError, match="already part of a patched model"):
        lrp_kernels.patch(model.model.layers[0].mlp, strict=False)
    outer.remove()
    inner = lrp_kernels.patch(model.model.layers[0].mlp, strict=False)
    with pytest.raises(RuntimeError, match="already part of a patched model"):
        lrp_kernels.patch(model)
    handles = [inner, outer] if order == "inner-first" else [outer, inner]
    for h in handles:
        h.remove()
    after = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    assert after == before
    assert all(p.requires_grad for p in model.parameters())
    _logits(model, inputs)


@pytest.mark.parametrize("epsilon", [float("nan"), float("inf"), -1e-6, 0.0, True, "1e-6"])
def test_bad_epsilon_is_refused(epsilon):
    model, _ = build("llama")
    with pytest.raises(ValueError, match="epsilon"):
        lrp_kernels.patch(model, epsilon=epsilon)
    assert "_lrp_kernels_patch" not in vars(model)


def test_bad_attention_and_backend_choices_name_the_argument():
    model, _ = build("llama")
    with pytest.raises(ValueError, match="attention"):
        lrp_kernels.patch(model, attention="fastest")
    with pytest.raises(ValueError, match="backend"):
        lrp_kernels.patch(model, backend="gpu")


def test_platform_and_exact_attention_agree_within_the_documented_bound():
    """Deviation per score eps / (|S0| + eps): tiny with eps = 1e-9 on these random scores."""
    model, kind = build("llama")
    inputs = make_inputs(model, kind, n=12)
    rel = {}
    for attention in ("platform", "exact"):
        with lrp_kernels.patch(model, epsilon=1e-9, attention=attention):
            rel[attention], _ = relevance(model, kind, inputs)
    a, b = rel["platform"]["inputs_embeds"], rel["exact"]["inputs_embeds"]
    assert math.isfinite(a.sum().item())
    assert ((a - b).norm() / b.norm()).item() < 1e-6


def test_relevance_view_hooks_on_a_patched_model_are_refused():
    """A relevance-view Zennit-style rule on a gradient-view patched module would mix views
    (relevance sums of 1e9 for a logit of 0.2): refused; the gradient view is fine."""
    from lrp_kernels.hooks import Epsilon

    model, _ = build("llama")
    with lrp_kernels.patch(model):
        with pytest.raises(ValueError, match="mix relevance and gradients"):
            Epsilon().register(model.lm_head)
        Epsilon(relevance=False).register(model.lm_head).remove()
    Epsilon().register(model.lm_head).remove()  # unpatched again: fine


@pytest.mark.parametrize("norm", [torch.nn.LayerNorm(6), torch.nn.BatchNorm1d(6), torch.nn.GroupNorm(2, 6)],
                         ids=lambda m: type(m).__name__)
def test_layer_rules_refuse_normalisation_layers(norm):
    from lrp_kernels.hooks import AlphaBeta, Epsilon, Flat, Gamma, WSquare, ZPlus

    for rule in (Gamma(), AlphaBeta(), ZPlus(), Flat(), WSquare()):
        with pytest.raises(TypeError, match="normalisation layer"):
            rule.register(norm)
    Epsilon().register(norm).remove()  # the epsilon rule is defined for any module


def test_unexplained_parts_are_named_module_by_module():
    """No family (Bloom): besides the missing family, every attention module that computes its
    softmax in its own code, and every normalisation without a rule, is named."""
    import warnings

    import transformers as tr

    model = tr.BloomForCausalLM(tr.BloomConfig(vocab_size=50, hidden_size=16, n_layer=2, n_head=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = lrp_kernels.patch(model, strict=False)
    handle.remove()
    message = "\n".join(str(w.message) for w in caught)
    for i in range(2):
        assert f"transformer.h.{i}.self_attention (BloomAttention): attention computed in its own forward" in message

    class OwnNorm(torch.nn.Module):  # a parameter-free LayerNorm of a model's own code
        def forward(self, x):
            return torch.nn.functional.layer_norm(x, x.shape[-1:])

    llama, _ = build("llama")
    llama.model.norm = OwnNorm()
    with pytest.raises(lrp_kernels.UnsupportedModelError, match=r"model.norm \(OwnNorm\): normalisation"):
        lrp_kernels.patch(llama)
