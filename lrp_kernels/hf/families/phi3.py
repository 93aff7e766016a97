"""Phi-3: fused ``gate_up_proj``; the MLP computes ``down(up * act(gate))`` -> uniform rule on
the product (both halves of the fused projection get half of the product's relevance)."""
from ...ops import grad
from . import Family


def install_phi3_mlp(handle, name, module) -> None:
    def forward(x):
        gate, up = module.gate_up_proj(x).chunk(2, dim=-1)
        return module.down_proj(grad.mul2(up, module.activation_fn(gate), backend=handle.backend))
    handle.rebind(module, lambda orig: forward)


FAMILY = Family(name="phi3", model_types=("phi3",), module_rules={"Phi3MLP": install_phi3_mlp})
