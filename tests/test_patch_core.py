"""lrp_kernels.hf.patching: instance scope, errors for unknown parts, checkpointing, padding, bf16,
accelerate device maps, MoE router rule, quantised (non-nn.Linear) linears."""

import pytest
import torch
import transformers as tr
from torch import nn

import lrp_kernels
from lrp_kernels.hf.patching import UnsupportedModelError
from helpers.models import build, make_inputs, relevance


def _llama(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, **kw)
    return tr.LlamaForCausalLM(cfg).eval().to(dtype)


def _embeds(model, ids):
    return model.get_input_embeddings()(ids).detach()


def _input_relevance(model, emb, **kw):
    emb = emb.clone().requires_grad_()
    logits = model(inputs_embeds=emb, use_cache=False, **kw).logits
    logits[:, -1].max(-1).values.sum().backward()
    return (emb * emb.grad).detach()


def test_two_models_only_the_patched_one_changes():
    a, b = _llama(), _llama()
    ids = torch.randint(1, 100, (1, 6))
    emb = _embeds(a, ids)
    plain_before = _input_relevance(b, emb)
    config_b = b.config
    with lrp_kernels.patch(a):
        lrp = _input_relevance(a, emb)
        plain_during = _input_relevance(b, emb)
        assert b.config is config_b and b.config._attn_implementation == "sdpa"
        assert all(p.requires_grad for p in b.parameters())
    assert torch.equal(plain_during, plain_before)
    assert not torch.allclose(lrp, plain_before, rtol=1e-3, atol=1e-6)
    # the same class is untouched: a fresh instance behaves as before
    assert all("forward" not in vars(m) for m in a.modules())


def test_two_models_patched_at_once_keep_their_own_rules():
    a, b = _llama(torch.float64), _llama(torch.float64)
    emb = _embeds(a, torch.randint(1, 100, (1, 6)))
    with lrp_kernels.patch(a, rules="attnlrp"):
        ref_a = _input_relevance(a, emb)
    with lrp_kernels.patch(b, rules="cp-lrp", epsilon=1e-2):
        ref_b = _input_relevance(b, emb)
    with lrp_kernels.patch(a, rules="attnlrp"), lrp_kernels.patch(b, rules="cp-lrp", epsilon=1e-2):
        assert torch.equal(_input_relevance(a, emb), ref_a)
        assert torch.equal(_input_relevance(b, emb), ref_b)
    assert not torch.allclose(ref_a, ref_b)


def test_remove_restores_flags_and_shared_config():
    model = _llama()
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    handle = lrp_kernels.patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        lrp_kernels.patch(model)
    handle.remove()
    handle.remove()  # idempotent
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(m.config is model.config for m in model.modules() if "config" in vars(m))
    lrp_kernels.patch(model).remove()  # patch again after remove


class _Gate(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.scale


def test_unknown_parts_are_named():
    model = _llama()
    model.model.layers[1].mlp.act_fn = _Gate(48)
    model.model.layers[0].post_attention_layernorm = nn.Sequential(model.model.layers[0].post_attention_layernorm,
                                                                   nn.Softmax(-1))
    with pytest.raises(UnsupportedModelError) as err:
        lrp_kernels.patch(model)
    msg = str(err.value)
    assert "model.layers.1.mlp.act_fn (_Gate)" in msg and "model.layers.0.post_attention_layernorm.1 (Softmax)" in msg
    assert all("forward" not in vars(m) for m in model.modules())  # nothing was touched
    with pytest.warns(UserWarning, match="_Gate"):
        handle = lrp_kernels.patch(model, strict=False)
    assert handle.unsupported and handle.active
    handle.remove()


def test_unknown_model_class_is_named():
    torch.manual_seed(0)
    cfg = tr.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                       word_embed_proj_dim=16)
    model = tr.OPTForCausalLM(cfg)
    with pytest.raises(UnsupportedModelError, match=r"OPTForCausalLM \(model_type 'opt'\)"):
        lrp_kernels.patch(model)


def test_bad_arguments():
    model = _llama()
    with pytest.raises(ValueError, match="rules"):
        lrp_kernels.patch(model, rules="lrp")
    with pytest.raises(ValueError, match="epsilon"):
        lrp_kernels.patch(model, epsilon=-1.0)
    with pytest.raises(ValueError, match="backend"):
        lrp_kernels.patch(model, backend="cuda")
    with pytest.raises(TypeError, match="model"):
        lrp_kernels.patch("llama")


@pytest.mark.parametrize("family, reentrant", [("llama", False), ("llama", True), ("mixtral", False),
                                               ("bert", False)])
def test_gradient_checkpointing_same_relevance(family, reentrant):
    model, kind = build(family)
    model = model.float()
    if family == "bert":  # dropout active in train mode: the patch must neutralise it
        model.config.hidden_dropout_prob = 0.5
    inputs = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in make_inputs(model, kind).items()}
    with lrp_kernels.patch(model):
        plain, _ = relevance(model, kind, inputs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    for m in model.modules():  # dropout modules set from the config at build time
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    with lrp_kernels.patch(model):
        ckpt, _ = relevance(model, kind, inputs)
    assert model.training
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("pad", ["left", "right"])
def test_padded_batch_rows_equal_single_rows(pad):
    model = _llama(torch.float64)
    lengths, n = [4, 6], 6
    torch.manual_seed(3)
    rows = [torch.randint(1, 100, (1, L)) for L in lengths]
    ids = torch.zeros(2, n, dtype=torch.long)
    mask = torch.zeros(2, n, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(n - r.shape[1], n) if pad == "left" else slice(0, r.shape[1])
        ids[i, sl], mask[i, sl] = r, 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    last = torch.tensor([n - 1 if pad == "left" else L - 1 for L in lengths])
    with lrp_kernels.patch(model):
        emb = _embeds(model, ids).requires_grad_()
        logits = model(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False).logits
        logits[torch.arange(2), last].max(-1).values.sum().backward()
        batch_rel = (emb * emb.grad).sum(-1)
        for i, r in enumerate(rows):
            single = _input_relevance(model, _embeds(model, r)).sum(-1)[0]
            real = mask[i].bool()
            torch.testing.assert_close(batch_rel[i][real], single, rtol=1e-9, atol=1e-12)
            assert (batch_rel[i][~real] == 0).all()
    assert torch.isfinite(batch_rel).all()


def test_bf16_relevance_close_to_fp32():
    model = _llama(torch.float32)
    ids = torch.randint(1, 100, (2, 8))
    with lrp_kernels.patch(model):
        ref = _input_relevance(model, _embeds(model, ids)).sum(-1)
    model = model.to(torch.bfloat16)
    with lrp_kernels.patch(model):
        rel = _input_relevance(model, _embeds(model, ids))
    assert rel.dtype == torch.bfloat16 and torch.isfinite(rel).all()
    rel = rel.float().sum(-1)
    cos = torch.nn.functional.cosine_similarity(rel.flatten(), ref.flatten(), dim=0)
    assert cos > 0.98, f"bf16 vs fp32 relevance cosine {cos:.4f}"


def test_accelerate_cpu_device_map():
    accelerate = pytest.importorskip("accelerate")
    model = _llama(torch.float64)
    ids = torch.randint(1, 100, (1, 6))
    emb = _embeds(model, ids)
    with lrp_kernels.patch(model):
        expected = _input_relevance(model, emb)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = accelerate.dispatch_model(model, device_map=device_map, force_hooks=True)
    hooked = [m for m in model.modules() if hasattr(m, "_hf_hook")]
    assert hooked
    forwards = {id(m): vars(m)["forward"] for m in hooked}
    with lrp_kernels.patch(model) as handle:
        assert handle.applied
        got = _input_relevance(model, emb)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert all(vars(m)["forward"] is forwards[id(m)] for m in hooked)  # accelerate's hooks kept


def test_mixtral_router_gets_no_relevance():
    model, kind = build("mixtral")
    block = model.model.layers[0].mlp
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    with lrp_kernels.patch(model):
        logits, weights, index = block.gate(x)
        assert not weights.requires_grad and not logits.requires_grad
        out = block.experts(x, index, weights)
        out.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0  # relevance flows through the experts only


class FakeQuantLinear(nn.Module):
    """An int8 weight + per-row scale, dequantised in the forward (a bnb/GPTQ stand-in)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.weight = self.qweight  # quantised layers expose a (non-float) weight

    def dequantized(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale

    def forward(self, x):
        return x @ self.dequantized().T


def test_quantised_linear_uses_module_backward_with_epsilon():
    model = _llama(torch.float64)
    ids = torch.randint(1, 100, (1, 6))
    emb = _embeds(model, ids)
    for layer in model.model.layers:
        layer.mlp.down_proj = FakeQuantLinear(layer.mlp.down_proj)
    with lrp_kernels.patch(model, epsilon=1e-3) as handle:
        assert handle.applied["model.layers.0.mlp.down_proj"] == "epsilon-vjp"
        quant = _input_relevance(model, emb)
    for layer in model.model.layers:  # the same network with plain nn.Linear (dequantised weights)
        q = layer.mlp.down_proj
        lin = nn.Linear(q.qweight.shape[1], q.qweight.shape[0], bias=False, dtype=torch.float64)
        lin.weight.data.copy_(q.dequantized())
        layer.mlp.down_proj = lin
    with lrp_kernels.patch(model, epsilon=1e-3):
        dense = _input_relevance(model, emb)
    torch.testing.assert_close(quant, dense, rtol=1e-9, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_patch_matches_cpu_float64(dtype):
    """On CUDA the patch runs the Triton kernels (flash AttnLRP, fused linear); relevance must
    match the float64 CPU torch path: fp32 (TF32 dots) within 2e-2, bf16 within 8e-2 (norm-wise)."""
    model = _llama(torch.float64)
    ids = torch.randint(1, 100, (2, 300), generator=torch.Generator().manual_seed(0))
    emb = _embeds(model, ids)
    with lrp_kernels.patch(model):
        ref = _input_relevance(model, emb).sum(-1)
    model = model.to(device="cuda", dtype=dtype)
    with lrp_kernels.patch(model):
        got = _input_relevance(model, emb.to(device="cuda", dtype=dtype))
    assert torch.isfinite(got).all()
    got = got.double().sum(-1).cpu()
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < (2e-2 if dtype == torch.float32 else 8e-2), f"relative error {err:.3e}"


def test_fused_linear_path_equals_lean_cpu_path(monkeypatch):
    """CPU uses plain GEMM + output scaling for nn.Linear; a forced non-torch backend (and CUDA)
    routes through the dispatched grad.linear_epsilon kernel: both must agree."""
    status = lrp_kernels.available_backends().get("cpp", {})
    if not status.get("available", False):
        pytest.skip(f"cpp backend unavailable: {status}")
    model = _llama(torch.float64)
    emb = _embeds(model, torch.randint(1, 100, (2, 7)))
    with lrp_kernels.patch(model, epsilon=1e-3):
        lean = _input_relevance(model, emb)
    calls = []
    original = lrp_kernels.grad.linear_epsilon
    monkeypatch.setattr(lrp_kernels.grad, "linear_epsilon", lambda *a, **k: calls.append(1) or original(*a, **k))
    with lrp_kernels.patch(model, epsilon=1e-3, backend="cpp"):
        fused = _input_relevance(model, emb)
    assert len(calls) == 2 * 7 + 1  # every nn.Linear went through the dispatched op
    torch.testing.assert_close(fused, lean, rtol=1e-10, atol=1e-13)


def test_plain_torch_module_with_strict_false_conserves():
    """No Hugging Face config: generic rules only (warned); epsilon + identity rules with zero
    biases conserve relevance as eps -> 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.Dropout(0.5), nn.Tanh(),
                        nn.Linear(16, 3)).double().train()
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning, match="no family"):
        with lrp_kernels.patch(net, epsilon=1e-12, strict=False) as handle:
            y = net(x)
            y.sum().backward()
    assert set(handle.applied.values()) == {"epsilon", "identity", "dropout-off"}
    torch.testing.assert_close((x * x.grad).sum(), y.sum().detach(), rtol=1e-8, atol=0)
