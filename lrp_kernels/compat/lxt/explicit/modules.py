"""LXT's drop-in modules (``lxt.explicit.modules``) and ``INIT_MODULE_MAPPING``.

The modules are ours (:mod:`lrp_kernels.ops.modules`) computing with the LXT-convention
functions of :mod:`lrp_kernels.compat.lxt.explicit.functional`, under LXT's names and
constructors. ``INIT_MODULE_MAPPING[cls](original, cls)`` builds a ``cls`` from the module it
replaces, sharing its parameters (what ``Composite`` does when a layer map names a module
class); each class also has ``from_module(original)``, which our own Composite calls.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Optional

import torch
from torch import nn

from ....ops import modules as _m
from . import functional as lf
from . import special as ls

__all__ = ["SoftmaxDT", "LinearEpsilon", "RMSNormIdentity", "LayerNormEpsilon", "LinearInProjection",
           "LinearOutProjection", "MultiheadAttention_CP", "INIT_MODULE_MAPPING", "initialize_generic",
           "initialize_bias", "initialize_MHA", "copy_parameters_and_buffers_"]


class _FromModule:
    @classmethod
    def from_module(cls, original: nn.Module) -> nn.Module:
        return INIT_MODULE_MAPPING[cls](original, cls)


class SoftmaxDT(_FromModule, nn.Softmax):
    """``nn.Softmax`` with the Deep-Taylor backward (:func:`~lrp_kernels.compat.lxt.explicit.functional.softmax`)."""

    def __init__(self, dim: int, dtype: Optional[torch.dtype] = None, temperature: float = 1.0,
                 inplace: bool = False, **kwargs) -> None:
        super().__init__(dim)
        self.dtype, self.temperature, self.inplace = dtype, temperature, inplace

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return lf.softmax(inputs, self.dim, self.dtype, self.temperature, self.inplace)


class LinearEpsilon(_FromModule, _m.LinearEpsilon):
    """``nn.Linear`` with the epsilon rule (LXT's stabiliser ``z + eps``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 epsilon: float = 1e-6, **kwargs) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype, epsilon=epsilon)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return lf.linear_epsilon(inputs, self.weight, self.bias, self.epsilon)


class RMSNormIdentity(_FromModule, _m.RMSNormIdentity):
    """RMSNorm (Llama's, T5's) with the identity rule; the epsilon is ``variance_epsilon`` (LXT)
    and ``eps`` (ours)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(hidden_size, eps, device=kwargs.get("device"), dtype=kwargs.get("dtype"))

    @property
    def variance_epsilon(self) -> float:
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, value: float) -> None:
        self.eps = value

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return lf.rms_norm_identity(hidden_states, self.weight, self.eps)


class LayerNormEpsilon(_FromModule, _m.LayerNormIdentity):
    """``nn.LayerNorm`` with the LayerNorm rule (:func:`~lrp_kernels.compat.lxt.explicit.functional.layer_norm`);
    ours is :class:`lrp_kernels.ops.modules.LayerNormIdentity`."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lf.layer_norm(x, self.weight, self.bias, self.eps)


# ---- nn.MultiheadAttention with CP-LRP ----------------------------------------------------------

class _Projection(nn.Module):
    """``F.linear`` with the weight and bias given: a module a layer map can put a rule on."""

    def __init__(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


class LinearInProjection(_Projection):
    """The value projection of :class:`MultiheadAttention_CP` (its own class, for its own rule)."""


class LinearOutProjection(_Projection):
    """The output projection of :class:`MultiheadAttention_CP`."""


class MultiheadAttention_CP(_FromModule, nn.Module):
    """``nn.MultiheadAttention`` (self- or cross-attention, ``batch_first`` either way) with
    CP-LRP: the attention weights are constants, relevance flows through the values only
    (AttnLRP, appendix "Tackling noise in Vision Transformers"). Build it from a
    ``nn.MultiheadAttention`` with ``INIT_MODULE_MAPPING[MultiheadAttention_CP](mha, MultiheadAttention_CP)``;
    put rules on ``v_proj`` / ``out_proj`` (:class:`LinearInProjection`,
    :class:`LinearOutProjection`) with a ``Composite``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.q_proj_weight = self.k_proj_weight = self.bias_q = self.bias_k = None
        self.v_proj, self.out_proj = LinearInProjection(None, None), LinearOutProjection(None, None)
        self.embed_dim = self.num_heads = self.head_dim = self.batch_first = None

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if is_causal:
            raise NotImplementedError("MultiheadAttention_CP: is_causal=True is not supported; pass attn_mask")
        return ls.multi_head_attention_cp(query, key, value, self.batch_first, self.num_heads, self.head_dim,
                                          self.q_proj_weight, self.bias_q, self.k_proj_weight, self.bias_k,
                                          self.v_proj, self.out_proj, key_padding_mask, need_weights, attn_mask,
                                          average_attn_weights)


# ---- building a drop-in from the module it replaces --------------------------------------------

def copy_parameters_and_buffers_(original: nn.Module, replacement: nn.Module) -> None:
    """Register ``original``'s own parameters and buffers on ``replacement`` (shared, not copied)."""
    for name, param in original.named_parameters(recurse=False):
        replacement.register_parameter(name, param)
    for name, buf in original.named_buffers(recurse=False):
        replacement.register_buffer(name, buf)


def initialize_generic(original: nn.Module, replacement: type) -> nn.Module:
    """``replacement(**kwargs)`` with every constructor argument that ``original`` has as an
    attribute (a ``bias`` tensor becomes ``bias=True/False``), then the parameters shared."""
    kwargs = {}
    for name in inspect.signature(replacement.__init__).parameters:
        if name in ("self", "args", "kwargs") or not hasattr(original, name):
            continue
        value = getattr(original, name)
        kwargs[name] = (value is not None) if name == "bias" else value
    new = replacement(**kwargs)
    copy_parameters_and_buffers_(original, new)
    new.train(original.training)
    return new


def initialize_bias(original: nn.Module, replacement: type) -> nn.Module:
    """:func:`initialize_generic` for layers with an optional bias (``nn.Linear``, ``nn.LayerNorm``)."""
    return initialize_generic(original, replacement)


def _initialize_rms(original: nn.Module, replacement: type) -> nn.Module:
    # RMSNorm classes store neither the same epsilon name nor the hidden size: take them from
    # the epsilon attribute and the weight, as our Composite's converter does
    weight = original.weight
    eps = next(float(getattr(original, a)) for a in ("variance_epsilon", "eps", "epsilon")
               if isinstance(getattr(original, a, None), (int, float)))
    new = replacement(weight.shape[0], eps, device="meta")
    new.weight = weight
    return new


def initialize_MHA(original: nn.MultiheadAttention, replacement: type) -> nn.Module:
    """A :class:`MultiheadAttention_CP` sharing ``original``'s weights (slices of the packed
    in-projection when query, key and value have one size)."""
    if original.bias_k is not None:
        raise NotImplementedError("MultiheadAttention_CP: add_bias_kv=True is not supported")
    new, d = replacement(), original.embed_dim
    if original._qkv_same_embed_dim:
        w = original.in_proj_weight
        new.q_proj_weight, new.k_proj_weight, v_weight = w[:d], w[d:2 * d], w[2 * d:]
    else:
        new.q_proj_weight, new.k_proj_weight, v_weight = (original.q_proj_weight, original.k_proj_weight,
                                                          original.v_proj_weight)
    b = original.in_proj_bias
    new.bias_q, new.bias_k, v_bias = (None, None, None) if b is None else (b[:d], b[d:2 * d], b[2 * d:])
    new.v_proj = LinearInProjection(v_weight, v_bias)
    new.out_proj = LinearOutProjection(original.out_proj.weight, original.out_proj.bias)
    new.embed_dim, new.num_heads, new.head_dim = d, original.num_heads, original.head_dim
    new.batch_first = original.batch_first
    return new


INIT_MODULE_MAPPING: Dict[type, Callable[[nn.Module, type], nn.Module]] = {
    SoftmaxDT: initialize_generic,
    LinearEpsilon: initialize_bias,
    RMSNormIdentity: _initialize_rms,
    LayerNormEpsilon: initialize_bias,
    MultiheadAttention_CP: initialize_MHA,
}
