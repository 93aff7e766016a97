"""T5 (encoder-decoder): ``T5LayerNorm`` is an RMSNorm (identity rule); the relative position
bias is an additive constant folded into the attention mask; gated FF (v1.1,
``act(wi_0(x)) * wi_1(x)``) -> uniform rule on the product. Relevance reaches both
``inputs_embeds`` and ``decoder_inputs_embeds``."""
import torch

from ...ops import grad
from . import Family


def install_gated_dense(handle, name, module) -> None:
    def forward(x):
        h = grad.mul2(module.act(module.wi_0(x)), module.wi_1(x), backend=handle.backend)
        h = module.dropout(h)
        w = module.wo.weight
        if isinstance(w, torch.Tensor) and h.dtype != w.dtype and w.dtype != torch.int8:
            h = h.to(w.dtype)  # T5 keeps ``wo`` in float32 (as transformers does)
        return module.wo(h)
    handle.rebind(module, lambda orig: forward)


FAMILY = Family(
    name="t5",
    model_types=("t5",),
    module_rules={"T5DenseGatedActDense": install_gated_dense},
    rms_norm_names=("T5LayerNorm",),
)
