"""Gradient-view rules installed on module *instances* (no class is ever modified).

Each ``install_*`` takes the :class:`~lrp_kernels.hf.patching.PatchHandle`, the module's name
and the module, and rebinds that one instance's forward (``handle.rebind``) so the forward
values are unchanged and the backward is the rule in the gradient view (relevance of ``t`` =
``t * t.grad``). Every rule is the op of :mod:`lrp_kernels.ops` that owns it, called with the
handle's options (``handle.epsilon``, ``handle.backend``); the dispatcher picks the backend:

* ``nn.Linear`` (plain forward), GPT-2 ``Conv1D`` (``x @ W + b``, on ``W.T``, a view)
  -> :func:`lrp_kernels.grad.linear_epsilon`
* any other module that acts linearly (``nn.Conv*d``, quantised linears such as bitsandbytes
  ``Linear4bit`` / ``Linear8bitLt``, GPTQ/AWQ ``QuantLinear``, subclasses of ``nn.Linear`` with
  their own forward) -> :func:`lrp_kernels.ops.linear_epsilon.epsilon_module`: the module's own
  forward and plain backward after the output scaling ``y / stab(y)``, so a dequantising
  forward is explained exactly as the linear map it computes
* RMSNorm (``w`` or Gemma's ``1 + w``)  -> :func:`lrp_kernels.grad.rms_norm_identity`
* ``nn.LayerNorm``                     -> :func:`lrp_kernels.grad.layer_norm` (std detached)
* element-wise activations            -> :func:`lrp_kernels.grad.identity` (identity rule)
* gated MLPs ``down(act(gate(x)) * up(x))`` -> :func:`lrp_kernels.ops.elementwise.gated_product`
* ``torch.nn.MultiheadAttention`` (any model containing one, e.g. SigLIP's pooling head)
  -> :func:`lrp_kernels.ops.multihead.multihead_attention` with the patch's rules and attention path
* dropout                             -> the identity function (no dropout while patched)

Norms and activations keep the module's own forward for their values: the patched forward
computes exactly what the unpatched one does.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn

from ..backends import dispatch
from ..ops import grad
from ..ops._common import recording, stand_in
from ..ops.elementwise import activation_kind, gated_product
from ..ops.linear_epsilon import epsilon_module


# ---- classification helpers ----------------------------------------------------------------

_TORCH_ELEMENTWISE = (nn.SiLU, nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.LeakyReLU, nn.ELU,
                      nn.SELU, nn.CELU, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
                      nn.ReLU6, nn.Identity, nn.Softsign, nn.Tanhshrink)


@functools.lru_cache(maxsize=None)
def elementwise_activations() -> tuple[type, ...]:
    """Module classes that get the identity rule: torch's element-wise activations and
    transformers' (the ACT2FN values); imported lazily (transformers is heavy)."""
    return _TORCH_ELEMENTWISE + _hf_activation_classes()


def _hf_activation_classes() -> tuple[type, ...]:
    """transformers' element-wise activation modules (ACT2FN values)."""
    try:
        from transformers import activations as act
    except Exception:  # pragma: no cover
        return ()
    return tuple(c for c in vars(act).values()
                 if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == act.__name__)


def is_elementwise_activation(module: nn.Module) -> bool:
    return isinstance(module, elementwise_activations())


def looks_like_nonlinearity(module: nn.Module) -> bool:
    """A module from torch's or transformers' activation collections that we have no rule for."""
    mod = type(module).__module__
    return mod in ("torch.nn.modules.activation", "transformers.activations") and not is_elementwise_activation(module)


def looks_like_normalization(module: nn.Module) -> bool:
    """A normalisation module (by class name) that no rule above matched (e.g. a parameter-free
    LayerNorm of a model's own code): its statistics would keep their plain gradient."""
    return type(module).__name__.endswith(("Norm", "LayerNorm", "RMSNorm"))


def computes_attention_itself(module: nn.Module) -> bool:
    """An attention module whose forward does not go through transformers' AttentionInterface
    (which the patch reroutes): its softmax and products would keep their plain gradient."""
    if not type(module).__name__.endswith("Attention"):
        return False
    if any("Attention" in type(m).__name__ for m in module.children()):
        return False  # a wrapper (BertAttention around BertSelfAttention): its child is checked
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return True
    return "ALL_ATTENTION_FUNCTIONS" not in source and "attention_interface" not in source


def is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: ``x @ W + b`` with ``W`` of shape [in, out]."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    """Modules that act linearly on their input but are not a plain ``nn.Linear``."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return True
    if isinstance(module, nn.Linear):  # subclass with its own forward (e.g. bnb Linear4bit)
        return True
    return "Linear" in type(module).__name__ and hasattr(module, "weight")


def is_rms_norm(module: nn.Module, extra_names: tuple[str, ...] = ()) -> bool:
    name = type(module).__name__
    return (name.endswith("RMSNorm") or name in extra_names or isinstance(module, getattr(nn, "RMSNorm", ()))) \
        and getattr(module, "weight", None) is not None


def is_dropout(module: nn.Module) -> bool:
    return isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout))


# ---- installers ----------------------------------------------------------------------------

def install_linear(handle, name: str, module: nn.Linear) -> None:
    def forward(x):
        # outputs the next rule saves anyway (a gated MLP's gate and up) are kept as they are
        return grad.linear_epsilon(x, module.weight, module.bias, handle.epsilon, backend=handle.backend,
                                   share_output=module in handle.outputs_saved_downstream)
    handle.rebind(module, lambda orig: forward)


def install_conv1d(handle, name: str, module: nn.Module) -> None:
    def forward(x):
        return grad.linear_epsilon(x, module.weight.t(), module.bias, handle.epsilon, backend=handle.backend)
    handle.rebind(module, lambda orig: forward)


def install_generic_epsilon(handle, name: str, module: nn.Module) -> None:
    has_bias = getattr(module, "bias", None) is not None

    def make(orig):
        def forward(x, *args, **kwargs):
            return epsilon_module(lambda t: orig(t, *args, **kwargs), x, handle.epsilon, backend=handle.backend,
                                  has_bias=has_bias, name=f"epsilon_module({type(module).__name__})")
        return forward
    handle.rebind(module, make)


def rms_norm_eps(module: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 1e-6  # transformers' RMSNorm default


def install_rms_norm(handle, name: str, module: nn.Module, weight_offset: float = 0.0) -> None:
    """``y = (offset + w) * x * rstd`` with ``rstd`` constant in the backward (identity rule)."""
    eps = rms_norm_eps(module)
    if isinstance(module, getattr(nn, "RMSNorm", ())) and module.eps is None:
        eps = None

    def make(orig):
        def forward(x):
            w = module.weight
            if weight_offset:
                w = w.float() + weight_offset
            e = torch.finfo(x.dtype).eps if eps is None else eps
            return grad.rms_norm_identity(x, w, e, backend=handle.backend, forward_fn=orig)
        return forward
    handle.rebind(module, make)


def install_layer_norm(handle, name: str, module: nn.LayerNorm) -> None:
    if len(module.normalized_shape) != 1:
        raise NotImplementedError(f"{name}: LayerNorm over {module.normalized_shape} (only the last dim is supported)")

    def make(orig):
        def forward(x):
            return grad.layer_norm(x, module.weight, module.bias, module.eps, epsilon=handle.epsilon,
                                   backend=handle.backend, forward_fn=orig)
        return forward
    handle.rebind(module, make)


def install_activation(handle, name: str, module: nn.Module) -> None:
    def make(orig):
        def forward(x):
            return grad.identity(orig, x, epsilon=handle.epsilon, backend=handle.backend)
        return forward
    handle.rebind(module, make)


@contextlib.contextmanager
def _as_before_the_patch(handle, module: nn.Module):
    """The module's parameters with ``requires_grad`` as before the patch froze them: torch's
    MultiheadAttention takes another kernel path (other bits) when no weight requires grad."""
    frozen = {id(p) for p in handle.frozen}
    thawed = [p for p in module.parameters() if id(p) in frozen and not p.requires_grad]
    for p in thawed:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(False)


def install_multihead_attention(handle, name: str, module: nn.MultiheadAttention) -> None:
    """AttnLRP / CP-LRP (``handle.rules``) on a ``torch.nn.MultiheadAttention`` (any model that
    contains one), gradient view: the gradient is :func:`lrp_kernels.ops.multihead.multihead_attention`'s
    (``attention="exact"``: the exact block, otherwise the platform path over SDPA), the forward
    values are the module's own, bit for bit (one more attention forward, without a graph)."""
    from ..ops.multihead import multihead_attention
    from .attention import _ModelValuesFn
    path = "exact" if handle.attention == "exact" else "platform"

    def make(orig):
        def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            out, _ = multihead_attention(module, query, key, value, key_padding_mask, False, attn_mask,
                                         average_attn_weights, is_causal, rule=handle.rules,
                                         epsilon=handle.epsilon, relevance=False, attention=path,
                                         backend=handle.backend)
            with torch.no_grad(), _as_before_the_patch(handle, module):
                values, weights = orig(query, key, value, key_padding_mask=key_padding_mask,
                                       need_weights=need_weights, attn_mask=attn_mask,
                                       average_attn_weights=average_attn_weights, is_causal=is_causal)
            return _ModelValuesFn.apply(out, values.to(out.dtype)), weights
        return forward
    handle.rebind(module, make)


def install_dropout(handle, name: str, module: nn.Module) -> None:
    handle.rebind(module, lambda orig: (lambda x, *a, **k: x))


def install_stop_input(handle, name: str, module: nn.Module) -> None:
    """The module's output is a constant for relevance (used for MoE routers)."""
    def make(orig):
        def forward(x, *args, **kwargs):
            return orig(x.detach(), *args, **kwargs)
        return forward
    handle.rebind(module, make)


def _unobserved_plain_linear(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` whose output nobody else sees (no forward hooks, no accelerate
    hook): ``F.linear`` on its weight then stands for calling it."""
    return (is_plain_linear(module) and not module._forward_hooks and not module._forward_pre_hooks
            and not getattr(module, "_hf_hook", None) and not nn.modules.module._global_forward_hooks
            and not nn.modules.module._global_forward_pre_hooks)


def _folds_producers(handle, x: torch.Tensor, gate: nn.Module, up: nn.Module, act_fn) -> bool:
    """Whether the gate and up linears' epsilon rescale runs inside the product's backward
    (``gated_product(producer_epsilon=...)``, one pass) instead of in their own: where a fused
    kernel serves that backward (the dispatcher says, from stand-ins of the outputs), outside the
    conservation check (which checks each rule on its own) and for unobserved plain linears."""
    if recording() or not (_unobserved_plain_linear(gate) and _unobserved_plain_linear(up)):
        return False
    if gate.weight.shape != up.weight.shape or gate.weight.dtype != up.weight.dtype:
        return False
    out = stand_in(gate.weight, (*x.shape[:-1], gate.out_features))
    return dispatch.chosen_backend("gated_product_backward", out, out, out, act_fn, handle.epsilon, True, True,
                                   handle.epsilon, activation_kind(act_fn), backend=handle.backend) != "torch"


def gated_mlp_forward(handle, module: nn.Module, gate: str = "gate_proj", up: str = "up_proj",
                      down: str = "down_proj", act: str = "act_fn"):
    """``down(act(gate(x)) * up(x))`` with the identity rule on ``act`` and the uniform rule on
    the product (:func:`~lrp_kernels.ops.elementwise.gated_product`; ``grad.mul2`` after the
    activation's own rule for activations that are not element-wise). Where a fused kernel
    serves the product's backward, the gate and up linears' epsilon rule runs in that same pass
    (:func:`_folds_producers`): their own backward is then the plain GEMM."""
    g, u, d, a = (getattr(module, n) for n in (gate, up, down, act))
    if not is_elementwise_activation(a):
        def forward(x):
            return d(grad.mul2(a(g(x)), u(x), backend=handle.backend))
        return forward
    act_fn = a.forward  # the activation's own forward, taken before its identity rule is installed

    def fused(x):
        if _folds_producers(handle, x, g, u, act_fn):
            gz = torch.nn.functional.linear(x, g.weight, g.bias)
            uz = torch.nn.functional.linear(x, u.weight, u.bias)
            return d(gated_product(gz, uz, act_fn, handle.epsilon, backend=handle.backend,
                                   producer_epsilon=handle.epsilon))
        return d(gated_product(g(x), u(x), act_fn, handle.epsilon, backend=handle.backend))
    return fused


def install_gated_mlp(handle, name: str, module: nn.Module) -> None:
    for proj in ("gate_proj", "up_proj"):  # gated_product saves both outputs: share them
        if isinstance(getattr(module, proj, None), nn.Module):
            handle.outputs_saved_downstream.add(getattr(module, proj))
    handle.rebind(module, lambda orig: gated_mlp_forward(handle, module))


def softcap_identity(handle, x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)`` with the identity rule (element-wise non-linearity)."""
    return grad.identity(lambda t: torch.tanh(t / cap) * cap, x, epsilon=handle.epsilon, backend=handle.backend)
