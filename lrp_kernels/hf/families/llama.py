"""Llama-style decoders: Llama, Mistral, Qwen2, Qwen3 (same building blocks).

RMSNorm (``w * x / rms(x)``, also Qwen3's per-head q/k norms) -> identity rule; gated MLP
``down(act(gate(x)) * up(x))`` -> uniform rule on the product; linears -> epsilon; attention ->
the registered AttnLRP function (RoPE, repeat_kv, residual sums need no rule in the G-view).
"""
from . import Family
from ..installers import install_gated_mlp

FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    module_rules={cls: install_gated_mlp for cls in ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")},
)
