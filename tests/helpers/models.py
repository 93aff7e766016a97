"""Helpers: tiny randomly initialised Hugging Face models of every patched family, and a plain-torch
reference of the AttnLRP rules (eps -> 0) built with hooks and detaches on the model's own code.

The reference is independent of lrp_kernels: it runs a deep copy of the model with its own
modules, turning each rule into its gradient-view meaning with detaches:

* linear / conv (epsilon, eps -> 0): the plain gradient;
* element-wise activation, RMSNorm (identity): ``out = x * (y / x).detach()``;
* LayerNorm: ``out = c * ((y - b) / c).detach() + b`` with ``c = x - mean(x)`` (std constant);
* uniform product / matmul: ``0.5 * (a @ b.detach()) + 0.5 * (a.detach() @ b)`` (half each);
* softmax (Deep Taylor, gradient view): the plain softmax gradient; CP-LRP: detached;
* MoE: routing weights detached.
"""
from __future__ import annotations

import copy

import torch
import transformers as tr
from torch import nn

REF_NAME = "lrp_test_reference"


def _build(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    model = model_cls(config_cls(**kw)).eval()
    return model.double()


DECODER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)


def build(name: str):
    """(model, kind) for a family name; kind in {"causal", "encoder", "seq2seq", "vision"}."""
    if name == "llama":
        return _build(tr.LlamaConfig, tr.LlamaForCausalLM, **DECODER), "causal"
    if name == "mistral":
        return _build(tr.MistralConfig, tr.MistralForCausalLM, sliding_window=4, **DECODER), "causal"
    if name == "qwen2":
        return _build(tr.Qwen2Config, tr.Qwen2ForCausalLM, **DECODER), "causal"
    if name == "qwen3":
        return _build(tr.Qwen3Config, tr.Qwen3ForCausalLM, head_dim=8, **DECODER), "causal"
    if name == "mixtral":
        return _build(tr.MixtralConfig, tr.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2,
                      experts_implementation="eager", **DECODER), "causal"
    if name == "qwen3_moe":
        return _build(tr.Qwen3MoeConfig, tr.Qwen3MoeForCausalLM, head_dim=8, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=24, norm_topk_prob=True, mlp_only_layers=[1],
                      experts_implementation="eager", **DECODER), "causal"
    if name == "gemma":
        return _build(tr.GemmaConfig, tr.GemmaForCausalLM, head_dim=8, **DECODER), "causal"
    if name == "gemma2":
        return _build(tr.Gemma2Config, tr.Gemma2ForCausalLM, head_dim=8, sliding_window=4,
                      attn_logit_softcapping=5.0, final_logit_softcapping=3.0, **DECODER), "causal"
    if name == "gemma3":
        return _build(tr.Gemma3TextConfig, tr.Gemma3ForCausalLM, head_dim=8, sliding_window=4,
                      attn_logit_softcapping=5.0, final_logit_softcapping=3.0, **DECODER), "causal"
    if name == "phi3":
        return _build(tr.Phi3Config, tr.Phi3ForCausalLM, pad_token_id=0, **DECODER), "causal"
    if name == "gpt2":
        return _build(tr.GPT2Config, tr.GPT2LMHeadModel, n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                      n_positions=64), "causal"
    if name == "bert":
        return _build(tr.BertConfig, tr.BertForSequenceClassification, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=48, vocab_size=100,
                      max_position_embeddings=64, num_labels=3), "encoder"
    if name == "t5":
        return _build(tr.T5Config, tr.T5ForConditionalGeneration, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                      num_decoder_layers=2, num_heads=4, vocab_size=100, feed_forward_proj="gated-gelu",
                      decoder_start_token_id=0), "seq2seq"
    if name == "t5-relu":  # the original T5 feed-forward (not gated)
        return _build(tr.T5Config, tr.T5ForConditionalGeneration, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                      num_decoder_layers=1, num_heads=4, vocab_size=100, feed_forward_proj="relu",
                      decoder_start_token_id=0), "seq2seq"
    if name == "vit":
        return _build(tr.ViTConfig, tr.ViTForImageClassification, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=48, image_size=16, patch_size=4,
                      num_channels=3, num_labels=3), "vision"
    if name in ("dinov2", "dinov2-swiglu"):  # layer scale; the giant model's SwiGLU feed-forward
        return _build(tr.Dinov2Config, tr.Dinov2ForImageClassification, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, mlp_ratio=2, image_size=16, patch_size=4, num_channels=3,
                      num_labels=3, layerscale_value=0.5, use_swiglu_ffn=name == "dinov2-swiglu"), "vision"
    raise KeyError(name)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "bert",
            "t5", "t5-relu", "vit", "dinov2", "dinov2-swiglu")


def make_inputs(model, kind: str, batch: int = 2, n: int = 6, pad: str = None, seed: int = 1):
    """Differentiable inputs (float64 embeddings / pixels) and masks; row 0 padded by 2 tokens
    (left for decoders, right for encoders, whose first token is the one explained)."""
    pad = pad or ("left" if kind == "causal" else "right")
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    if kind == "vision":
        c, s = model.config.num_channels, model.config.image_size
        return {"pixel_values": torch.randn(batch, c, s, s, generator=g, dtype=torch.float64).to(dtype)}
    ids = torch.randint(1, 100, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    if pad == "left":
        mask[0, :2] = 0
    elif pad == "right":
        mask[0, -2:] = 0
    emb = model.get_input_embeddings()(ids).detach()
    out = {"inputs_embeds": emb, "attention_mask": mask}
    if kind == "causal":
        out["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        out["use_cache"] = False
    if kind == "seq2seq":
        dids = torch.randint(1, 100, (batch, 4), generator=g)
        out["decoder_inputs_embeds"] = model.get_input_embeddings()(dids).detach()
        out["use_cache"] = False
    return out


def differentiable(inputs: dict) -> list[str]:
    return [k for k in ("inputs_embeds", "decoder_inputs_embeds", "pixel_values") if k in inputs]


def target(model, kind, inputs, out):
    """A scalar to explain: the top logit of the last real position of each row, summed."""
    logits = out.logits
    if kind in ("causal", "seq2seq"):
        logits = logits[:, -1]
    return logits.max(-1).values.sum()


def relevance(model, kind, inputs, retain: bool = False):
    """Input relevance ``x * x.grad`` for each differentiable input of a (patched) model."""
    inputs = {k: (v.clone().requires_grad_() if k in differentiable(inputs) else v) for k, v in inputs.items()}
    out = model(**inputs)
    target(model, kind, inputs, out).backward()
    return {k: (inputs[k] * inputs[k].grad).detach() for k in differentiable(inputs)}, out


# ---- the plain-torch reference of the rules -------------------------------------------------

def _half(t):
    return 0.5 * t + 0.5 * t.detach()


def _umm(a, b):
    """Uniform rule for a product of two non-constants, eps -> 0: half of the gradient each."""
    return 0.5 * (a @ b.detach()) + 0.5 * (a.detach() @ b)


def _identity(x, y):
    """Value ``y``, gradient ``G * y / x`` (0 where x == 0, as ``y / stab(0) = 0`` there)."""
    ratio = torch.where(x == 0, torch.zeros_like(x), y / torch.where(x == 0, torch.ones_like(x), x))
    return x * ratio.detach()


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        sliding_window=None, softcap=None, position_bias=None, is_causal=None, **kw):
    rule = module.config._lrp_test_rule
    n, m = query.shape[2], key.shape[2]
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    s = scaling * _umm(query, k.transpose(-1, -2))
    if softcap:
        s = _identity(s, softcap * torch.tanh(s / softcap))
    if position_bias is not None:
        s = s + position_bias.detach()
    allowed = torch.ones(1, 1, n, m, dtype=torch.bool)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if attention_mask is None and causal and n > 1:
        i, j = torch.arange(n)[:, None] + (m - n), torch.arange(m)[None]
        allowed = allowed & (j <= i)
        if sliding_window:
            allowed = allowed & ((i - j) < sliding_window)
    if attention_mask is not None:
        allowed = allowed & attention_mask
    # the dtype's minimum, as transformers' eager path: padding rows stay finite (no NaN)
    p = torch.softmax(s.masked_fill(~allowed, torch.finfo(s.dtype).min), -1)
    if rule == "cp-lrp":
        o = p.detach() @ v
    else:
        o = _umm(p, v)
    return o.transpose(1, 2).contiguous(), None


def _register_reference():
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
    AttentionInterface.register(REF_NAME, reference_attention)
    AttentionMaskInterface.register(REF_NAME, sdpa_mask)


def _mixtral_experts_reference(module):
    def forward(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for slot in range(top_k_index.shape[1]):
                e = int(top_k_index[t, slot])
                x = hidden_states[t]
                gate, up = (module.gate_up_proj[e] @ x).chunk(2)
                a = _identity(gate, module.act_fn(gate))
                h = _half(a) * _half(up)
                out[t] = out[t] + (module.down_proj[e] @ h) * top_k_weights[t, slot].detach()
        return out
    return forward


def reference_model(model, rule: str = "attnlrp"):
    """A deep copy of ``model`` whose plain backward is the reference modified gradient."""
    _register_reference()
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    for m in ref.modules():
        config = vars(m).get("config")
        if isinstance(config, tr.PretrainedConfig):
            config._attn_implementation_internal = REF_NAME
            config._lrp_test_rule = rule
    gated_products = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP",
                      "Qwen3MoeMLP", "Dinov2SwiGLUFFN"}
    for m in ref.modules():
        cls = type(m).__name__
        if cls in gated_products:
            m.act_fn.register_forward_hook(lambda mod, i, o: _half(_identity(i[0], o)))
            m.up_proj.register_forward_hook(lambda mod, i, o: _half(o))
            m.act_fn._lrp_ref_done = True
        elif cls == "T5DenseGatedActDense":
            m.act.register_forward_hook(lambda mod, i, o: _half(_identity(i[0], o)))
            m.wi_1.register_forward_hook(lambda mod, i, o: _half(o))
            m.act._lrp_ref_done = True
        elif cls == "Phi3MLP":
            m.gate_up_proj.register_forward_hook(lambda mod, i, o: _half(o))
        elif cls in ("MixtralExperts", "Qwen3MoeExperts"):
            m.forward = _mixtral_experts_reference(m)
            m.act_fn._lrp_ref_done = True
        elif cls in ("MixtralTopKRouter", "Qwen3MoeTopKRouter"):
            m.register_forward_hook(lambda mod, i, o: tuple(t.detach() for t in o))
    for m in ref.modules():
        cls = type(m).__name__
        if getattr(m, "_lrp_ref_done", False):
            continue
        if cls.endswith("RMSNorm") or cls == "T5LayerNorm" or type(m).__module__ == "transformers.activations" \
                or isinstance(m, (nn.Tanh, nn.GELU, nn.SiLU, nn.ReLU)):
            m.register_forward_hook(lambda mod, i, o: _identity(i[0], o))
        elif isinstance(m, nn.LayerNorm):
            def ln_hook(mod, i, o):
                c = i[0] - i[0].mean(-1, keepdim=True)
                b = mod.bias if mod.bias is not None else 0.0
                return c * ((o - b) / c).detach() + b
            m.register_forward_hook(ln_hook)
    cap = getattr(ref.config, "final_logit_softcapping", None)
    if cap:
        ref.config.final_logit_softcapping = None
        ref.lm_head.register_forward_hook(lambda mod, i, o: _identity(o, cap * torch.tanh(o / cap)))
    return ref
