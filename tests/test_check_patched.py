"""The conservation check sees every rule application of a *patched* Hugging Face model: linears,
gated products, norms, activations, the attention block (eager and fused), any linear-acting
module (epsilon_module); it names the first module that breaks conservation, and its table
never shows NaN (masked softmax entries carry no relevance)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lrp_kernels
from lrp_kernels import check
from lrp_kernels.backends import dispatch
from lrp_kernels.ops.linear_epsilon import epsilon_module


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).double().eval()


def explain_checked(model, ids, mask, rtol=1e-3, attention="auto"):
    with lrp_kernels.patch(model, attention=attention):
        emb = model.get_input_embeddings()(ids).requires_grad_()
        with check.conservation(rtol=rtol, module=model) as report:
            logits = model(inputs_embeds=emb, attention_mask=mask).logits
            logits[:, -1].max(-1).values.sum().backward()
    return report


@pytest.mark.parametrize("attention,n_tokens,attention_ops", [
    ("auto", 7, {"attention(attnlrp, platform)"}),  # SDPA with the rescalings, one rule
    ("exact", 7, {"softmax", "matmul"}),              # eager composition of the drop-ins
    ("exact", 150, {"attention(attnlrp)"}),           # the fused (chunked) block, one rule
])
def test_patched_llama_records_every_rule(attention, n_tokens, attention_ops):
    model = tiny_llama()
    ids = torch.randint(0, 40, (2, n_tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: masked softmax entries and fully masked query rows
    report = explain_checked(model, ids, mask, attention=attention)

    ops = {r.op for r in report.records}
    assert {"linear_epsilon", "gated_product", "rms_norm_identity"} <= ops
    assert attention_ops <= ops
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears <= {r.label for r in report.records if r.op == "linear_epsilon"}
    assert report.first_violation() is None, report.table()
    assert "nan" not in report.table().lower()
    assert all(math.isfinite(v) for r in report.records for v in (r.r_in, r.r_out))


def test_a_broken_rule_in_a_patched_model_is_named(monkeypatch):
    """A port whose linear rule loses 10 % of the relevance: the check names the first one."""
    real = dispatch._REGISTRY["linear_epsilon_backward_factored"]["torch"].fn
    monkeypatch.setitem(dispatch._REGISTRY["linear_epsilon_backward_factored"], "torch",
                        dispatch._Impl(lambda *a, **k: real(*a, **k) * 0.9, None))
    model = tiny_llama()
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(2))
    report = explain_checked(model, ids, torch.ones_like(ids))
    first = report.first_violation()
    assert first is not None and first.op == "linear_epsilon" and first.label == "lm_head"


def test_epsilon_module_counts_only_its_own_input_gradient():
    """A linear-acting module (a convolution) under epsilon_module: one record, conserved without
    a bias, not expected with one; a second consumer of the same input is not counted."""
    gen = torch.Generator().manual_seed(3)
    for bias in (False, True):
        conv = nn.Conv1d(3, 5, 3, bias=bias).double()
        x = torch.randn(2, 3, 11, generator=gen, dtype=torch.float64, requires_grad=True)
        with check.conservation(rtol=1e-6) as report:
            y = epsilon_module(conv, x, 1e-9, has_bias=bias)
            (y.sum() + 100.0 * x.sum()).backward()  # x also feeds another consumer
        (rec,) = report.records
        assert rec.op == "epsilon_module" and rec.expected is (not bias)
        if not bias:
            assert rec.conserved, report.table()


@pytest.mark.parametrize("attention,op", [("platform", "attention(cp-lrp, platform)"),
                                          ("exact", "attention(cp-lrp)")])
def test_cp_lrp_attention_block_is_expected_to_conserve(attention, op):
    model = tiny_llama()
    ids = torch.randint(0, 40, (1, 140), generator=torch.Generator().manual_seed(4))
    with lrp_kernels.patch(model, rules="cp-lrp", attention=attention):
        emb = model.get_input_embeddings()(ids).requires_grad_()
        with check.conservation() as report:
            model(inputs_embeds=emb).logits[0, -1].max().backward()
    attn = [r for r in report.records if r.op == op]
    assert len(attn) == 2 and all(r.expected and r.conserved for r in attn), report.table()
