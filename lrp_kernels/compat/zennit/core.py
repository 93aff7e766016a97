r"""Zennit's engine (``zennit.core`` of Zennit 0.5.1): stabilisers, :class:`ParamMod`,
:class:`Hook`, :class:`BasicHook`, :class:`Composite` — with Zennit's conventions, on our code.

What is ours and what follows Zennit
------------------------------------
* :func:`stabilize` is :func:`lrp_kernels.ops._common.stabilize` (the one stabiliser of every
  rule and kernel of lrp_kernels) with Zennit's default ``dim`` for ``norm_scale`` (every
  dimension but the batch) and the input's dtype kept.
* The hook mechanics follow Zennit, which differ from :mod:`lrp_kernels.hooks.core` on purpose:
  Zennit's :class:`Hook` keeps *one* ``stored_tensors`` dict per hook (the latest call wins,
  ours keeps one per call), attaches its backward to the ``grad_fn`` of an :class:`Identity` on
  the inputs (ours uses gate Functions, which also survive in-place successors), and
  :class:`ParamMod` is a context manager that swaps the module's parameters for the duration of
  the ``with`` block (ours returns new tensors for a functional re-run and never touches the
  module). Code written for Zennit — custom hooks that read ``stored_tensors``, subclasses of
  :class:`ParamMod` — depends on these details, so the compat layer keeps them.
* :class:`BasicHook` is the generalised rule of Zennit; rules may give it a *fused* backward
  (``fused``), which the built-in Epsilon and Gamma use for ``nn.Linear``: our kernel ops
  :func:`~lrp_kernels.ops.linear_epsilon.linear_epsilon_backward` and
  :func:`~lrp_kernels.ops.linear_gamma.linear_gamma_backward` (fused Triton kernels on CUDA).

The generalised rule, for ``K`` modified copies of the module::

    x^k = h_in^k(x)
    y^k = h_out^k( f(x^k; h_param^k(theta)) )
    (g^1, ..., g^K) = gradient_mapper(R_out, (y^1, ..., y^K))
    v^k = (d y^k / d x^k)^T g^k
    R_in = reducer((x^1, ..., x^K), (v^1, ..., v^K))
"""
from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from ...ops._common import stabilize as _our_stabilize

__all__ = ["Stabilizer", "stabilize", "expand", "zero_wrap", "ParamMod", "collect_leaves", "Identity", "Hook",
           "BasicHook", "RemovableHandle", "RemovableHandleList", "CompositeContext", "Composite"]

Names = Optional[Union[str, Sequence[str]]]
Modifier = Callable[[torch.Tensor, str], torch.Tensor]


# ----------------------------------------------------------------------------- stabilisers

def stabilize(input: torch.Tensor, epsilon: float = 1e-6, clip: bool = False, norm_scale: bool = False,
              dim: Optional[Union[int, Sequence[int]]] = None) -> torch.Tensor:
    """Keep ``input`` away from zero for a safe division, never flipping a sign (``sgn(0) = +1``).

    ``input + epsilon * sgn(input)``; with ``clip=True`` instead ``sgn(input) * max(|input|, epsilon)``;
    with ``norm_scale=True`` ``epsilon`` is first multiplied by the root mean square of ``input``
    over ``dim`` (Zennit's default: every dimension but the first, the batch; our
    :func:`lrp_kernels.ops._common.stabilize` defaults to all dimensions).
    """
    if norm_scale and dim is None:
        dim = tuple(range(1, input.ndim))
    return _our_stabilize(input, epsilon, clip=clip, norm_scale=norm_scale, dim=dim).to(input.dtype)


class Stabilizer:
    """:func:`stabilize` with its options bound: a callable ``tensor -> tensor`` for rules."""

    def __init__(self, epsilon: float = 1e-6, clip: bool = False, norm_scale: bool = False,
                 dim: Optional[Union[int, Sequence[int]]] = None):
        self.epsilon, self.clip, self.norm_scale, self.dim = epsilon, clip, norm_scale, dim

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        return stabilize(input, self.epsilon, self.clip, self.norm_scale, self.dim)

    @classmethod
    def ensure(cls, value: Union[float, int, Callable]) -> Callable[[torch.Tensor], torch.Tensor]:
        """A number becomes ``Stabilizer(epsilon=value)``; a callable is returned as it is.

        Raises ``TypeError`` for anything else.
        """
        if isinstance(value, (float, int)):
            return cls(epsilon=float(value))
        if callable(value):
            return value
        raise TypeError(f"a stabilizer is a number (epsilon) or a callable tensor -> tensor, got {value!r}")

    @property
    def plain_epsilon(self) -> Optional[float]:
        """``epsilon`` when this is the plain ``z + eps * sgn(z)`` (what our kernels compute), else None."""
        if self.clip or self.norm_scale or isinstance(self.epsilon, bool):
            return None
        if isinstance(self.epsilon, (int, float)) and 0 <= self.epsilon < float("inf"):
            return float(self.epsilon)
        return None


def expand(tensor: Any, shape: Sequence[int], cut_batch_dim: bool = False) -> torch.Tensor:
    """``tensor`` (a tensor, number or nested list) broadcast to ``shape``.

    Unlike ``Tensor.expand``, missing dimensions are added at the *end* (a ``(1, 3)`` tensor of
    per-channel bounds expands to ``(N, 3, H, W)``), and with ``cut_batch_dim=True`` a larger
    first dimension is cut to ``shape[0]``. Raises ``RuntimeError`` when the shapes do not fit.
    """
    tensor = tensor if isinstance(tensor, torch.Tensor) else torch.as_tensor(tensor)
    shape = tuple(shape)

    def fits(have: Sequence[int], want: Sequence[int]) -> bool:
        return all(h in (1, w) for h, w in zip(have, want))

    if tensor.ndim == 0:
        return tensor.expand(shape)
    if tensor.ndim < len(shape) and fits(tensor.shape, shape):
        tensor = tensor.reshape(tuple(tensor.shape) + (1,) * (len(shape) - tensor.ndim))
    if tensor.ndim == len(shape):
        if fits(tensor.shape, shape):
            return tensor.expand(shape)
        if cut_batch_dim and tensor.shape[0] > shape[0] and fits(tensor.shape[1:], shape[1:]):
            return tensor[:shape[0]].expand(shape)
    raise RuntimeError(f"cannot expand a tensor of shape {tuple(tensor.shape)} to {shape}")


# ----------------------------------------------------------------------------- parameter modifiers

def _name_list(names: Names) -> List[str]:
    if not names:
        return []
    return [names] if isinstance(names, str) else list(names)


def zero_wrap(zero_params: Names) -> Callable[[Modifier], Modifier]:
    """Decorator factory: the wrapped modifier ``(param, name) -> tensor`` returns zeros for the
    names in ``zero_params`` (a name or a list) and calls the modifier for every other name."""
    zeroed = _name_list(zero_params)

    def wrap(modifier: Modifier) -> Modifier:
        if not zeroed:
            return modifier

        @functools.wraps(modifier)
        def zero_or_modify(param: torch.Tensor, name: str) -> torch.Tensor:
            return torch.zeros_like(param) if name in zeroed else modifier(param, name)
        return zero_or_modify
    return wrap


class ParamMod:
    """Modify a module's parameters for the duration of a ``with`` block (Zennit's convention).

    ``with ParamMod(modifier)(module) as modified:`` sets each parameter named in ``param_keys``
    (``None``: the module's own parameters, not its children's; ``[]``: none) to
    ``modifier(param, name)`` — or to zeros for names in ``zero_params`` — and puts the originals
    back when the block ends, also on an error. An attribute that exists but is ``None``
    (``bias=False``) is skipped. With ``require_params=True`` a name the module does not have at
    all raises ``RuntimeError``.

    Our :class:`lrp_kernels.hooks.core.ParamMod` instead returns the modified tensors for a
    functional re-run (the module is never written, so it is safe under threads and
    ``torch.compile``); Zennit's rules and user subclasses expect the context manager.
    """

    def __init__(self, modifier: Modifier, param_keys: Optional[Sequence[str]] = None,
                 zero_params: Names = None, require_params: bool = True):
        self.modifier = modifier
        self.param_keys = param_keys
        self.zero_params = zero_params
        self.require_params = require_params

    @classmethod
    def ensure(cls, modifier: Union["ParamMod", Modifier]) -> "ParamMod":
        """``modifier`` itself if it is a ParamMod, a default ParamMod around it if it is callable;
        ``TypeError`` otherwise."""
        if isinstance(modifier, cls):
            return modifier
        if callable(modifier):
            return cls(modifier)
        raise TypeError(f"a parameter modifier is a ParamMod or a callable (param, name) -> tensor, got {modifier!r}")

    @contextmanager
    def __call__(self, module: nn.Module) -> Iterator[nn.Module]:
        keys = ([name for name, _ in module.named_parameters(recurse=False)] if self.param_keys is None
                else list(self.param_keys))
        missing = [key for key in keys if not hasattr(module, key)]
        if missing and self.require_params:
            raise RuntimeError(f"{type(self).__name__}: {type(module).__name__} has no parameter(s) {missing} "
                               f"(pass require_params=False to skip missing parameters)")
        modify = zero_wrap(self.zero_params)(self.modifier)
        originals: Dict[str, Any] = {}
        try:
            for key in keys:
                param = None if key in missing else getattr(module, key)
                if param is None:
                    continue
                originals[key] = param
                with torch.no_grad():
                    new = modify(param.detach(), key)
                setattr(module, key, nn.Parameter(new, requires_grad=False))
            yield module
        finally:
            for key, param in originals.items():
                setattr(module, key, param)


def collect_leaves(module: nn.Module) -> Iterator[nn.Module]:
    """The modules without children below ``module``, depth first in registration order
    (``module`` itself when it has no children)."""
    has_children = False
    for child in module.children():
        has_children = True
        yield from collect_leaves(child)
    if not has_children:
        yield module


# ----------------------------------------------------------------------------- handles

class RemovableHandle:
    """Calls ``remove()`` of an object through a weak reference (nothing once it is gone)."""

    def __init__(self, instance: Any):
        self.instance_ref = weakref.ref(instance)

    def remove(self) -> None:
        instance = self.instance_ref()
        if instance is not None:
            instance.remove()


class RemovableHandleList(list):
    """A list of handles; ``remove()`` removes each (hooks come off, canonizers revert) and empties it."""

    def remove(self) -> None:
        for handle in self:
            handle.remove()
        self.clear()


# ----------------------------------------------------------------------------- hooks

class Identity(torch.autograd.Function):
    """Identity on any number of tensors: gives the inputs of a module a ``grad_fn`` of their own,
    on which :class:`Hook` attaches its backward."""

    @staticmethod
    def forward(ctx, *inputs):
        return inputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        return grad_outputs


def _as_tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _single(items: tuple) -> Any:
    return items[0] if len(items) == 1 else items


class Hook:
    """Base class of Zennit-style rules: override :meth:`forward` and/or :meth:`backward`.

    ``forward(module, input, output)`` runs after the module's forward (``input`` the tuple of
    positional arguments; it may store tensors in ``self.stored_tensors``; returning a value
    replaces the output). ``backward(module, grad_input, grad_output)`` runs when the gradient of
    the module's inputs is known (``grad_output`` is also in ``stored_tensors['grad_output']``);
    returning a tuple replaces ``grad_input``. While ``active`` is False, the backward is skipped
    (also in graphs built before), which :meth:`Composite.inactive` uses for gradients of
    modified gradients. :meth:`copy` makes a new instance with no arguments: subclasses with
    their own ``__init__`` override it (our :class:`lrp_kernels.hooks.core.Hook` records the
    constructor arguments instead).
    """

    def __init__(self) -> None:
        self.stored_tensors: Dict[str, Any] = {}
        self.active = True
        self.tensor_handles = RemovableHandleList()

    def pre_forward(self, module: nn.Module, input: Any) -> Any:
        """Forward pre-hook: route the inputs through :class:`Identity` (when the first one needs a
        gradient) and attach :meth:`backward` to its ``grad_fn``; the inputs are then cloned, so
        a module working in place does not change what the hook sees."""
        inputs = _as_tuple(input)
        if not (isinstance(inputs[0], torch.Tensor) and inputs[0].requires_grad):
            return input
        hook_ref = weakref.ref(self)

        def run_backward(grad_input, grad_output):
            hook = hook_ref()
            if hook is None or not hook.active:
                return None
            return hook.backward(module, grad_input, hook.stored_tensors["grad_output"])

        gated = Identity.apply(*inputs)
        self.tensor_handles.append(gated[0].grad_fn.register_hook(run_backward))
        return _single(tuple(t.clone() for t in gated))

    def post_forward(self, module: nn.Module, input: Any, output: Any) -> Any:
        """Forward hook: attach :meth:`pre_backward` to the ``grad_fn`` of the (first) output."""
        outputs = _as_tuple(output)
        if outputs[0].grad_fn is not None:
            hook_ref = weakref.ref(self)

            def run_pre_backward(grad_input, grad_output):
                hook = hook_ref()
                if hook is None or not hook.active:
                    return None
                return hook.pre_backward(module, grad_input, grad_output)

            self.tensor_handles.append(outputs[0].grad_fn.register_hook(run_pre_backward))
        return _single(outputs)

    def pre_backward(self, module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
        """Keep ``grad_output`` for :meth:`backward`."""
        self.stored_tensors["grad_output"] = grad_output

    def forward(self, module: nn.Module, input: tuple, output: Any) -> Any:
        """Called after the module's forward; return a value to replace its output."""

    def backward(self, module: nn.Module, grad_input: tuple, grad_output: tuple) -> Any:
        """Called with the module's input gradient; return a tuple to replace it."""

    def copy(self) -> "Hook":
        """A new hook of the same type, made without arguments."""
        return self.__class__()

    def remove(self) -> None:
        """Forget every stored tensor and detach the backward from every graph built so far."""
        self.stored_tensors.clear()
        self.tensor_handles.remove()

    def register(self, module: nn.Module) -> RemovableHandleList:
        """Attach to ``module``; ``remove()`` of the returned list undoes it (and calls :meth:`remove`)."""
        return RemovableHandleList([
            RemovableHandle(self),
            module.register_forward_pre_hook(self.pre_forward),
            module.register_forward_hook(self.post_forward),
            module.register_forward_hook(self.forward),
        ])


def _identity(obj: Any, name: Any = None) -> Any:
    return obj


class BasicHook(Hook):
    """The generalised LRP rule (module docstring): ``K`` input, parameter and output modifiers, a
    gradient mapper and a reducer; the defaults give the epsilon rule.

    Modifier lists may be given partially (the others become ``K`` identities); parameter
    modifiers are callables ``(param, name) -> tensor`` or :class:`ParamMod`. ``stabilizer`` is
    used by the default gradient mapper ``g^k = R_out / stab(y^k)`` (Zennit 0.5.1 accepts the
    argument but always uses ``1e-6``; the default here is the same). ``fused``, when given, is
    ``(hook, module, grad_output) -> relevance or None`` and is tried before the generic path
    (not when the backward builds a graph, ``create_graph=True``); it is how the built-in rules
    use our kernels.

    One instance belongs to one module; composites register :meth:`copy` s, which share the
    modifiers, mapper and reducer (not new ones), as in Zennit.
    """

    _shared = ("input_modifiers", "param_modifiers", "output_modifiers", "gradient_mapper", "reducer",
               "stabilizer", "fused")

    def __init__(self, input_modifiers: Optional[Sequence[Callable]] = None,
                 param_modifiers: Optional[Sequence[Union[ParamMod, Modifier]]] = None,
                 output_modifiers: Optional[Sequence[Callable]] = None,
                 gradient_mapper: Optional[Callable] = None, reducer: Optional[Callable] = None,
                 stabilizer: Union[float, Callable] = 1e-6, fused: Optional[Callable] = None):
        super().__init__()
        given = [m for m in (input_modifiers, param_modifiers, output_modifiers) if m is not None]
        count = len(given[0]) if given else 1
        self.input_modifiers = input_modifiers if input_modifiers is not None else (_identity,) * count
        self.param_modifiers = param_modifiers if param_modifiers is not None else (_identity,) * count
        self.output_modifiers = output_modifiers if output_modifiers is not None else (_identity,) * count
        self.stabilizer = Stabilizer.ensure(stabilizer)
        self.gradient_mapper = gradient_mapper if gradient_mapper is not None else self._default_gradient_mapper
        self.reducer = reducer if reducer is not None else self._default_reducer
        self.fused = fused

    def forward(self, module: nn.Module, input: tuple, output: Any) -> None:
        """Keep the module's input for the backward."""
        self.stored_tensors["input"] = input

    def backward(self, module: nn.Module, grad_input: tuple, grad_output: tuple) -> tuple:
        """The rule's input relevance, in the places of ``grad_input`` with the input's shape."""
        relevance = None
        # the fused ops give no graph: only when the backward itself builds none (create_graph=False)
        if self.fused is not None and not (torch.is_grad_enabled() and grad_output[0].requires_grad):
            relevance = self.fused(self, module, grad_output[0])
        if relevance is None:
            relevance = self._generic(module, grad_output[0])
        return tuple(relevance if g is not None and g.shape == relevance.shape else None for g in grad_input)

    def _generic(self, module: nn.Module, grad_output: torch.Tensor) -> torch.Tensor:
        original = self.stored_tensors["input"][0].clone()
        inputs, outputs = [], []
        for in_mod, param_mod, out_mod in zip(self.input_modifiers, self.param_modifiers, self.output_modifiers):
            x = in_mod(original).requires_grad_()
            with ParamMod.ensure(param_mod)(module) as modified, torch.enable_grad():
                outputs.append(out_mod(modified.forward(x)))
            inputs.append(x)
        mapped = self.gradient_mapper(grad_output, outputs)
        mapped = (mapped,) if isinstance(mapped, torch.Tensor) else tuple(mapped)
        gradients = torch.autograd.grad(outputs, inputs, grad_outputs=mapped,
                                        create_graph=grad_output.requires_grad)
        return self.reducer(inputs, gradients)

    def copy(self) -> "BasicHook":
        """A new hook of the same type sharing this one's modifiers, mapper, reducer and stabiliser
        (the subclass's ``__init__`` is not called again)."""
        new = BasicHook.__new__(type(self))
        Hook.__init__(new)
        for key in self._shared:
            setattr(new, key, getattr(self, key))
        return new

    def _default_gradient_mapper(self, out_grad: torch.Tensor, outputs: Sequence[torch.Tensor]) -> tuple:
        return tuple(out_grad / self.stabilizer(output) for output in outputs)

    @staticmethod
    def _default_reducer(inputs: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
        return sum(x * g for x, g in zip(inputs, gradients))


# ----------------------------------------------------------------------------- composites

class CompositeContext:
    """``with composite.context(model) as model:`` — registers on entry, removes on exit."""

    def __init__(self, module: nn.Module, composite: "Composite"):
        self.module, self.composite = module, composite

    def __enter__(self) -> nn.Module:
        self.composite.register(self.module)
        return self.module

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        self.composite.remove()
        return False


class Composite:
    """Applies canonizers, then attaches a copy of a hook to every module ``module_map`` chooses.

    ``module_map(ctx, name, module) -> Hook or None`` is called for every ``(name, module)`` of
    ``model.named_modules()``, in order, with one ``ctx`` dict per registration (for choices
    that depend on what came before, e.g. the first layer). ``handles`` holds the hook handles
    and the applied canonizers; ``hook_refs`` the registered hooks (weakly). Our
    :class:`lrp_kernels.hooks.composites.HookComposite` maps ``(name, module)`` without a ``ctx``
    and has no canonizers (our rules need no canonical form for BatchNorm: use ``Pass`` there,
    or merge it first).
    """

    def __init__(self, module_map: Optional[Callable[[dict, str, nn.Module], Optional[Hook]]] = None,
                 canonizers: Optional[Sequence[Any]] = None):
        self.module_map = module_map if module_map is not None else self._empty_module_map
        self.canonizers = list(canonizers) if canonizers is not None else []
        self.handles = RemovableHandleList()
        self.hook_refs: "weakref.WeakSet[Hook]" = weakref.WeakSet()

    def register(self, module: nn.Module) -> None:
        """Remove what this composite registered before, apply the canonizers, attach the hooks."""
        self.remove()
        for canonizer in self.canonizers:
            self.handles += canonizer.apply(module)
        ctx: dict = {}
        for name, child in module.named_modules():
            template = self.module_map(ctx, name, child)
            if template is not None:
                hook = template.copy()
                self.hook_refs.add(hook)
                self.handles.append(hook.register(child))

    def remove(self) -> None:
        """Take every hook off and revert every canonizer."""
        self.handles.remove()
        self.hook_refs.clear()

    def context(self, module: nn.Module) -> CompositeContext:
        """A context manager registering this composite on ``module`` for the ``with`` block."""
        return CompositeContext(module, self)

    @contextmanager
    def inactive(self) -> Iterator["Composite"]:
        """Switch every registered hook off for the block (e.g. to differentiate a modified gradient)."""
        hooks = list(self.hook_refs)
        try:
            for hook in hooks:
                hook.active = False
            yield self
        finally:
            for hook in hooks:
                hook.active = True

    @staticmethod
    def _empty_module_map(ctx: dict, name: str, module: nn.Module) -> None:
        return None
