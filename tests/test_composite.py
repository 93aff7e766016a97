"""Composite, module path: a transformer-like model with rules (or drop-in modules) attached on
the fly equals the same model written with the explicit drop-ins (lrp_kernels.functional);
remove() restores everything exactly; the conservation check sees every rule."""
import functools

import pytest
import torch
from torch import nn

import lrp_kernels.functional as lf
from lrp_kernels import check, modules, rules
from lrp_kernels.explicit.composite import Composite


class RMSNormLike(nn.Module):
    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(n))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class GemmaLikeNorm(RMSNormLike):
    def forward(self, x):
        return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Add(nn.Module):
    def forward(self, a, b):
        return a + b


class Mul(nn.Module):
    def forward(self, a, b):
        return a * b


class Matmul(nn.Module):
    def forward(self, a, b):
        return torch.matmul(a, b)


class Block(nn.Module):
    """Pre-norm attention + gated MLP; every op that needs a rule is a module, so the module path
    can reach it. ``explicit=True`` runs the same parameters through lrp_kernels.functional."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNormLike(d), RMSNormLike(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.qk, self.pv = Matmul(), Matmul()
        self.mask_add, self.res1, self.res2 = Add(), Add(), Add()
        self.softmax = nn.Softmax(dim=-1)
        self.gate, self.up, self.down = nn.Linear(d, 12), nn.Linear(d, 12), nn.Linear(12, d)
        self.act, self.mul = nn.SiLU(), Mul()

    def forward(self, x, explicit=False):
        B, T, D = x.shape
        H, dh = self.heads, D // self.heads
        mask = torch.full((T, T), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        if explicit:
            lin = lambda m, t: lf.linear_epsilon(t, m.weight, m.bias)  # noqa: E731
            norm = lambda m, t: lf.rms_norm_identity(t, m.weight, m.eps)  # noqa: E731
            mm, add, sm, act, mul = lf.matmul, lf.add2, lambda t: lf.softmax(t, -1), \
                lambda t: lf.identity(torch.nn.functional.silu, t), lf.mul2
        else:
            lin = lambda m, t: m(t)  # noqa: E731
            norm = lin
            mm, add, sm, act, mul = self.qk, self.mask_add, self.softmax, self.act, self.mul
        h = norm(self.norm1, x)
        split = lambda t: t.view(B, T, H, dh).transpose(1, 2)  # noqa: E731
        q, k, v = split(lin(self.q, h)), split(lin(self.k, h)), split(lin(self.v, h))
        s = add(mm(q, k.transpose(-1, -2)), mask)
        p = sm(s)
        a = (mm if explicit else self.pv)(p, v).transpose(1, 2).reshape(B, T, D)
        x = (add if explicit else self.res1)(x, lin(self.o, a))
        h = norm(self.norm2, x)
        m = mul(act(lin(self.gate, h)), lin(self.up, h))
        return (add if explicit else self.res2)(x, lin(self.down, m))


class TinyLM(nn.Module):
    def __init__(self, d=8, layers=2, vocab=11):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.norm = RMSNormLike(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x, explicit=False):
        for b in self.blocks:
            x = b(x, explicit)
        if explicit:
            return lf.linear_epsilon(lf.rms_norm_identity(x, self.norm.weight, self.norm.eps), self.head.weight)
        return self.head(self.norm(x))


RULES = {
    nn.Linear: rules.EpsilonRule,
    RMSNormLike: rules.IdentityRule,
    nn.Softmax: functools.partial(rules.TaylorDecompositionRule, bias=True, epsilon=0.0),
    Matmul: rules.UniformEpsilonRule,
    Add: rules.EpsilonRule,
    nn.SiLU: rules.IdentityRule,
    Mul: rules.UniformRule,
}
DROP_INS = {
    nn.Linear: modules.LinearEpsilon,
    RMSNormLike: modules.RMSNormIdentity,
    nn.Softmax: modules.SoftmaxDT,
    Matmul: modules.MatmulUE,
    Add: modules.AddEpsilon,
    nn.SiLU: modules.IdentityRuleActivation,
    Mul: modules.MulUniform,
}


def relevance(model, x, **kw):
    x = x.clone().requires_grad_()
    y = model(x, **kw)
    target = y[:, -1].max(-1).values.sum()  # explain the last token's top logit
    target.backward()
    return y.detach(), x.grad


def model_and_input(dtype, seed=0):
    torch.manual_seed(seed)
    model = TinyLM().to(dtype).eval()
    x = torch.randn(2, 5, 8, dtype=dtype)
    return model, x


@pytest.mark.parametrize("mapping", [RULES, DROP_INS], ids=["rules", "drop-ins"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_composite_equals_explicit_drop_ins(mapping, dtype):
    model, x = model_and_input(dtype)
    y_ref, r_ref = relevance(model, x, explicit=True)
    lrp = Composite(mapping)
    assert lrp.register(model) is model
    y, r = relevance(model, x)
    lrp.remove()
    assert torch.equal(y, y_ref) or torch.allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(r).all() and r.abs().sum() > 0
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    err = (r - r_ref).norm() / r_ref.norm()
    assert err < tol, f"relative error {err:.3g}"


def test_remove_restores_objects_outputs_and_flags_exactly():
    model, x = model_and_input(torch.float32, seed=1)
    model.blocks[0].q.weight.requires_grad_(False)  # a mixed set of flags to restore
    shared = model.blocks[0].gate
    model.blocks[1].gate = shared  # one module at two places
    before_mods = {name: m for name, m in model.named_modules(remove_duplicate=False)}
    before_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad():
        y0 = model(x)
    lrp = Composite(RULES)
    with lrp:
        lrp.register(model)
        assert isinstance(model.blocks[0].q, rules.EpsilonRule)
        assert model.blocks[0].q.module is before_mods["blocks.0.q"]
        assert model.blocks[0].gate is model.blocks[1].gate  # still one (wrapped) module
        assert not any(p.requires_grad for p in model.parameters())  # frozen
        with torch.no_grad():
            assert torch.equal(model(x), y0)  # the forward is unchanged while registered
    assert not lrp.registered
    after = {name: m for name, m in model.named_modules(remove_duplicate=False)}
    assert after.keys() == before_mods.keys() and all(after[k] is before_mods[k] for k in after)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before_flags
    with torch.no_grad():
        assert torch.equal(model(x), y0)
    with pytest.raises(RuntimeError, match="not registered"):
        lrp.remove()


def test_register_twice_and_bad_maps_are_errors():
    model, _ = model_and_input(torch.float32)
    lrp = Composite({nn.Linear: rules.EpsilonRule})
    lrp.register(model)
    with pytest.raises(RuntimeError, match="already registered"):
        lrp.register(model)
    lrp.remove()
    with pytest.raises(TypeError, match="non-empty dict"):
        Composite({})
    with pytest.raises(TypeError, match="value for"):
        Composite({nn.Linear: 3})
    with pytest.raises(ValueError, match="dummy_inputs"):
        Composite({torch.matmul: lf.matmul}).register(model)
    with pytest.raises(TypeError, match="SoftmaxDT replaces nn.Softmax"):
        Composite({nn.Linear: modules.SoftmaxDT}).register(model)
    with pytest.raises(TypeError, match="don't know how to build Mul from Linear"):
        Composite({nn.Linear: Mul}).register(model)
    assert all(type(m) is not rules.EpsilonRule for m in model.modules())  # nothing left half-done


def test_root_module_itself_matches():
    lin = nn.Linear(4, 3)
    lrp = Composite({nn.Linear: rules.EpsilonRule})
    wrapped = lrp.register(lin)
    assert isinstance(wrapped, rules.EpsilonRule) and wrapped.module is lin
    assert lrp.remove() is lin and lin.weight.requires_grad


def test_drop_in_replacements_share_parameters_and_forward():
    torch.manual_seed(2)
    seq = nn.Sequential(nn.Linear(6, 6), nn.RMSNorm(6, eps=1e-5), nn.LayerNorm(6), nn.Softmax(-1))
    with torch.no_grad():
        seq[1].weight.uniform_(0.5, 1.5)
        seq[2].weight.uniform_(0.5, 1.5)
        seq[2].bias.uniform_(-0.5, 0.5)
    old = list(seq)
    x = torch.randn(3, 6)
    y0 = seq(x)
    lrp = Composite({nn.Linear: modules.LinearEpsilon, nn.RMSNorm: modules.RMSNormIdentity,
                     nn.LayerNorm: modules.LayerNormIdentity, nn.Softmax: modules.SoftmaxDT})
    lrp.register(seq)
    assert [type(m) for m in seq] == [modules.LinearEpsilon, modules.RMSNormIdentity,
                                      modules.LayerNormIdentity, modules.SoftmaxDT]
    assert seq[0].weight is old[0].weight and seq[1].weight is old[1].weight and seq[2].bias is old[2].bias
    torch.testing.assert_close(seq(x), y0, rtol=1e-6, atol=1e-6)
    lrp.remove()
    assert list(seq) == old


def test_replacing_a_norm_with_another_forward_is_refused():
    torch.manual_seed(3)
    seq = nn.Sequential(nn.Linear(6, 6), GemmaLikeNorm(6))
    with pytest.raises(ValueError, match="does not compute the forward"):
        Composite({GemmaLikeNorm: modules.RMSNormIdentity}).register(seq)
    assert type(seq[1]) is GemmaLikeNorm


def test_most_specific_key_wins_and_inside_of_wrapped_is_not_visited():
    torch.manual_seed(4)
    model, x = model_and_input(torch.float32)
    lrp = Composite({nn.Module: rules.StopRelevanceRule, Block: rules.IdentityRule, nn.Linear: rules.EpsilonRule,
                     RMSNormLike: rules.IdentityRule})
    # the root itself is an nn.Module: the most specific key for TinyLM is nn.Module
    assert isinstance(lrp.register(model), rules.StopRelevanceRule)
    lrp.remove()
    lrp = Composite({Block: rules.IdentityRule, nn.Linear: rules.EpsilonRule})
    lrp.register(model)
    assert isinstance(model.blocks[0], rules.IdentityRule) and type(model.blocks[0].module.q) is nn.Linear
    assert isinstance(model.head, rules.EpsilonRule)
    lrp.remove()


def test_verbose_prints_the_table(capsys):
    model, _ = model_and_input(torch.float32)
    lrp = Composite(RULES)
    lrp.register(model, verbose=True)
    out = capsys.readouterr().out
    lrp.remove()
    for word in ("wrapped", "Linear", "EpsilonRule", "RMSNormLike", "IdentityRule"):
        assert word in out
    counts = {(e.action, e.type_name) for e in lrp.entries}
    assert ("wrapped", "Linear") in counts
    seq = nn.Sequential(nn.Linear(3, 3), nn.GELU())
    Composite({nn.Linear: rules.EpsilonRule}).register(seq, verbose=True)
    out = capsys.readouterr().out
    assert "left alone" in out and "GELU" in out and "plain gradient" in out


class Homogeneous(nn.Sequential):
    """A block wrapped as one rule."""


def test_conservation_check_reports_every_rule_of_a_registered_model():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), RMSNormLike(8),
                          Homogeneous(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 6, bias=False)),
                          Homogeneous(nn.Linear(6, 6), nn.Tanh()))
    eps = functools.partial(rules.EpsilonRule, epsilon=1e-9)
    lrp = Composite({nn.Linear: eps, nn.ReLU: rules.IdentityRule, RMSNormLike: rules.IdentityRule, Homogeneous: eps})
    lrp.register(model)
    x = torch.randn(4, 6, requires_grad=True)
    with check.conservation(rtol=1e-4) as report:
        y = model(x)
        y.backward(y)
    lrp.remove()
    names = [r.op for r in report.records]
    assert names == ["EpsilonRule(Homogeneous)", "EpsilonRule(Homogeneous)", "IdentityRule(RMSNormLike)",
                     "IdentityRule(ReLU)", "linear_epsilon"], report.table()
    biased, homogeneous = report.records[0], report.records[1]
    # expected from Euler's theorem: the bias-free block is homogeneous, the biased one is not
    assert not biased.expected and not biased.conserved
    assert homogeneous.expected and homogeneous.conserved
    assert report.first_violation() is None and "no violation" in report.table()
    assert all(r.expected and r.conserved for r in report.records[1:])
    # the per-layer sums chain: what leaves one rule enters the one before it
    for later, earlier in zip(report.records, report.records[1:]):
        assert abs(later.r_in - earlier.r_out) <= 1e-5 * earlier.mass
    assert abs(report.records[-1].r_in - x.grad.sum().item()) <= 1e-5 * report.records[-1].mass


def test_gradient_checkpointing_through_a_registered_model():
    from torch.utils.checkpoint import checkpoint
    model, x = model_and_input(torch.float32, seed=6)
    lrp = Composite(RULES)
    lrp.register(model)
    grads = []
    for ckpt in (False, True):
        xi = x.clone().requires_grad_()
        h = xi
        for block in model.blocks:
            h = checkpoint(block, h, use_reentrant=False) if ckpt else block(h)
        y = model.head(model.norm(h))
        y[:, -1].max(-1).values.sum().backward()
        grads.append(xi.grad)
    lrp.remove()
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recompute", [False, True])
def test_gpu_composite_equals_explicit_and_recompute_matches(recompute):
    model, x = model_and_input(torch.float32, seed=7)
    model, x = model.cuda(), x.cuda()
    y_ref, r_ref = relevance(model, x, explicit=True)  # auto backend: Triton kernels on CUDA
    mapping = {k: (functools.partial(v, recompute=recompute) if isinstance(v, type) else v)
               for k, v in RULES.items()}
    with Composite(mapping) as lrp:
        lrp.register(model)
        y, r = relevance(model, x)
    assert torch.isfinite(r).all()
    err = ((r - r_ref).norm() / r_ref.norm()).item()
    assert err < 1e-3, f"relative error {err:.3g}"  # TF32 GEMMs in the fused kernels
    # recompute replays CUDA RNG: dropout masks match the saved-graph run
    drop = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 8)).cuda().train()
    grads = []
    for rc in (False, True):
        torch.manual_seed(0)
        xi = x.clone().requires_grad_()
        yd = rules.UniformEpsilonRule(drop, recompute=rc)(xi)
        yd.backward(yd)
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_module_path_on_a_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    torch.manual_seed(8)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 32, (1, 6))
    before = dict(model.named_modules())
    with torch.no_grad():
        y0 = model(ids, use_cache=False).logits
    grads = []
    for mapping in ({nn.Linear: rules.EpsilonRule, LlamaRMSNorm: rules.IdentityRule},
                    {nn.Linear: modules.LinearEpsilon, LlamaRMSNorm: modules.RMSNormIdentity}):
        with Composite(mapping) as lrp:
            lrp.register(model)
            emb = model.get_input_embeddings()(ids).detach().requires_grad_()
            y = model(inputs_embeds=emb, use_cache=False).logits
            torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
            y[0, -1].max().backward()
            grads.append(emb.grad)
        assert dict(model.named_modules()) == before
        with torch.no_grad():
            assert torch.equal(model(ids, use_cache=False).logits, y0)
    # rules and drop-ins agree (up to the drop-in norm's own float32 forward rounding)
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)
