"""Zennit's attributors: one object that runs the model and returns ``(output, attribution)``.

    with Gradient(model, composite) as attributor:
        output, relevance = attributor(input, attr_output)

``attr_output`` says where the attribution starts at the output: a tensor of the output's shape
(e.g. a one-hot target), or a function of the output (``identity``, the default, starts from
the output itself). Given at construction it is the default; given at the call it wins.

With a composite (Zennit's :class:`~lrp_kernels.compat.zennit.core.Composite` or one of ours,
:mod:`lrp_kernels.hooks.composites`: anything with ``context(model)``), the gradient is the
modified one, so :class:`Gradient` is LRP. The composite is registered for the ``with`` block,
or for a single call when the attributor is used without ``with`` (unless it is registered
already). :class:`SmoothGrad` and :class:`IntegratedGradients` average that gradient over noisy
inputs or along a path; :class:`Occlusion` uses the model's outputs only.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from functools import partial
from itertools import product
from typing import Any, Callable, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["constant", "identity", "occlude_independent", "Attributor", "Gradient", "SmoothGrad",
           "IntegratedGradients", "Occlusion"]

AttrOutput = Union[None, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def constant(obj: Any) -> Callable[..., Any]:
    """A function that takes any arguments and returns ``obj``."""
    def constant_fn(*args, **kwargs):
        return obj
    return constant_fn


def identity(obj: Any) -> Any:
    """``obj`` itself (the default ``attr_output``: start from the whole output)."""
    return obj


def occlude_independent(input: torch.Tensor, mask: torch.Tensor,
                        fill_fn: Callable[[torch.Tensor], torch.Tensor] = torch.zeros_like,
                        invert: bool = False) -> torch.Tensor:
    """``input`` where ``mask`` is True and ``fill_fn(input)`` elsewhere (the reverse with
    ``invert=True``): with the defaults, everything outside the mask is set to zero."""
    keep = ~mask if invert else mask
    return torch.where(keep, input, fill_fn(input))


def _as_output_fn(attr_output: AttrOutput) -> Callable[[torch.Tensor], torch.Tensor]:
    if attr_output is None:
        return identity
    if callable(attr_output):
        return attr_output
    return constant(attr_output)


class Attributor(ABC):
    """Base of the attributors: keeps ``model``, the optional ``composite`` and the default
    ``attr_output`` (``None``: :func:`identity`); subclasses implement :meth:`forward`.

    ``with attributor:`` registers the composite on the model for the block; calling an
    attributor outside of ``with`` registers it for that call only, unless it is registered
    already (by ``with`` or by the user).
    """

    def __init__(self, model: nn.Module, composite=None, attr_output: AttrOutput = None):
        self.model = model
        self.composite = composite
        self.attr_output_fn = _as_output_fn(attr_output)
        self._registration: Optional[contextlib.ExitStack] = None

    def __enter__(self) -> "Attributor":
        if self.composite is not None and self._registration is None:
            self._registration = contextlib.ExitStack()
            self._registration.enter_context(self.composite.context(self.model))
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        if self._registration is not None:
            registration, self._registration = self._registration, None
            registration.close()
        return False

    def _composite_registered(self) -> bool:
        # ``handles`` is where both Zennit's composites and ours keep what they registered
        return self._registration is not None or bool(getattr(self.composite, "handles", None))

    def __call__(self, input: torch.Tensor, attr_output: AttrOutput = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(output, attribution)`` of the model at ``input``; the attribution has ``input``'s
        shape. ``attr_output`` (a tensor or a function of the output) overrides the default."""
        attr_output_fn = self.attr_output_fn if attr_output is None else _as_output_fn(attr_output)
        if self.composite is None or self._composite_registered():
            return self.forward(input, attr_output_fn)
        with self:
            return self.forward(input, attr_output_fn)

    @property
    def inactive(self):
        """The composite's ``inactive`` context manager (the plain gradient inside it)."""
        if self.composite is None or not hasattr(self.composite, "inactive"):
            raise AttributeError(f"{type(self.composite).__name__} has no inactive(); "
                                 "Zennit's compat Composite has it")
        return self.composite.inactive

    @abstractmethod
    def forward(self, input: torch.Tensor,
                attr_output_fn: Callable[[torch.Tensor], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(output, attribution)`` with the composite as it is (registered or not)."""


class Gradient(Attributor):
    """The (modified) gradient: ``attr_output`` times the Jacobian of the model, i.e. LRP with
    an LRP composite. ``create_graph=True`` keeps the graph for higher-order gradients;
    ``retain_graph`` defaults to ``create_graph`` (as in ``torch.autograd.grad``)."""

    def __init__(self, model: nn.Module, composite=None, attr_output: AttrOutput = None,
                 create_graph: bool = False, retain_graph: Optional[bool] = None):
        super().__init__(model=model, composite=composite, attr_output=attr_output)
        self.create_graph = create_graph
        self.retain_graph = retain_graph

    def grad(self, input: torch.Tensor,
             attr_output_fn: Callable[[torch.Tensor], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(output, gradient)`` of the model at ``input``, seeded by ``attr_output_fn(output)``.
        Sets ``input.requires_grad`` when it is not set (callers pass a view or a new tensor)."""
        if not input.requires_grad:
            input.requires_grad_(True)
        output = self.model(input)
        gradient, = torch.autograd.grad(output, input, grad_outputs=attr_output_fn(output),
                                        create_graph=self.create_graph, retain_graph=self.retain_graph)
        return output, gradient

    def forward(self, input, attr_output_fn):
        # a view: the gradient is taken w.r.t. it, so the caller's tensor is left as it is
        return self.grad(input.view_as(input), attr_output_fn)


class SmoothGrad(Gradient):
    """SmoothGrad (Smilkov et al., 2017): the mean gradient over ``n_iter`` copies of the input
    with Gaussian noise of standard deviation ``noise_level * (max - min)`` of each sample.

    The last copy has no noise, so the returned output is the model's output at the input and
    ``n_iter=1`` is the plain gradient.
    """

    def __init__(self, model: nn.Module, composite=None, attr_output: AttrOutput = None,
                 create_graph: bool = False, retain_graph: Optional[bool] = None,
                 noise_level: float = 0.1, n_iter: int = 20):
        super().__init__(model=model, composite=composite, attr_output=attr_output,
                         create_graph=create_graph, retain_graph=retain_graph)
        self.noise_level = noise_level
        self.n_iter = n_iter

    def forward(self, input, attr_output_fn):
        sample_dims = tuple(range(1, input.ndim))
        std = self.noise_level * (input.amax(sample_dims, keepdim=True) - input.amin(sample_dims, keepdim=True))
        total = torch.zeros_like(input)
        for step in range(self.n_iter):
            noise = torch.zeros_like(input) if step == self.n_iter - 1 else torch.randn_like(input) * std
            output, gradient = self.grad(input + noise, attr_output_fn)
            total = total + gradient / self.n_iter
        return output, total


class IntegratedGradients(Gradient):
    """Integrated Gradients (Sundararajan et al., 2017): ``(input - baseline)`` times the mean
    gradient at ``n_iter`` points of the straight path from ``baseline_fn(input)`` (default:
    zeros) to the input, at ``k / n_iter`` for ``k = 1 .. n_iter`` (the right Riemann sum, so
    the last point is the input and its output is returned)."""

    def __init__(self, model: nn.Module, composite=None, attr_output: AttrOutput = None,
                 create_graph: bool = False, retain_graph: Optional[bool] = None,
                 baseline_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, n_iter: int = 20):
        super().__init__(model=model, composite=composite, attr_output=attr_output,
                         create_graph=create_graph, retain_graph=retain_graph)
        self.baseline_fn = torch.zeros_like if baseline_fn is None else baseline_fn
        self.n_iter = n_iter

    def forward(self, input, attr_output_fn):
        baseline = self.baseline_fn(input)
        total = torch.zeros_like(input)
        for alpha in torch.linspace(1.0 / self.n_iter, 1.0, self.n_iter).tolist():
            output, gradient = self.grad(baseline + alpha * (input - baseline), attr_output_fn)
            total = total + gradient / self.n_iter
        return output, total * (input - baseline)


def _int_or_ints(value: Any) -> bool:
    return isinstance(value, int) or (isinstance(value, tuple) and all(isinstance(v, int) for v in value))


class Occlusion(Attributor):
    """Occlusion: slide a window over the input; each position's score (the sum of
    ``attr_output_fn(output)`` per sample, from ``occlusion_fn(input, mask)``) is added to the
    window's elements. The composite, if any, changes nothing here (no gradient is taken).

    ``occlusion_fn(input, mask)`` gets the window as ``mask``; the default,
    :func:`occlude_independent`, keeps the window and zeroes the rest.
    ``window`` / ``stride``: an int for every axis but the batch axis (capped at its size), or a
    tuple for the last ``len(tuple)`` axes; the axes in front are covered whole in one step.
    As in Zennit, the window is rolled over the input, so a window that runs over the end of an
    axis wraps around to its start.
    """

    def __init__(self, model: nn.Module, composite=None, attr_output: AttrOutput = None,
                 occlusion_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                 window: Union[int, Tuple[int, ...]] = 8, stride: Union[int, Tuple[int, ...]] = 8):
        super().__init__(model=model, composite=composite, attr_output=attr_output)
        for name, value in (("window", window), ("stride", stride)):
            if not _int_or_ints(value):
                raise TypeError(f"Occlusion {name} must be an int or a tuple of ints, got {value!r}")
        if occlusion_fn is None:
            occlusion_fn = partial(occlude_independent, fill_fn=torch.zeros_like, invert=False)
        self.occlusion_fn = occlusion_fn
        self.window = window
        self.stride = stride

    def _window_and_stride(self, shape: torch.Size) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """Window and stride for every axis of an input of ``shape``."""
        window, stride = self.window, self.stride
        if isinstance(window, int):
            window = tuple(min(window, size) for size in shape[1:])
        if isinstance(stride, int):
            stride = tuple(min(stride, size) for size in shape[1:])
        window = tuple(shape[:len(shape) - len(window)]) + tuple(window)
        # leading axes step by their (whole-axis) window: one position there
        stride = window[:len(window) - len(stride)] + tuple(stride)
        return window, stride

    def forward(self, input, attr_output_fn):
        window, stride = self._window_and_stride(input.shape)
        first_window = torch.zeros_like(input, dtype=torch.bool)
        first_window[tuple(slice(0, size) for size in window)] = True
        per_sample = (slice(None),) + (None,) * (input.ndim - 1)
        axes = tuple(range(input.ndim))

        attribution = torch.zeros_like(input)
        for offset in product(*(range(0, size, step) for size, step in zip(input.shape, stride))):
            mask = first_window.roll(offset, axes)
            with torch.no_grad():
                output = self.model(self.occlusion_fn(input, mask))
            score = attr_output_fn(output).sum(tuple(range(1, output.ndim)))
            attribution = attribution + mask * score[per_sample]
        return self.model(input), attribution
