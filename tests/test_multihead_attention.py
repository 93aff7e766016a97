"""AttnLRP / CP-LRP on torch.nn.MultiheadAttention (lrp_kernels.ops.multihead) through every front
end — the Composite's drop-in (module and fx paths), the Zennit-style rule, the patch — against
the float64 oracle of the rules (tests/helpers/oracle.py) composed by hand: epsilon rule on the
in- and out-projections, the attention block of the oracle in between.

Tolerances: float64 1e-9 relative (the oracle and the rule compute the same formulas in a
different order); float32 forward 2e-6 against the module's own forward.
"""
from __future__ import annotations

import math
import operator
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lrp_kernels
from helpers import oracle as O
from helpers.mha_oracle import oracle_mha
from lrp_kernels.hooks import Gamma, LayerMapComposite, MultiheadAttentionRule
from lrp_kernels.modules import MultiheadAttentionCPLRP, MultiheadAttentionLRP
from lrp_kernels.ops.multihead import multihead_attention

EPS = 1e-6
F64 = dict(rtol=1e-9, atol=1e-12)


# ---- cases ----------------------------------------------------------------------------------

CASES = {
    # name: (module kwargs, self-attention?, mask kinds)
    "self": (dict(), True, ()),
    "self-batch-first-causal": (dict(batch_first=True), True, ("causal",)),
    "cross-kdim-vdim-padding": (dict(kdim=5, vdim=3, batch_first=True), False, ("kpm",)),
    "cross-bool-mask-3d": (dict(), False, ("bool3d", "kpm")),
    "bias-kv-zero-attn": (dict(add_bias_kv=True, add_zero_attn=True), True, ("bool2d",)),
    "no-bias-float-padding": (dict(bias=False), False, ("kpm_float",)),
}
SIZES = dict(E=6, H=3, B=2, L=3, S=5)


def build(case: str, dtype=torch.float64, seed: int = 0):
    kwargs, self_attn, masks = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(SIZES["E"], SIZES["H"], **kwargs).to(dtype).eval()
    with torch.no_grad():  # non-zero biases everywhere (the bias terms of the rules matter)
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.3, generator=gen)
    B, L, S, E = SIZES["B"], SIZES["L"], SIZES["S"], SIZES["E"]
    S = L if self_attn else S
    q = torch.randn(B, L, E, dtype=dtype, generator=gen)
    if self_attn:
        k = v = q
    else:
        k = torch.randn(B, S, kwargs.get("kdim") or E, dtype=dtype, generator=gen)
        v = torch.randn(B, S, kwargs.get("vdim") or E, dtype=dtype, generator=gen)
    call = {}
    if "causal" in masks:
        call.update(attn_mask=torch.ones(L, S, dtype=torch.bool).triu_(1), is_causal=True)
    if "bool2d" in masks:
        am = torch.rand(L, S, generator=gen) < 0.4
        am[:, 0] = False  # every row keeps a key
        call["attn_mask"] = am
    if "bool3d" in masks:
        am = torch.rand(B * SIZES["H"], L, S, generator=gen) < 0.4
        am[..., 1] = False
        call["attn_mask"] = am
    if "kpm" in masks:
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[1, -2:] = True
        call["key_padding_mask"] = kpm
    if "kpm_float" in masks:
        kpm = torch.zeros(B, S, dtype=dtype)
        kpm[0, -1] = -math.inf
        call["key_padding_mask"] = kpm
    if not m.batch_first:  # the module's own layout
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        if self_attn:
            k = v = q
    return m, q, k, v, call


def run_rule(fn, m, q, k, v, call, seed_out, self_attn):
    """Call ``fn(q, k, v, **call)`` on fresh leaves, backward with ``seed_out`` (batch-first);
    returns (output batch-first, grads batch-first)."""
    if self_attn:
        x = q.detach().clone().requires_grad_(True)
        leaves, args = [x], (x, x, x)
    else:
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        args = tuple(leaves)
    out, _ = fn(*args, **call)
    bf = m.batch_first
    out_bf = out if bf else out.transpose(0, 1)
    out_bf.backward(seed_out.to(out.dtype))
    # no relevance at all (CP-LRP's query) is a zero relevance
    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]
    grads = [g if bf else g.transpose(0, 1) for g in grads]
    return out_bf.detach(), grads


def expected_grads(self_attn, r):
    return [r[0] + r[1] + r[2]] if self_attn else list(r)


# ---- forward -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_forward_equals_the_module(case, need_weights, average):
    m, q, k, v, call = build(case, torch.float32, seed=1)
    with torch.no_grad():
        ref, w_ref = m(q, k, v, need_weights=need_weights, average_attn_weights=average, **call)
    for fn in (lambda *a, **kw: multihead_attention(m, *a, **kw),
               MultiheadAttentionLRP.from_module(m), MultiheadAttentionCPLRP.from_module(m)):
        out, w = fn(q, k, v, need_weights=need_weights, average_attn_weights=average, **call)
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)
        if need_weights:
            torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=2e-6)
        else:
            assert w is None


def test_unbatched_input_and_fully_masked_row():
    torch.manual_seed(3)
    m = nn.MultiheadAttention(4, 2).eval()
    x = torch.randn(5, 4, requires_grad=True)
    ref, w_ref = m(x, x, x)
    out, w = multihead_attention(m, x, x, x)
    torch.testing.assert_close(out, ref.detach(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(w, w_ref.detach(), rtol=2e-6, atol=2e-6)
    # a query row with every key masked: torch gives NaN; the rule outputs bias only, no NaN anywhere
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[2] = True
    for relevance, attention in ((True, "exact"), (False, "exact"), (False, "platform")):
        x.grad = None
        out, _ = multihead_attention(m, x, x, x, attn_mask=mask, need_weights=False, relevance=relevance,
                                     attention=attention)
        out.backward(out.detach())
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        torch.testing.assert_close(out[2], m.out_proj.bias.detach())


# ---- every path against the oracle -------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
def test_gradient_view_matches_oracle(case, rule):
    m, q, k, v, call = build(case, seed=2)
    self_attn = CASES[case][1]
    out_ref, seed_out, r = oracle_mha(m, q, k, v, call, seed=5, view="G", cp=rule == "cp-lrp")

    def fn(*a, **kw):
        return multihead_attention(m, *a, rule=rule, relevance=False, need_weights=False, **kw)
    out, grads = run_rule(fn, m, q, k, v, call, seed_out, self_attn)
    torch.testing.assert_close(out, out_ref, **F64)
    for got, want in zip(grads, expected_grads(self_attn, r)):
        torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
def test_relevance_view_drop_in_matches_oracle(case, rule):
    m, q, k, v, call = build(case, seed=4)
    self_attn = CASES[case][1]
    out_ref, seed_out, r = oracle_mha(m, q, k, v, call, seed=6, view="R", cp=rule == "cp-lrp")
    drop_in = MultiheadAttentionLRP.from_module(m, rule=rule)
    out, grads = run_rule(drop_in, m, q, k, v, call, seed_out, self_attn)
    torch.testing.assert_close(out, out_ref, **F64)
    for got, want in zip(grads, expected_grads(self_attn, r)):
        torch.testing.assert_close(got, want, **F64)


def test_relevance_view_with_a_finite_additive_mask_follows_the_contract():
    """An additive bias in the mask (not only 0 / -inf): relevance passes it unchanged (math.md)."""
    m, q, k, v, _ = build("cross-bool-mask-3d", seed=7)
    gen = torch.Generator().manual_seed(8)
    am = torch.randn(SIZES["L"], SIZES["S"], dtype=torch.float64, generator=gen)
    am[0, 2] = -math.inf
    call = dict(attn_mask=am)
    out_ref, seed_out, r = oracle_mha(m, q, k, v, call, seed=9, view="R")
    out, grads = run_rule(MultiheadAttentionLRP.from_module(m), m, q, k, v, call, seed_out, False)
    torch.testing.assert_close(out, out_ref, **F64)
    for got, want in zip(grads, r):
        torch.testing.assert_close(got, want, **F64)


def test_platform_path():
    """SDPA forward and backward with the rescalings: CP-LRP exact; AttnLRP within eps / |S0|."""
    m, q, k, v, call = build("cross-kdim-vdim-padding", seed=10)
    for rule in ("cp-lrp", "attnlrp"):
        _, seed_out, r = oracle_mha(m, q, k, v, call, seed=11, view="G", cp=rule == "cp-lrp")

        def fn(*a, **kw):
            return multihead_attention(m, *a, rule=rule, relevance=False, attention="platform", **kw)
        _, grads = run_rule(fn, m, q, k, v, call, seed_out, False)
        tol = F64 if rule == "cp-lrp" else dict(rtol=1e-4, atol=1e-6)
        for got, want in zip(grads, r):
            torch.testing.assert_close(got, want, **tol)


# ---- the front ends -----------------------------------------------------------------------------

class Block(nn.Module):
    """A residual self-attention block calling the module, as open_clip does."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 3, batch_first=batch_first)

    def forward(self, x, mask):
        return x + self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]


def _block(seed=12):
    torch.manual_seed(seed)
    model = Block().double().eval()
    with torch.no_grad():
        model.attn.in_proj_bias.normal_(0, 0.3)
        model.attn.out_proj.bias.normal_(0, 0.3)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    mask = torch.ones(4, 4, dtype=torch.bool).triu_(1)
    return model, x, mask


def test_composite_module_path_and_traced_path():
    import lrp_kernels.functional as lf
    model, x, mask = _block()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    keys = list(state)
    seed_out = torch.randn(2, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    # the oracle: add rule, then the MHA rule with the branch's relevance as seed
    a = model.attn(x, x, x, need_weights=False, attn_mask=mask)[0].detach()
    Rx1, Ra = O.add_R([x, a], seed_out, EPS)
    m = model.attn
    ref = MultiheadAttentionLRP.from_module(m)
    xx = x.clone().requires_grad_(True)
    ref(xx, xx, xx, need_weights=False, attn_mask=mask)[0].backward(Ra)
    _, seed_check, r = oracle_mha(m, x, x, x, dict(attn_mask=mask), seed=14, view="R")
    want = Rx1 + xx.grad
    # the drop-in alone is checked against the oracle (seeded by oracle_mha's own seed)
    x2 = x.clone().requires_grad_(True)
    ref(x2, x2, x2, need_weights=False, attn_mask=mask)[0].backward(seed_check)
    torch.testing.assert_close(x2.grad, sum(r), **F64)

    # traced path: + and the module, both with rules
    comp = lrp_kernels.Composite({nn.MultiheadAttention: MultiheadAttentionLRP, operator.add: lf.add2})
    traced = comp.register(model, dummy_inputs={"x": x, "mask": mask})
    xt = x.clone().requires_grad_(True)
    traced(xt, mask).backward(seed_out)
    comp.remove()
    torch.testing.assert_close(xt.grad, want, **F64)
    assert any(e.type_name == "MultiheadAttention" and e.action == "replaced" for e in comp.entries)

    # module path: the module replaced in place, same keys, restored exactly
    comp = lrp_kernels.Composite({nn.MultiheadAttention: MultiheadAttentionLRP})
    with comp:
        comp.register(model)
        assert isinstance(model.attn, MultiheadAttentionLRP) and list(model.state_dict()) == keys
        xm = x.clone().requires_grad_(True)
        branch = model.attn(xm, xm, xm, need_weights=False, attn_mask=mask)[0]
        branch.backward(Ra)
    torch.testing.assert_close(xm.grad, xx.grad, rtol=0, atol=0)
    assert type(model.attn) is nn.MultiheadAttention
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_hook_rule_and_gamma_on_out_proj():
    """LayerMapComposite: MultiheadAttentionRule == the drop-in; Gamma on nn.Linear reaches the
    out-projection (checked against the oracle's gamma rule); remove() restores the forward."""
    m, q, k, v, call = build("cross-kdim-vdim-padding", seed=15)
    _, seed_out, _ = oracle_mha(m, q, k, v, call, seed=16, view="R")
    want_out, want = run_rule(MultiheadAttentionLRP.from_module(m), m, q, k, v, call, seed_out, False)
    with LayerMapComposite([(nn.MultiheadAttention, MultiheadAttentionRule())]).context(m):
        assert "forward" in vars(m)
        out, got = run_rule(m, m, q, k, v, call, seed_out, False)
    assert "forward" not in vars(m)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)

    # Gamma(0.3) on out_proj: the out-projection's input relevance is the oracle's gamma rule
    seen = {}

    def record_input(module, args):
        seen["o"] = args[0].detach()
    h = m.out_proj.register_forward_pre_hook(record_input)
    comp = LayerMapComposite([(nn.MultiheadAttention, MultiheadAttentionRule()), (nn.Linear, Gamma(0.3))])
    with comp.context(m):
        o_leaf = {}

        def grab(module, args):  # the gate is after this hook: the grad of args[0] is R_o
            args[0].register_hook(lambda g: o_leaf.setdefault("R", g))
        h2 = m.out_proj.register_forward_pre_hook(grab, prepend=True)
        run_rule(m, m, q, k, v, call, seed_out, False)
        h2.remove()
    h.remove()
    o = seen["o"]
    R_o = O.linear_gamma_R(o, m.out_proj.weight, m.out_proj.bias, seed_out, 0.3, EPS)
    torch.testing.assert_close(o_leaf["R"], R_o, **F64)


def test_patch_installs_the_rule_on_any_model_with_mha():
    """patch() puts the rule on nn.MultiheadAttention (generic installer, no family needed for it):
    gradient view == the oracle with attention='exact'; the forward is the module's; remove restores."""
    model, x, mask = _block(seed=17)
    m = model.attn
    _, seed_out, r = oracle_mha(m, x, x, x, dict(attn_mask=mask), seed=18, view="G")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the block is no Hugging Face model: "no family" warning
        handle = lrp_kernels.patch(model, strict=False, attention="exact")
    assert handle.applied["attn"] == "multihead-attention"
    xx = x.clone().requires_grad_(True)
    out = m(xx, xx, xx, need_weights=False, attn_mask=mask)[0]
    out.backward(seed_out)
    handle.remove()
    assert "forward" not in vars(m)
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), m(x, x, x, need_weights=False, attn_mask=mask)[0], **F64)
    torch.testing.assert_close(xx.grad, sum(r), **F64)


@pytest.mark.parametrize("attention", ["exact", "platform"])
@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
def test_constant_query_gives_the_keys_all_score_relevance(attention, rule):
    """A learned probe as the only query (SigLIP's pooling head): the uniform rule of Q @ K^T with
    a constant factor gives K all of it (not half), on both paths."""
    m, _, x, _, _ = build("self", seed=19)
    probe = torch.randn(1, 1, SIZES["E"], dtype=torch.float64)
    q = probe.expand(1, x.shape[1], SIZES["E"])  # [L=1, B, E]: the module is not batch-first
    _, seed_out, (_, rk, rv) = oracle_mha(m, q, x, x, {}, seed=20, view="G", cp=rule == "cp-lrp",
                                          constant_query=True)
    xx = x.detach().clone().requires_grad_(True)
    out, _ = multihead_attention(m, q, xx, xx, rule=rule, relevance=False, attention=attention)
    out.transpose(0, 1).backward(seed_out)
    torch.testing.assert_close(xx.grad.transpose(0, 1), rk + rv, **F64)


def test_rule_and_view_are_checked():
    m = nn.MultiheadAttention(4, 2)
    x = torch.randn(3, 1, 4)
    with pytest.raises(ValueError, match="is_causal"):
        multihead_attention(m, x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        multihead_attention(m, x, x, x, attn_mask=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        multihead_attention(m, x, x, x, key_padding_mask=torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="rule"):
        multihead_attention(m, x, x, x, rule="lrp")
    with pytest.raises(ValueError, match="platform"):
        multihead_attention(m, x, x, x, attention="platform")
    with pytest.raises(TypeError, match="MultiheadAttention"):
        MultiheadAttentionLRP.from_module(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        MultiheadAttentionRule().register(nn.Linear(2, 2))
    rule = MultiheadAttentionRule()
    handle = rule.register(m)
    with pytest.raises(RuntimeError, match="already has"):
        MultiheadAttentionRule().register(m)
    handle.remove()


# ---- random shapes (Hypothesis) ---------------------------------------------------------------

@settings(deadline=None)
@given(data=st.data())
def test_random_shapes_forward_and_gradient_view(data):
    """Any heads x head size, batch, lengths, layout, self or cross attention, with or without
    padding: the forward is the module's, the gradient view the oracle's (float64)."""
    H, d = data.draw(st.integers(1, 3), "heads"), data.draw(st.integers(1, 3), "head_dim")
    B, L = data.draw(st.integers(1, 2), "batch"), data.draw(st.integers(1, 4), "queries")
    self_attn = data.draw(st.booleans(), "self")
    S = L if self_attn else data.draw(st.integers(1, 4), "keys")
    batch_first, rule = data.draw(st.booleans(), "batch_first"), data.draw(st.sampled_from(["attnlrp", "cp-lrp"]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), "seed"))
    torch.manual_seed(0)
    m = nn.MultiheadAttention(H * d, H, batch_first=batch_first).double().eval()
    with torch.no_grad():
        m.in_proj_bias.normal_(0, 0.3, generator=gen)
        m.out_proj.bias.normal_(0, 0.3, generator=gen)
    shape = (B, L, H * d) if batch_first else (L, B, H * d)
    q = torch.randn(shape, dtype=torch.float64, generator=gen)
    kv_shape = (B, S, H * d) if batch_first else (S, B, H * d)
    k = q if self_attn else torch.randn(kv_shape, dtype=torch.float64, generator=gen)
    call = {}
    if data.draw(st.booleans(), "padding"):
        kpm = torch.rand(B, S, generator=gen) < 0.5
        kpm[:, 0] = False
        call["key_padding_mask"] = kpm
    with torch.no_grad():
        ref = m(q, k, k, need_weights=False, **call)[0]
    _, seed_out, r = oracle_mha(m, q, k, k, call, seed=gen.initial_seed() % 1000, view="G", cp=rule == "cp-lrp")

    def fn(*a, **kw):  # the torch backend: no per-shape backend measurement for each random shape
        return multihead_attention(m, *a, rule=rule, relevance=False, need_weights=False, backend="torch", **kw)
    if self_attn:
        out, grads = run_rule(fn, m, q, q, q, call, seed_out, True)
        want = [sum(r)]
    else:  # key and value are one tensor: its relevance sums both branches
        x = k.detach().clone().requires_grad_(True)
        qq = q.detach().clone().requires_grad_(True)
        o, _ = fn(qq, x, x, **call)
        (o if batch_first else o.transpose(0, 1)).backward(seed_out)
        out = o if batch_first else o.transpose(0, 1)
        grads = [g if batch_first else g.transpose(0, 1) for g in
                 (torch.zeros_like(qq) if qq.grad is None else qq.grad, x.grad)]
        want = [r[0], r[1] + r[2]]
    torch.testing.assert_close(out.detach(), ref if batch_first else ref.transpose(0, 1), rtol=1e-12, atol=1e-12)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, **F64)
