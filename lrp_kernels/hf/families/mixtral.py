"""Sparse mixture-of-experts decoders: Mixtral and Qwen3-MoE (same experts / top-k router layout).

Rule for the MoE block (documented choice): the router's softmax / top-k *routing weights are
constants* for relevance. The router gets a detached input (no relevance flows through the
router softmax), and the block's output ``sum_k w_k * expert_k(x)`` is a weighted sum with
constant weights, so each selected expert receives the whole relevance of its weighted share
(uniform rule with a constant factor = plain gradient; sums need no rule in the G-view).
Inside each expert: epsilon on both projections, identity on the activation, uniform on
``act(gate) * up``.
"""
import torch

from ...ops import grad
from ...ops.elementwise import gated_product
from . import Family
from ..installers import install_gated_mlp, install_stop_input


def install_experts(handle, name, module) -> None:
    """The experts' own op sequence (tokens in transformers' order: by top-k slot, then token, so
    the sums round alike and the forward is bit-identical), with the rules of the module docstring."""
    act = module.act_fn.forward  # the activation's own forward (its identity rule is in gated_product)

    def forward(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        weights = top_k_weights.detach()  # routing weights are constants (see module docstring)
        for e in range(module.num_experts):
            slot, token = torch.where((top_k_index == e).T)
            if token.numel() == 0:
                continue
            x = hidden_states[token]
            gate, up = grad.linear_epsilon(x, module.gate_up_proj[e], None, handle.epsilon,
                                           backend=handle.backend).chunk(2, dim=-1)
            h = gated_product(gate, up, act, handle.epsilon, backend=handle.backend)
            y = grad.linear_epsilon(h, module.down_proj[e], None, handle.epsilon, backend=handle.backend)
            y = y * weights[token, slot, None]
            out = out.index_add(0, token, y.to(out.dtype))
        return out
    handle.rebind(module, lambda orig: forward)


def _no_jitter(handle, model) -> None:
    for module in model.modules():
        if type(module).__name__ == "MixtralSparseMoeBlock" and getattr(module, "jitter_noise", 0):
            handle.set_attr(module, "jitter_noise", 0.0)  # random input scaling in train mode


FAMILY = Family(
    name="moe",
    model_types=("mixtral", "qwen3_moe"),
    module_rules={"MixtralExperts": install_experts, "MixtralTopKRouter": install_stop_input,
                  "Qwen3MoeExperts": install_experts, "Qwen3MoeTopKRouter": install_stop_input,
                  "Qwen3MoeMLP": install_gated_mlp},  # Qwen3-MoE's dense (mlp_only) layers
    setup=_no_jitter,
)
