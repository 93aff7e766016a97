"""An explicit relevance-view (R-view) Llama forward written with lrp_kernels.functional.

Independent of lrp_kernels.hf.patching and of transformers' modeling code: it reads the weights of a
``LlamaForCausalLM`` and recomputes the network with the explicit drop-ins, so that
``logits.backward(R_logits)`` leaves the *relevance* (not a gradient) in ``inputs_embeds.grad``.

How the ops that need no rule in the gradient view map to the relevance view:

* residual sums: ``functional.add2`` with a tiny ``eps`` (the G-view plain sum is its eps -> 0
  limit);
* RoPE ``q * cos + rotate_half(q) * sin``: ``rotate_half(q) = cat(q2, q1) * sign`` (a permutation
  times a constant sign), so ``add2(mul2(q, cos), mul2(cat(q2, q1), sign * sin))`` with constant
  factors (``mul2`` gives all relevance to the non-constant factor; permutations move relevance);
* the softmax scale ``* d**-0.5``: ``mul2`` with a constant (relevance passes unchanged);
* the causal mask: ``masked_fill(-inf)`` on the logits (masked keys get zero relevance);
* repeat_kv: ``repeat_interleave`` (relevance of the copies adds up, as autograd sums).
"""
from __future__ import annotations

import torch

from lrp_kernels import functional as F


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    sign = torch.cat((-torch.ones(half, dtype=x.dtype), torch.ones(half, dtype=x.dtype)))
    return F.add2(F.mul2(x, cos), F.mul2(swapped, sin * sign), epsilon=eps)


def llama_relevance_forward(model, inputs_embeds: torch.Tensor, eps: float = 1e-10,
                            add_eps: float = 1e-12) -> torch.Tensor:
    """Logits of ``model`` (a LlamaForCausalLM, no padding, causal) in the relevance view."""
    cfg = model.config
    B, N, _ = inputs_embeds.shape
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // H
    pos = torch.arange(N)[None]
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(inputs_embeds, pos)
    cos, sin = cos[:, None].to(inputs_embeds.dtype), sin[:, None].to(inputs_embeds.dtype)  # [1, 1, N, d]
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    scale = torch.tensor(d ** -0.5, dtype=inputs_embeds.dtype)

    x = inputs_embeds
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        n1 = layer.input_layernorm
        h = F.rms_norm_identity(x, n1.weight, n1.variance_epsilon)
        q = F.linear_epsilon(h, attn.q_proj.weight, attn.q_proj.bias, eps).view(B, N, H, d).transpose(1, 2)
        k = F.linear_epsilon(h, attn.k_proj.weight, attn.k_proj.bias, eps).view(B, N, Hkv, d).transpose(1, 2)
        v = F.linear_epsilon(h, attn.v_proj.weight, attn.v_proj.bias, eps).view(B, N, Hkv, d).transpose(1, 2)
        q, k = _rope(q, cos, sin, add_eps), _rope(k, cos, sin, add_eps)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        s = F.mul2(F.matmul(q, k.transpose(-1, -2), epsilon=eps), scale)
        p = F.softmax(s.masked_fill(~causal, float("-inf")), -1)
        o = F.matmul(p, v, epsilon=eps).transpose(1, 2).reshape(B, N, H * d)
        x = F.add2(x, F.linear_epsilon(o, attn.o_proj.weight, attn.o_proj.bias, eps), epsilon=add_eps)

        n2 = layer.post_attention_layernorm
        h = F.rms_norm_identity(x, n2.weight, n2.variance_epsilon)
        gate = F.identity(torch.nn.functional.silu, F.linear_epsilon(h, mlp.gate_proj.weight, None, eps))
        up = F.linear_epsilon(h, mlp.up_proj.weight, None, eps)
        y = F.linear_epsilon(F.mul2(gate, up), mlp.down_proj.weight, None, eps)
        x = F.add2(x, y, epsilon=add_eps)

    nf = model.model.norm
    x = F.rms_norm_identity(x, nf.weight, nf.variance_epsilon)
    return F.linear_epsilon(x, model.lm_head.weight, None, eps)
