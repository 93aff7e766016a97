"""Reversible, instance-scoped AttnLRP / CP-LRP patches for Hugging Face transformers.

::

    with lrp_kernels.patch(model):                 # or: handle = lrp_kernels.patch(model)
        emb = model.get_input_embeddings()(ids).requires_grad_()
        logits = model(inputs_embeds=emb, use_cache=False).logits
        logits[0, -1].max().backward()
        relevance = (emb * emb.grad).sum(-1)         # gradient view: relevance = x * x.grad
    # handle.remove() / leaving the block restores the model exactly

    with lrp_kernels.patch(model, view="relevance"):   # LXT explicit's convention
        emb = model.get_input_embeddings()(ids).requires_grad_()
        logit = model(inputs_embeds=emb, use_cache=False).logits[0, -1].max()
        logit.backward(logit)                        # seed: the output's relevance
        relevance = emb.grad.sum(-1)                 # .grad is the relevance

What the patch does, on this model instance only (nothing class-level, nothing global except
registering two new attention *names* in transformers' AttentionInterface):

* rebinds the ``forward`` of the modules that need a rule (linears, norms, activations,
  ``nn.MultiheadAttention``, gated MLPs, MoE experts/routers, dropout):
  :mod:`lrp_kernels.hf.installers`; models dispatched with accelerate keep their device hooks
  (the hook's ``_old_forward`` is rebound instead);
* gives every module that holds a config a *copy* of it whose attention implementation is
  ``lrp_kernels_attnlrp`` (or ``lrp_kernels_cplrp``): the registered adapter
  (:mod:`lrp_kernels.hf.attention`) runs the platform path
  (:func:`lrp_kernels.ops.attention.attnlrp_platform` over transformers' SDPA attention) or the
  exact rule (:func:`lrp_kernels.ops.attention.attnlrp_attention`), as ``attention=`` says;
  the copy also has ``use_cache=False`` (no KV cache while explaining);
* freezes every parameter (``requires_grad=False``): parameters receive no gradient;
* refuses to nest or overlap with another active patch (a submodule of a patched model, or a
  model containing one);
* on ``remove()``: every attribute it set is restored (the same config objects, forwards,
  ``requires_grad`` flags); module objects and ``state_dict`` are never touched.

Anything the patch has no rule for (a module type with parameters, a non-linearity from torch's
or transformers' activation modules, a model type with no family) is reported by name: an error
(:class:`UnsupportedModelError`) when ``strict=True``, a warning otherwise (those modules then
keep their plain gradient).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .families import Family, family_for
from . import installers
from . import attention as attention_adapter
from ..backends import dispatch
from ..ops._common import (DEFAULT_EPSILON, check_epsilon, claim_gradient_view, gradient_view_owner,
                           mark_gradient_view_output, release_gradient_view)

_MARK = "_lrp_kernels_patch"


class UnsupportedModelError(ValueError):
    """The model contains parts the patch has no LRP rule for (listed by name)."""


class PatchHandle:
    """Undo log of one patch, and the one route of its options: every installed rule and the
    attention adapter read ``rules``, ``epsilon`` and ``backend`` from here. Also a context
    manager; ``remove()`` restores the model exactly."""

    def __init__(self, model: nn.Module, rules: str, epsilon: float, backend: str, attention: str = "auto",
                 view: str = "gradient") -> None:
        self.model, self.rules, self.epsilon, self.attention = model, rules, float(epsilon), attention
        self.view = view
        self._boundaries_on = True  # relevance view: see gradient_view()
        self.backend: Optional[str] = None if backend == "auto" else backend  # passed to the ops
        self.backend_name = backend
        self.applied: dict[str, str] = {}  # module name -> rule installed
        # linears whose output the next rule saves anyway: they keep it, not a factor of it
        self.outputs_saved_downstream: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
        self.unsupported: list[str] = []
        # parameters this patch froze (they had requires_grad=True): a module whose forward
        # values depend on that flag (torch's MultiheadAttention) can reproduce them exactly
        self.frozen: list[nn.Parameter] = []
        self._undo: list[Callable[[], None]] = []
        self.active = False

    # -- primitives used by the rule installers (lrp_kernels.hf.families) -------------------------
    def set_attr(self, obj, name: str, value) -> None:
        """``setattr`` on one instance, undone by ``remove()``."""
        had = name in vars(obj)
        old = vars(obj).get(name)

        def undo():
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        setattr(obj, name, value)
        self._undo.append(undo)

    def rebind(self, module: nn.Module, make: Callable[[Callable], Callable]) -> None:
        """Replace this instance's forward by ``make(original_forward)``.

        With an accelerate hook (``_hf_hook``) the hook's ``_old_forward`` is replaced, so the
        hook still moves inputs/outputs between devices.
        """
        attr = "_old_forward" if (hasattr(module, "_hf_hook") and "_old_forward" in vars(module)) else "forward"
        self.set_attr(module, attr, make(getattr(module, attr)))

    # -- lifecycle -------------------------------------------------------------------------
    def remove(self) -> None:
        """Undo everything, in reverse order. Safe to call twice."""
        while self._undo:
            self._undo.pop()()
        self.frozen.clear()
        self.active = False

    @contextlib.contextmanager
    def unpatched(self) -> Iterator[nn.Module]:
        """The model exactly as without the patch inside the block, patched again after it."""
        if not self.active:
            yield self.model
            return
        self.remove()
        try:
            yield self.model
        finally:
            self.applied.clear()
            self._reinstall()

    @contextlib.contextmanager
    def gradient_view(self) -> Iterator["PatchHandle"]:
        """Inside the block the patch behaves as ``view="gradient"`` whatever its view (the
        relevance view's two boundaries pass gradients through unchanged); what
        :func:`lrp_kernels.explain` uses on a caller's patch."""
        before, self._boundaries_on = self._boundaries_on, False
        try:
            yield self
        finally:
            self._boundaries_on = before

    def _deepcopy_unpatched(self, memo: dict) -> nn.Module:
        with self.unpatched() as model:
            return copy.deepcopy(model, memo)

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (f"PatchHandle({type(self.model).__name__}, rules={self.rules!r}, epsilon={self.epsilon}, "
                f"backend={self.backend_name!r}, view={self.view!r}, {len(self.applied)} modules, {state})")


def _plan(model: nn.Module, family: Optional[Family]) -> tuple[list, list[str]]:
    """(module name, module, rule name, installer) for every module needing a rule; unknowns."""
    fam = family or Family(name="generic", model_types=())
    plan, unknown = [], []
    for name, m in model.named_modules():
        label = name or "<root>"
        cls = type(m).__name__
        rule: Optional[tuple[str, Callable]] = None
        if cls in fam.module_rules:
            rule = (cls, fam.module_rules[cls])
        elif installers.is_dropout(m):
            rule = ("dropout-off", installers.install_dropout)
        elif isinstance(m, nn.MultiheadAttention):
            rule = ("multihead-attention", installers.install_multihead_attention)
        elif installers.is_plain_linear(m):
            rule = ("epsilon", installers.install_linear)
        elif installers.is_conv1d(m):
            rule = ("epsilon", installers.install_conv1d)
        elif installers.is_linear_like(m):
            rule = ("epsilon-vjp", installers.install_generic_epsilon)
        elif installers.is_rms_norm(m, fam.rms_norm_names):
            offset = fam.rms_weight_offset
            rule = ("rmsnorm-identity", lambda handle, n, mod, o=offset: installers.install_rms_norm(handle, n, mod, o))
        elif isinstance(m, nn.LayerNorm):
            rule = ("layernorm", installers.install_layer_norm)
        elif installers.is_elementwise_activation(m):
            rule = ("identity", installers.install_activation)
        elif isinstance(m, nn.Embedding) or cls in fam.parameter_holders:
            rule = None  # lookups / additive constants: no rule in the gradient view
        elif any(True for _ in m.parameters(recurse=False)):
            unknown.append(f"{label} ({cls}): module with parameters and no LRP rule")
        elif installers.looks_like_nonlinearity(m):
            unknown.append(f"{label} ({cls}): non-linearity with no LRP rule")
        elif installers.looks_like_normalization(m):
            unknown.append(f"{label} ({cls}): normalisation with no LRP rule")
        elif installers.computes_attention_itself(m):
            unknown.append(f"{label} ({cls}): attention computed in its own forward, not through "
                           "transformers' AttentionInterface (its softmax and products keep the plain gradient)")
        if rule is not None:
            plan.append((label, m, rule[0], rule[1]))
    return plan, unknown


def _swap_configs(handle: PatchHandle, model: nn.Module) -> None:
    """Give each module that holds a config a patched *copy* (originals stay untouched); the
    attention adapter finds the patch's options through the module's owner (:func:`_claim`)."""
    try:
        from transformers import PretrainedConfig
    except Exception:  # pragma: no cover
        return
    copies: dict[int, object] = {}
    for m in model.modules():
        config = vars(m).get("config")
        if not isinstance(config, PretrainedConfig):
            continue
        if id(config) not in copies:
            new = copy.copy(config)
            own = getattr(config, "_attn_implementation", None)
            object.__setattr__(new, "_attn_implementation_internal", attention_adapter.attention_name(handle.rules, own))
            if getattr(new, "use_cache", None):
                new.use_cache = False  # explaining needs no KV cache (a call may still pass use_cache=True)
            copies[id(config)] = new
        handle.set_attr(m, "config", copies[id(config)])


def _freeze(handle: PatchHandle, model: nn.Module) -> None:
    for p in model.parameters():
        if p.requires_grad:
            p.requires_grad_(False)
            handle.frozen.append(p)
            handle._undo.append(lambda p=p: p.requires_grad_(True))


ATTENTION_CHOICES = ("auto", "platform", "exact")
VIEWS = ("gradient", "relevance")
#: keyword arguments whose ``.grad`` is the relevance in the relevance view
RELEVANCE_INPUTS = ("inputs_embeds", "decoder_inputs_embeds", "pixel_values")


class _RelevanceAtInput(torch.autograd.Function):
    """Input boundary of the relevance view: forward identity; backward ``R_x = x * G_x``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        cd = torch.promote_types(grad.dtype, torch.float32)  # bf16 / fp16 products in float32
        return (x.to(cd) * grad.to(cd)).to(grad.dtype)


class _RelevanceAtOutput(torch.autograd.Function):
    """Output boundary of the relevance view: forward identity; backward ``G_y = R_y / y``
    (the gradient-view seed whose relevance ``y * G_y`` is the given ``R_y``); where ``y = 0``
    exactly, ``R_y / epsilon``, the stabiliser of every epsilon rule."""

    @staticmethod
    def forward(ctx, y, epsilon):
        ctx.save_for_backward(y)
        ctx.epsilon = epsilon
        return y.view_as(y)

    @staticmethod
    def backward(ctx, relevance):
        y, = ctx.saved_tensors
        cd = torch.promote_types(relevance.dtype, torch.float32)
        yc = y.to(cd)
        den = torch.where(yc == 0, torch.full_like(yc, ctx.epsilon), yc)
        return (relevance.to(cd) / den).to(relevance.dtype), None


def _wrap_model_output(output: Any, epsilon: float) -> Any:
    """The model output with its relevance carrier (``logits``, else an image-text model's
    similarity matrix, else ``last_hidden_state``, else the first floating tensor) behind the
    output boundary."""
    def wrap(t):
        return _RelevanceAtOutput.apply(t, epsilon)
    if isinstance(output, torch.Tensor):
        return wrap(output)
    per_text = None if isinstance(output, tuple) else getattr(output, "logits_per_text", None)
    if isinstance(per_text, torch.Tensor) and per_text.is_floating_point():
        # CLIP / SigLIP: one similarity matrix, returned both ways round
        per_text = wrap(per_text)
        output.logits_per_text, output.logits_per_image = per_text, per_text.t()
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None) if not isinstance(output, tuple) else None
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(output, key, wrap(value))  # a ModelOutput keeps attribute and item in step
            return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (wrap(output[0]),) + tuple(output[1:])
    raise TypeError(f"view='relevance' found no logits / last_hidden_state / tensor in the model's "
                    f"output ({type(output).__name__}) to seed relevance at")


def _mark_gradient_view_output(handle: "PatchHandle", model: nn.Module) -> None:
    """Mark the output (logits) of a gradient-view patch, so a relevance-view drop-in applied
    to it (``lrp_kernels.functional.softmax(logits)``) raises instead of mixing views."""
    def mark(module, args, output):
        for t in (output, getattr(output, "logits", None), getattr(output, "last_hidden_state", None)):
            if isinstance(t, torch.Tensor):
                mark_gradient_view_output(t, handle)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            mark_gradient_view_output(output[0], handle)
    handle._undo.append(model.register_forward_hook(mark).remove)


def _install_relevance_view(handle: "PatchHandle", model: nn.Module) -> None:
    """Boundaries that turn the gradient view into LXT-explicit's relevance view: the output's
    backward seed is its relevance, ``inputs_embeds.grad`` is the input relevance."""
    def at_input(module, args, kwargs):
        if not handle._boundaries_on:
            return None
        wrapped = {k: _RelevanceAtInput.apply(v) for k, v in kwargs.items()
                   if k in RELEVANCE_INPUTS and isinstance(v, torch.Tensor) and v.is_floating_point()}
        return (args, dict(kwargs, **wrapped)) if wrapped else None

    def at_output(module, args, kwargs, output):
        return _wrap_model_output(output, handle.epsilon) if handle._boundaries_on else None

    for hook in (model.register_forward_pre_hook(at_input, with_kwargs=True),
                 model.register_forward_hook(at_output, with_kwargs=True)):
        handle._undo.append(hook.remove)


def _claim(handle: PatchHandle, model: nn.Module) -> None:
    """Every module of the model belongs to this patch (gradient view) until ``remove()``:
    nested or overlapping patches and relevance-view hooks on its modules are refused."""
    for name, m in model.named_modules():
        other = gradient_view_owner(m)
        if other is not None and other is not handle:
            where = name or "the model"
            raise RuntimeError(f"{where} ({type(m).__name__}) is already part of a patched model "
                               f"({other!r}); remove() that patch first (patches may not nest or overlap)")
    for m in model.modules():
        claim_gradient_view(m, handle)
        handle._undo.append(lambda m=m: release_gradient_view(m))


def _install(handle: PatchHandle, plan: list, family: Optional[Family]) -> None:
    """Everything the patch changes, each change logged for ``remove()``."""
    model = handle.model
    try:
        _claim(handle, model)
        _freeze(handle, model)
        _swap_configs(handle, model)
        for name, module, rule_name, install in plan:
            install(handle, name, module)
            handle.applied[name] = rule_name
        if family is not None and family.setup is not None:
            family.setup(handle, model)
        if handle.view == "relevance":
            _install_relevance_view(handle, model)
        else:
            _mark_gradient_view_output(handle, model)
        handle.set_attr(model, _MARK, handle)
        # a patched model still copies and saves like an unpatched one (see PatchHandle.unpatched)
        handle.set_attr(model, "__deepcopy__", handle._deepcopy_unpatched)
        handle.set_attr(model, "__reduce_ex__", _refuse_pickle)
        if callable(getattr(model, "save_pretrained", None)):
            original_save = model.save_pretrained

            def save_pretrained(*args, **kwargs):
                with handle.unpatched():
                    return original_save(*args, **kwargs)
            handle.set_attr(model, "save_pretrained", save_pretrained)
    except BaseException:
        handle.remove()
        raise
    handle.active = True


def _refuse_pickle(protocol=None):
    raise TypeError("a patched model cannot be pickled (its forwards are rebound closures): call "
                    "remove() on the lrp_kernels patch handle first, then pickle / torch.save it")


def patch(model: nn.Module, rules: str = "attnlrp", epsilon: float = DEFAULT_EPSILON, backend: str = "auto",
          strict: bool = True, attention: str = "auto", view: str = "gradient") -> PatchHandle:
    """Patch one Hugging Face model instance with AttnLRP (``rules="attnlrp"``) or CP-LRP
    (``"cp-lrp"``: no relevance through the attention softmax).

    Args:
        model: a transformers ``PreTrainedModel`` of a registered family
            (:data:`lrp_kernels.hf.families.REGISTRY`).
        rules: ``"attnlrp"`` or ``"cp-lrp"``.
        epsilon: the stabiliser of the epsilon / uniform rules (linear, matmul, identity); a
            finite number > 0.
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"triton"`` for the rule kernels.
        strict: unknown parts raise :class:`UnsupportedModelError` (True) or warn (False).
        attention: ``"auto"`` (default: the platform path wherever it can serve the model),
            ``"platform"`` (the model's own attention, transformers' SDPA or eager path, forward
            and backward with the AttnLRP rescalings: the price of plain attention; ``G_Q``,
            ``G_K`` deviate from the exact rule by ``eps / (|S0| + eps)`` per score, see
            :func:`lrp_kernels.ops.attention.attnlrp_platform`) or ``"exact"``
            (:func:`lrp_kernels.ops.attention.attnlrp_attention`: the exact rule, chunked on CPU,
            flash-AttnLRP on CUDA; forward values from the model's own attention). The forward
            is the unpatched model's, bit for bit, on every path.
        view: what ``backward`` means at the model's boundary. ``"gradient"`` (default): seed
            the output with a gradient (``logit.backward()``) and read the relevance as
            ``inputs_embeds * inputs_embeds.grad``. ``"relevance"`` (LXT explicit's convention):
            seed with the output's relevance (``logit.backward(logit)``, or any relevance
            tensor) and ``inputs_embeds.grad`` *is* the relevance. Inside the model both are the
            same rules; the relevance view adds two boundaries: on the ``inputs_embeds``
            (``decoder_inputs_embeds``, ``pixel_values``) keyword arguments (``R = x * G``) and on the output's ``logits`` (or
            CLIP / SigLIP's ``logits_per_image`` and ``logits_per_text``, or ``last_hidden_state``;
            ``G = R / y``, which saves the logits for the backward).

    Returns:
        a :class:`PatchHandle` (context manager; ``remove()`` restores the model exactly).

    A patched model deep-copies into an *unpatched* copy (patch the copy to explain with it),
    saves with ``save_pretrained`` exactly what the unpatched model saves, and refuses to be
    pickled (``torch.save(model)``) with an error that says to ``remove()`` first.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if rules not in attention_adapter.ATTENTION_NAMES:
        raise ValueError(f"rules must be one of {tuple(attention_adapter.ATTENTION_NAMES)}, got {rules!r}")
    check_epsilon(epsilon)
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0 (0 divides by zero where an output is 0), got {epsilon!r}")
    dispatch.check_backend(backend)
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS} (what backward seeds and .grad hold at the model's "
                         f"boundary), got {view!r}")
    existing = vars(model).get(_MARK)
    if existing is not None and existing.active:
        raise RuntimeError("model is already patched; call remove() on its handle first")

    family = family_for(model)
    plan, unknown = _plan(model, family)
    if family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        unknown.insert(0, f"model class {type(model).__name__} (model_type {model_type!r}): no family in "
                          "lrp_kernels.hf.families.REGISTRY")
    if unknown:
        msg = "lrp_kernels.patch has no rule for:\n  " + "\n  ".join(unknown)
        if strict:
            raise UnsupportedModelError(msg + "\n(pass strict=False to patch the rest and keep plain gradients there)")
        warnings.warn(msg + "\n(these keep their plain gradient)", stacklevel=2)

    attention_adapter.register_attention()
    handle = PatchHandle(model, rules, epsilon, backend, attention, view)
    handle.unsupported = unknown
    handle._reinstall = lambda: _install(handle, plan, family)
    handle._reinstall()
    return handle


__all__ = ["patch", "PatchHandle", "UnsupportedModelError"]
