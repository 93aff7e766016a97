r"""Custom rules for any module: :class:`Hook`, :class:`BasicHook`, :class:`ParamMod`.

A *rule* replaces the gradient a module passes to its inputs during the backward pass.
Users coming from Zennit know the interface; this is our own implementation of it.

How a hook sees one call of its module
--------------------------------------
``Hook.register(module)`` installs a forward pre-hook and a forward hook. Every call of the
module gets its own :class:`_Call` record (so a module used twice in one forward keeps two
independent states, and the backward of each call knows which call it belongs to). Two routes:

* plain :class:`Hook` (``needs_grad_input = True``): the pre-hook routes the tensor positional
  inputs that require grad through an identity autograd Function (``_InputGate``), whose
  backward runs ``Hook.backward`` with the module's own input gradient (``grad_input``) and the
  ``grad_output`` recorded by a second identity Function on the output(s) (``_OutputGate``);
* rules (:class:`BasicHook`, ``Pass``; ``needs_grad_input = False``): the module runs on
  *detached* inputs, so its own input backward never runs (a rule recomputes what it needs), and
  one Function (``_RuleGate``) joins the outputs to the original inputs; its backward returns
  the rule's result directly. Parameters still get their ordinary gradient from the output.

We do not use ``register_full_backward_hook``: it returns its inputs/outputs as views from a
custom Function, so an in-place successor (``ReLU(inplace=True)``) raises, and it has no notion
of which call a backward belongs to. The output gates return a *copy* of the output, so
successors may modify it in place; the copy is transient (the module's own output is freed
unless the module saved it for its backward). Inputs are not copied (no memory cost) except for
modules with ``inplace=True``, so the stored input stays the true input; an input modified in
place after the forward is refused with a clear error, never used silently.

Only positional tensor arguments get the rule; tensor keyword arguments and non-tensor
arguments are passed to the module (and to the re-runs of :class:`BasicHook`) unchanged and
receive their ordinary gradient.

The generalised rule (:class:`BasicHook`)
-----------------------------------------
For ``K`` modified copies of the module (input modifier ``h_in^k``, parameter modifier
``h_param^k``, output modifier ``h_out^k``)::

    x^k = h_in^k(x)
    y^k = h_out^k( f(x^k; h_param^k(theta)) )
    (g^1, ..., g^K) = gradient_mapper(R_y, (y^1, ..., y^K))
    v^k = (d y^k / d x^k)^T g^k                      # vector-Jacobian product
    R_x = reducer((x^1, ..., x^K), (v^1, ..., v^K))

The defaults (identity modifiers, ``g = R_y / stab(y)``, ``R_x = sum_k x^k * v^k``) give the
epsilon rule ``R_x = x * (J^T (R_y / stab(y)))``; the ``stabilizer`` argument is honoured by the
default mapper and available to custom mappers as ``self.stabilizer``.

Views (docs/math.md): ``relevance=True`` (default, as in Zennit) the backward receives the output
relevance and returns the input relevance. ``relevance=False`` (gradient view, what the model
patches of :mod:`lrp_kernels` use): the backward receives ``G_y`` with ``R_y = y * G_y`` and
returns ``G_x = d/dx [sum R_x(x)]`` with the ``v^k`` held constant, which equals ``R_x / x`` for
input modifiers of the form ``x * mask(x)`` (identity, positive/negative part). Rules whose
input modifier drops ``x`` (Flat, WSquare, ZBox) have no gradient view and refuse it.

Parameters are modified on a copy: :class:`ParamMod` builds a dict of modified tensors and the
module is re-run functionally (``F.linear`` / ``_conv_forward`` for Linear and Conv, otherwise
``torch.func.functional_call``); the model's ``Parameter`` objects and ``state_dict`` are never
written.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..ops._common import DEFAULT_EPSILON, compute_dtype, gradient_view_owner, record, recording, stabilize

__all__ = ["Hook", "BasicHook", "ParamMod", "HookHandle", "stabilize", "hooks_suppressed",
           "identity", "zero_grad_reducer"]

Tensors = Tuple[Optional[torch.Tensor], ...]


# ----------------------------------------------------------------------------- stabiliser
# `stabilize` is the one stabiliser of lrp_kernels.ops (re-exported here, as Zennit users expect).

def _as_stabilizer(stabilizer: Union[None, float, Callable]) -> Callable[[torch.Tensor], torch.Tensor]:
    if stabilizer is None:
        return functools.partial(stabilize, epsilon=DEFAULT_EPSILON)
    if callable(stabilizer):
        return stabilizer
    if isinstance(stabilizer, (int, float)) and not isinstance(stabilizer, bool) and stabilizer >= 0:
        return functools.partial(stabilize, epsilon=float(stabilizer))
    raise TypeError(f"stabilizer must be a non-negative number (epsilon) or a callable "
                    f"tensor -> tensor, got {stabilizer!r}")


# ----------------------------------------------------------------------------- per-call plumbing

_local = threading.local()


@contextlib.contextmanager
def hooks_suppressed():
    """Inside this block hooks of this module do nothing (used for the re-runs of BasicHook)."""
    _local.suppress = getattr(_local, "suppress", 0) + 1
    try:
        yield
    finally:
        _local.suppress -= 1


def _suppressed() -> bool:
    return getattr(_local, "suppress", 0) > 0


class _Call:
    """State of one call of a hooked module (kept alive by the autograd graph of that call)."""
    __slots__ = ("hook", "module", "stored", "n_args", "positions", "active", "__weakref__")

    def __init__(self, hook: "Hook", module: nn.Module):
        self.hook, self.module = hook, module
        self.stored: Dict[str, Any] = {}
        self.n_args = 0
        self.positions: Tuple[int, ...] = ()   # positional args routed through the input gate
        self.active = True


class _InputGate(torch.autograd.Function):
    """Identity on the gated inputs; its backward runs ``Hook.backward`` for the call."""

    @staticmethod
    def forward(ctx, call, clone, *tensors):
        ctx.call = call
        return tuple(t.clone() if clone else t for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        call = ctx.call
        if call.active:
            grads = call.hook._backward_for_call(call, grads)
        return (None, None) + tuple(grads)


class _OutputGate(torch.autograd.Function):
    """Copy of the output(s) (so successors may work in place); records ``grad_output``."""

    @staticmethod
    def forward(ctx, call, *tensors):
        ctx.call = call
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.call.active:
            ctx.call.stored["grad_output"] = grads
        return (None,) + tuple(grads)


class _RuleGate(torch.autograd.Function):
    """Route of hooks with ``needs_grad_input = False``: the module ran on *detached* inputs, so
    its own input gradient is never computed; this Function joins the module's outputs (copied,
    gradients passed through to them for the parameters) and the original inputs, and its
    backward returns the rule's input gradient directly."""

    @staticmethod
    def forward(ctx, call, n_out, *tensors):
        ctx.call, ctx.n_out = call, n_out
        ctx.in_meta = [(t.shape, t.dtype, t.device) for t in tensors[n_out:]]
        return tuple(t.clone() for t in tensors[:n_out])

    @staticmethod
    def backward(ctx, *grads):
        call = ctx.call
        if not call.active:
            raise RuntimeError(
                f"the {type(call.hook).__name__} rule of {type(call.module).__name__} was removed before the "
                f"backward pass of a graph built while it was registered; run backward before remove()")
        call.stored["grad_output"] = grads
        placeholders = tuple(torch.zeros((), dtype=dt, device=dev).expand(shape) for shape, dt, dev in ctx.in_meta)
        return (None, None) + tuple(grads) + call.hook._backward_for_call(call, placeholders)


def _float_grad(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad


class HookHandle:
    """Returned by :meth:`Hook.register`; ``remove()`` takes the hook off the module and
    clears every tensor the hook stored (a graph built before stays valid: its gates then
    pass gradients through unchanged)."""

    def __init__(self, hook: "Hook", module: nn.Module, handles: List[Any]):
        self.hook, self.module, self._handles = hook, module, handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.hook._forget(self.module)

    def __enter__(self) -> "HookHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# ----------------------------------------------------------------------------- Hook

class Hook:
    """Base class of every rule: override :meth:`forward` and/or :meth:`backward`.

    ``forward(module, input, output)`` runs after the module's forward (``input`` is the tuple
    of positional arguments); it may store tensors in ``self.stored_tensors`` and may return a
    replacement output. ``backward(module, grad_input, grad_output)`` runs when the gradient
    of the module's inputs is known; ``grad_input`` is aligned with the positional arguments
    (``None`` for arguments that are not tensors requiring grad), ``grad_output`` is the tuple of
    gradients of the tensor outputs. Return a replacement for ``grad_input`` (a tensor for a
    single input, or a tuple), or ``None`` to keep it.

    ``self.stored_tensors`` belongs to the call being processed (one dict per call of the
    module; after a forward it is the dict of the latest call) and holds
    ``stored_tensors["grad_output"]`` during the backward.

    :meth:`copy` makes a fresh hook with the same constructor arguments (recorded when the
    instance is created), so subclasses with their own ``__init__`` need no ``copy()``.

    ``needs_grad_input = False`` (set by :class:`BasicHook` and ``Pass``) declares that
    ``backward`` does not read the values of ``grad_input`` (only which entries are ``None``):
    the module then runs on detached inputs and its own input gradient is never computed
    (``grad_input`` holds zero placeholders), which halves the backward work of a rule.
    """

    needs_grad_input = True

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj._init_args = (args, dict(kwargs))
        obj.stored_tensors = {}
        obj._calls = weakref.WeakSet()
        obj._pending = {}
        return obj

    def __init__(self) -> None:
        self.stored_tensors = {}

    # --- user-facing interface ------------------------------------------------------------
    def forward(self, module: nn.Module, input: Tuple[Any, ...], output: Any) -> Any:
        """Called after the module's forward. Return ``None`` to keep the output."""
        return None

    def backward(self, module: nn.Module, grad_input: Tensors, grad_output: Tensors) -> Any:
        """Return the replacement input gradient, or ``None`` to keep ``grad_input``."""
        return None

    def copy(self) -> "Hook":
        """A fresh, unregistered hook of the same type with the same constructor arguments."""
        args, kwargs = self._init_args
        return type(self)(*args, **kwargs)

    def register(self, module: nn.Module) -> HookHandle:
        """Attach this hook to ``module``; the returned handle's ``remove()`` undoes it."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self._check_module(module)
        owner = gradient_view_owner(module)
        if owner is not None and getattr(self, "relevance", False):
            raise ValueError(
                f"{type(self).__name__} (relevance view) on {type(module).__name__}, which is part of a model "
                f"patched in the gradient view ({owner!r}): the backward would mix relevance and gradients. "
                f"Use {type(self).__name__}(..., relevance=False) or remove() the patch first")
        pre = module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        post = module.register_forward_hook(self._post_hook)
        return HookHandle(self, module, [pre, post])

    def _check_module(self, module: nn.Module) -> None:
        """Refuse modules this rule is not defined for (nothing is refused by default)."""

    def remove(self) -> None:
        """Clear every stored tensor of every call (registrations stay; use the handle)."""
        for call in list(self._calls):
            call.active = False
            call.stored.clear()
        self.stored_tensors = {}

    # --- plumbing -------------------------------------------------------------------------
    def _forget(self, module: nn.Module) -> None:
        for call in list(self._calls):
            if call.module is module:
                call.active = False
                call.stored.clear()
        self._pending.pop(id(module), None)
        self.stored_tensors = {}

    def _pre_hook(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
        if _suppressed():
            return None
        call = _Call(self, module)
        self._calls.add(call)
        call.n_args = len(args)
        call.stored["_orig_args"] = args
        # keyword arguments are constants of the rule (re-runs get them detached)
        call.stored["kwargs"] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        new_args = args
        if torch.is_grad_enabled():
            positions = tuple(i for i, a in enumerate(args) if _float_grad(a))
            if positions:
                clone = bool(getattr(module, "inplace", False))
                call.positions = positions
                if self.needs_grad_input:
                    gated = _InputGate.apply(call, clone, *(args[i] for i in positions))
                else:
                    call.stored["_originals"] = tuple(args[i] for i in positions)
                    gated = tuple(args[i].detach().clone() if clone else args[i].detach() for i in positions)
                new_args = list(args)
                for i, t in zip(positions, gated):
                    new_args[i] = t
                new_args = tuple(new_args)
        self._pending.setdefault(id(module), []).append(call)
        return new_args, kwargs

    def _post_hook(self, module: nn.Module, args: Tuple[Any, ...], output: Any):
        if _suppressed():
            return None
        stack = self._pending.get(id(module))
        if not stack:  # registered while the module was running
            return None
        call = stack.pop()
        orig_args = call.stored.pop("_orig_args")
        self.stored_tensors = call.stored
        replaced = self.forward(module, orig_args, output)
        if replaced is not None:
            output = replaced
        originals = call.stored.pop("_originals", None)
        if not torch.is_grad_enabled():
            return output
        if originals is not None:
            return _join(call, output, originals)
        if isinstance(output, torch.Tensor):
            return _OutputGate.apply(call, output)[0] if _float_grad(output) else output
        if isinstance(output, (tuple, list)):
            idx = [i for i, o in enumerate(output) if _float_grad(o)]
            if not idx:
                return output
            gated = _OutputGate.apply(call, *(output[i] for i in idx))
            items = list(output)
            for i, t in zip(idx, gated):
                items[i] = t
            return type(output)(items) if isinstance(output, list) else _rebuild_tuple(output, items)
        return output

    def _backward_for_call(self, call: _Call, grads: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
        grad_output = call.stored.get("grad_output")
        if grad_output is None:  # the output gate saw no gradient: nothing to rewrite
            return grads
        grad_input: List[Optional[torch.Tensor]] = [None] * call.n_args
        for i, g in zip(call.positions, grads):
            grad_input[i] = g
        self.stored_tensors = call.stored
        result = self.backward(call.module, tuple(grad_input), tuple(grad_output))
        if result is None:
            return grads
        if isinstance(result, torch.Tensor):
            result = (result,)
        result = tuple(result)
        out = []
        for i, g in zip(call.positions, grads):
            r = result[i] if i < len(result) else None
            if r is None:
                out.append(torch.zeros_like(g))
                continue
            if r.shape != g.shape:
                raise RuntimeError(
                    f"{type(self).__name__}.backward returned a gradient of shape {tuple(r.shape)} "
                    f"for input {i} of {type(call.module).__name__}, expected {tuple(g.shape)}")
            out.append(r.to(g.dtype))
        return tuple(out)


def _join(call: _Call, output: Any, originals: Tuple[torch.Tensor, ...]) -> Any:
    """Connect the floating-point tensor output(s) to the original inputs through _RuleGate."""
    def is_float(o):
        return isinstance(o, torch.Tensor) and o.is_floating_point()
    if isinstance(output, torch.Tensor):
        idx, items = ([0], [output]) if is_float(output) else ([], [output])
    elif isinstance(output, (tuple, list)):
        items = list(output)
        idx = [i for i, o in enumerate(items) if is_float(o)]
    else:
        idx, items = [], []
    if not idx:
        raise RuntimeError(f"{type(call.hook).__name__} on {type(call.module).__name__}: the module returned no "
                           f"floating-point tensor, so relevance cannot flow back to its inputs")
    gated = _RuleGate.apply(call, len(idx), *(items[i] for i in idx), *originals)
    for i, t in zip(idx, gated):
        items[i] = t
    if isinstance(output, torch.Tensor):
        return items[0]
    return items if isinstance(output, list) else _rebuild_tuple(output, items)


def _rebuild_tuple(original: tuple, items: list) -> tuple:
    if hasattr(original, "_fields"):  # namedtuple
        return type(original)(*items)
    return type(original)(items) if type(original) is not tuple else tuple(items)


# ----------------------------------------------------------------------------- ParamMod

class ParamMod:
    """Parameter modifier for one copy of the module in :class:`BasicHook`.

    ``modifier(param, name) -> tensor`` is applied to the module's own parameters (not those of
    its submodules) named in ``param_keys`` (all of them when ``None``; none for ``[]``); those in
    ``zero_params`` are replaced by zeros instead. A name the module has as an attribute set to
    ``None`` (``bias=False``) is skipped. With ``require_params=True`` a name in ``param_keys``
    the module has no attribute for at all raises ``RuntimeError`` (in the backward, when the
    modifier runs). The module's own parameters are never written: the result is a dict of new
    tensors for a functional re-run (Zennit's ``ParamMod`` swaps them in and out as a context
    manager instead; :mod:`lrp_kernels.compat.zennit` has that form).
    """

    def __init__(self, modifier: Callable[[torch.Tensor, str], torch.Tensor],
                 param_keys: Optional[Iterable[str]] = None,
                 zero_params: Optional[Union[str, Iterable[str]]] = None,
                 require_params: bool = True):
        if not callable(modifier):
            raise TypeError(f"modifier must be callable (param, name) -> tensor, got {modifier!r}")
        self.modifier = modifier
        self.param_keys = None if param_keys is None else _names(param_keys)
        self.zero_params = _names(zero_params)
        self.require_params = bool(require_params)

    @classmethod
    def ensure(cls, obj: Union["ParamMod", Callable]) -> "ParamMod":
        """``obj`` if it is a ParamMod, else a default ParamMod around the function."""
        return obj if isinstance(obj, ParamMod) else cls(obj)

    def __call__(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        params = dict(module.named_parameters(recurse=False))
        keys = list(params) if self.param_keys is None else self.param_keys
        if self.require_params:
            missing = [k for k in keys if not hasattr(module, k)]
            if missing:
                raise RuntimeError(
                    f"{type(self).__name__}: {type(module).__name__} has no parameter(s) "
                    f"{missing} required by param_keys={self.param_keys} (present: {sorted(params)}); "
                    f"pass require_params=False to skip missing parameters")
        out: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name in keys:
                if name not in params:  # absent, or set to None: nothing to modify
                    continue
                p = params[name].detach()
                out[name] = torch.zeros_like(p) if name in self.zero_params else self.modifier(p, name)
            for name in self.zero_params:
                if name in params and name not in out:
                    out[name] = torch.zeros_like(params[name])
        return out


def _names(x: Optional[Union[str, Iterable[str]]]) -> List[str]:
    if x is None:
        return []
    if isinstance(x, str):
        return [x]
    return list(x)


def identity(x: torch.Tensor, *_: Any) -> torch.Tensor:
    return x


# ----------------------------------------------------------------------------- functional re-run

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _rerun(module: nn.Module, params: Dict[str, torch.Tensor], args: Sequence[Any],
           kwargs: Dict[str, Any]) -> Any:
    """``module(*args, **kwargs)`` with the parameters in ``params`` swapped in, no hooks."""
    with hooks_suppressed():
        # a Linear subclass with Linear's forward (nn.MultiheadAttention's out_proj) is a Linear
        # here, also when a patch has rebound its instance forward to a rule
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward and len(args) == 1 \
                and not kwargs:
            return nn.functional.linear(args[0], params.get("weight", module.weight),
                                        params.get("bias", module.bias))
        if type(module) in _CONV and len(args) == 1 and not kwargs:
            return module._conv_forward(args[0], params.get("weight", module.weight),
                                        params.get("bias", module.bias))
        return torch.func.functional_call(module, params, tuple(args), kwargs, strict=False)


# ----------------------------------------------------------------------------- BasicHook

def _tensor_output(out: Any, module: nn.Module) -> torch.Tensor:
    """The single floating-point tensor of a module's output (a tensor or a tuple holding one)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        found = [o for o in out if isinstance(o, torch.Tensor) and o.is_floating_point()]
        if len(found) == 1:
            return found[0]
    raise RuntimeError(f"BasicHook supports modules with exactly one floating-point tensor output; "
                       f"{type(module).__name__} returned {type(out).__name__}")


def _default_reducer(inputs: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(x * g for x, g in zip(inputs, gradients))


def zero_grad_reducer(inputs: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """Reducer that ignores the inputs: ``sum_k v^k`` (for rules whose inputs are constants)."""
    return sum(gradients)


class BasicHook(Hook):
    """The generalised LRP rule (see the module docstring); defaults give the epsilon rule.

    Arguments are K-lists (``input_modifiers`` ``x -> x^k``, ``param_modifiers``
    ``(param, name) -> param^k`` or :class:`ParamMod`, ``output_modifiers`` ``y -> y^k``; an
    omitted list is K identities) and two functions: ``gradient_mapper(grad_output, outputs)``
    returning K tensors and ``reducer(inputs, gradients)`` returning one. ``stabilizer``
    (epsilon, or a callable) is used by the default gradient mapper ``g^k = R_y / stab(y^k)``.
    ``relevance`` selects the view (see the module docstring).
    """

    #: False for rules whose input modifiers drop x (no gradient view)
    supports_gradient_view = True
    needs_grad_input = False
    #: the conservation check (lrp_kernels.tools.check) expects sum(R_in) == sum(R_out) for this rule
    #: when the layer's bias (unless zeroed by the rule) is zero / absent ...
    conserves = False
    #: ... or always, for rules whose denominators have no bias term
    ignores_bias = False

    def expects_conservation(self, module: nn.Module) -> bool:
        """Whether the conservation check should expect ``sum(R_in) == sum(R_out)`` here."""
        if not self.conserves:
            return False
        if self.ignores_bias:
            return True
        zeroed = set(_names(getattr(self, "zero_params", None)))
        for name, p in module.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias" and name not in zeroed and bool(p.detach().any()):
                return False
        return True

    def _report(self, module: nn.Module, inputs: Sequence[Any], positions: Sequence[int],
                result: Sequence[Optional[torch.Tensor]], grad_output: torch.Tensor,
                y: Optional[torch.Tensor] = None) -> None:
        """Hand this application to the conservation check mode (no-op when none is active)."""
        if not recording():
            return
        if not self.relevance and y is None:
            with torch.no_grad():
                y = _tensor_output(_rerun(module, {}, inputs, self._kwargs()), module)
        record(f"{type(self).__name__}({type(module).__name__})", [inputs[i] for i in positions],
                      [result[i] for i in positions], None if self.relevance else y, grad_output,
                      self.relevance, lambda: self.expects_conservation(module))

    def __init__(self, input_modifiers: Optional[Sequence[Callable]] = None,
                 param_modifiers: Optional[Sequence[Union[Callable, ParamMod]]] = None,
                 output_modifiers: Optional[Sequence[Callable]] = None,
                 gradient_mapper: Optional[Callable] = None,
                 reducer: Optional[Callable] = None,
                 stabilizer: Union[None, float, Callable] = DEFAULT_EPSILON,
                 relevance: bool = True):
        super().__init__()
        given = {n: list(m) for n, m in (("input_modifiers", input_modifiers),
                                           ("param_modifiers", param_modifiers),
                                           ("output_modifiers", output_modifiers)) if m is not None}
        lengths = {len(m) for m in given.values()}
        if 0 in lengths or len(lengths) > 1:
            listed = ", ".join(f"{n} has {len(m)}" for n, m in given.items())
            raise ValueError(f"modifier lists must be non-empty and of one length K: {listed}")
        k = lengths.pop() if lengths else 1
        self.input_modifiers = given.get("input_modifiers", [identity] * k)
        self.param_modifiers = [ParamMod.ensure(m) for m in given.get("param_modifiers", [identity] * k)]
        self.output_modifiers = given.get("output_modifiers", [identity] * k)
        self.stabilizer = _as_stabilizer(stabilizer)
        self.gradient_mapper = gradient_mapper if gradient_mapper is not None else self._default_mapper
        self.reducer = reducer if reducer is not None else _default_reducer
        if relevance is not True and relevance is not False:
            raise TypeError(f"relevance must be True (relevance view) or False (gradient view), got {relevance!r}")
        if not relevance and not self.supports_gradient_view:
            raise ValueError(f"{type(self).__name__} has no gradient view (its input modifier does not "
                             f"scale with x); use relevance=True")
        self.relevance = relevance

    def _default_mapper(self, grad_output: torch.Tensor, outputs: Sequence[torch.Tensor]):
        return tuple(grad_output / self.stabilizer(o) for o in outputs)

    def forward(self, module: nn.Module, input: Tuple[Any, ...], output: Any) -> None:
        # detach: the stored inputs must not keep a second graph alive; the versions catch
        # an in-place change of an input between the forward and the backward
        self.stored_tensors["input"] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in input)
        self.stored_tensors["versions"] = tuple(a._version if isinstance(a, torch.Tensor) else None for a in input)

    def _kwargs(self) -> Dict[str, Any]:
        return self.stored_tensors.get("kwargs", {})

    def backward(self, module: nn.Module, grad_input: Tensors, grad_output: Tensors):
        inputs = self.stored_tensors["input"]
        for i, (a, v) in enumerate(zip(inputs, self.stored_tensors["versions"])):
            if isinstance(a, torch.Tensor) and a._version != v:
                raise RuntimeError(
                    f"input {i} of {type(module).__name__} was modified in place after the forward; "
                    f"{type(self).__name__} needs the original input (avoid the in-place op or clone it)")
        grads_out = [g for g in grad_output if g is not None]
        if len(grads_out) != 1:
            raise RuntimeError(f"{type(self).__name__} supports modules with exactly one tensor output; "
                               f"{type(module).__name__} has {len(grad_output)}")
        g_out = grads_out[0]
        positions = [i for i, g in enumerate(grad_input) if g is not None]
        kwargs = self._kwargs()
        with torch.enable_grad():
            if self.relevance:
                r_out = g_out
            else:
                with torch.no_grad():
                    y = _tensor_output(_rerun(module, {}, inputs, kwargs), module)
                r_out = g_out.to(compute_dtype(g_out, y)) * y.to(compute_dtype(g_out, y))
            base = {i: inputs[i].detach().requires_grad_(not self.relevance) for i in positions}
            mod_graph: List[Dict[int, torch.Tensor]] = []   # x^k as functions of x (gradient view)
            leaves: List[Dict[int, torch.Tensor]] = []      # x^k as leaves for the VJP
            outputs = []
            for in_mod, par_mod, out_mod in zip(self.input_modifiers, self.param_modifiers, self.output_modifiers):
                xk = {i: in_mod(base[i]) for i in positions}
                lk = {i: t.detach().requires_grad_(True) for i, t in xk.items()}
                args = [lk.get(i, a) for i, a in enumerate(inputs)]
                outputs.append(out_mod(_tensor_output(_rerun(module, par_mod(module), args, kwargs), module)))
                mod_graph.append(xk)
                leaves.append(lk)
            mapped = self.gradient_mapper(r_out, tuple(o.detach() for o in outputs))
            if isinstance(mapped, torch.Tensor):
                mapped = (mapped,)
            mapped = list(mapped)
            if len(mapped) != len(outputs):
                raise RuntimeError(f"gradient_mapper returned {len(mapped)} tensors for {len(outputs)} outputs")
            flat_leaves = [lk[i] for lk in leaves for i in positions]
            vjps = torch.autograd.grad([o for o in outputs], flat_leaves,
                                       [m.to(o.dtype) for m, o in zip(mapped, outputs)], allow_unused=True)
            vs = [{} for _ in outputs]
            it = iter(vjps)
            for k in range(len(outputs)):
                for i in positions:
                    v = next(it)
                    vs[k][i] = torch.zeros_like(leaves[k][i]) if v is None else v
            result: List[Optional[torch.Tensor]] = [None] * len(grad_input)
            for i in positions:
                if self.relevance:
                    result[i] = self.reducer(tuple(lk[i].detach() for lk in leaves), tuple(v[i] for v in vs))
                else:
                    red = self.reducer(tuple(xk[i] for xk in mod_graph), tuple(v[i].detach() for v in vs))
                    g, = torch.autograd.grad(red.sum(), base[i], allow_unused=True)
                    result[i] = torch.zeros_like(base[i]) if g is None else g
        self._report(module, inputs, positions, result, g_out, None if self.relevance else y)
        return tuple(result)

