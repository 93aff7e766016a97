"""Drop-in modules (relevance view by default; ``relevance=False`` gives the gradient view).

``LinearEpsilon`` is an ``nn.Linear`` (same constructor, parameters and ``state_dict``) whose
backward is the epsilon rule. The small wrappers (``AddEpsilon``, ``MulUniform``,
``MatmulUE``) exist so a Composite can target add / mul / matmul as modules.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from . import elementwise as _ew
from . import linear_epsilon as _lin
from . import matmul as _mm
from . import norm as _norm
from . import softmax as _sm
from ._common import DEFAULT_EPSILON


class LinearEpsilon(nn.Linear):
    """``nn.Linear`` with the epsilon-rule backward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 epsilon: float = DEFAULT_EPSILON, relevance: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.epsilon, self.relevance = epsilon, relevance

    @classmethod
    def from_linear(cls, linear: nn.Linear, epsilon: float = DEFAULT_EPSILON,
                    relevance: bool = True) -> "LinearEpsilon":
        """A LinearEpsilon sharing ``linear``'s parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", linear.bias)  # registered even when None, as nn.Linear
        new.epsilon, new.relevance = epsilon, relevance
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _lin.linear_epsilon(x, self.weight, self.bias, self.epsilon, relevance=self.relevance)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, epsilon={self.epsilon}"


class SoftmaxDT(nn.Module):
    """``nn.Softmax`` with the Deep-Taylor backward."""

    def __init__(self, dim: int = -1, dtype: Optional[torch.dtype] = None, temperature: float = 1.0,
                 relevance: bool = True) -> None:
        super().__init__()
        self.dim, self.dtype, self.temperature, self.relevance = dim, dtype, temperature, relevance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _sm.softmax(x, self.dim, self.dtype, self.temperature, relevance=self.relevance)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, temperature={self.temperature}"


class RMSNormIdentity(nn.Module):
    """RMSNorm (``weight * x / rms(x)``) with the identity rule; ``state_dict`` key ``weight``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None,
                 relevance: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps, self.relevance = eps, relevance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _norm.rms_norm_identity(x, self.weight, self.eps, relevance=self.relevance)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNormIdentity(nn.LayerNorm):
    """``nn.LayerNorm`` (same constructor and ``state_dict``) with the LayerNorm rule of docs/math.md."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, epsilon: float = DEFAULT_EPSILON, relevance: bool = True) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"LayerNormIdentity normalises the last dim only; got normalized_shape "
                             f"{tuple(self.normalized_shape)}")
        self.epsilon, self.relevance = epsilon, relevance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.normalized_shape[0]:
            # without affine parameters the op itself cannot see the mismatch
            raise ValueError(f"x's last dim must be normalized_shape = {self.normalized_shape[0]}, "
                             f"got x of shape {tuple(x.shape)}")
        return _norm.layer_norm(x, self.weight, self.bias, self.eps, self.epsilon, relevance=self.relevance)


class AddEpsilon(nn.Module):
    """``a + b + ...`` with the epsilon rule."""

    def __init__(self, epsilon: float = DEFAULT_EPSILON, relevance: bool = True) -> None:
        super().__init__()
        self.epsilon, self.relevance = epsilon, relevance

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return _ew.add(*inputs, epsilon=self.epsilon, relevance=self.relevance)


class MulUniform(nn.Module):
    """``a * b`` with the uniform rule."""

    def __init__(self, relevance: bool = True) -> None:
        super().__init__()
        self.relevance = relevance

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _ew.mul(a, b, relevance=self.relevance)


class MatmulUE(nn.Module):
    """``torch.matmul(a, b)`` with the uniform-epsilon rule."""

    def __init__(self, epsilon: float = DEFAULT_EPSILON, relevance: bool = True) -> None:
        super().__init__()
        self.epsilon, self.relevance = epsilon, relevance

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _mm.matmul(a, b, self.epsilon, relevance=self.relevance)


class IdentityRuleActivation(nn.Module):
    """Wraps an element-wise activation module or function with the identity rule."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], epsilon: float = DEFAULT_EPSILON,
                 relevance: bool = True) -> None:
        super().__init__()
        self.fn, self.epsilon, self.relevance = fn, epsilon, relevance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ew.identity(self.fn, x, self.epsilon, relevance=self.relevance)


class MultiheadAttentionLRP(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with the AttnLRP rule (:class:`MultiheadAttentionCPLRP`: CP-LRP),
    relevance view by default: :func:`lrp_kernels.ops.multihead.multihead_attention`.

    Build it from a module with :meth:`from_module` (what ``Composite({nn.MultiheadAttention:
    MultiheadAttentionLRP})`` does): the parameters and the ``out_proj`` module are shared, the
    ``state_dict`` keys are the original's. Same forward arguments and return value.
    """

    default_rule = "attnlrp"

    def __init__(self, *args, rule: Optional[str] = None, epsilon: float = DEFAULT_EPSILON,
                 relevance: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rule = self.default_rule if rule is None else rule
        self.epsilon, self.relevance = epsilon, relevance

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention, rule: Optional[str] = None,
                    epsilon: float = DEFAULT_EPSILON, relevance: bool = True) -> "MultiheadAttentionLRP":
        """A drop-in sharing ``module``'s parameters (and its ``out_proj``)."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"{cls.__name__} replaces nn.MultiheadAttention, got {type(module).__name__}")
        new = cls(module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
                  add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
                  vdim=module.vdim, batch_first=module.batch_first, device="meta", rule=rule, epsilon=epsilon,
                  relevance=relevance)
        for name, param in module.named_parameters(recurse=False):
            setattr(new, name, param)
        new.out_proj = module.out_proj
        new.train(module.training)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        from .multihead import multihead_attention
        return multihead_attention(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal, rule=self.rule, epsilon=self.epsilon,
                                   relevance=self.relevance)

    def extra_repr(self) -> str:
        view = "relevance" if self.relevance else "gradient"
        return f"rule={self.rule!r}, epsilon={self.epsilon}, view={view}"


class MultiheadAttentionCPLRP(MultiheadAttentionLRP):
    """:class:`MultiheadAttentionLRP` with CP-LRP (the attention weights are constants)."""

    default_rule = "cp-lrp"
