r"""Rules for whole modules ("super-functions"): LRP through any ``nn.Module`` by VJPs.

A rule wraps a module: the forward is the module's own, unchanged; the backward replaces the
gradient by the rule, computed with vector-Jacobian products (``torch.autograd.grad``) of the
module itself, so no operation inside it needs a drop-in. Relevance view by default::

    layer = EpsilonRule(block)
    y = layer(x.requires_grad_())
    y.backward(y)                 # R_y = y
    relevance = x.grad

Notation: ``y_k = f(x_1, ..., x_m)`` (outputs ``k``, tensor inputs ``i``), ``R_y`` the incoming
relevance, ``vjp(g)_i = sum_k J_ki^T g_k`` with ``J_ki = dy_k / dx_i``, ``stab`` the stabiliser
of docs/math.md, ``n`` the number of inputs that receive relevance. Only tensor inputs that require
grad receive relevance (the others are constants); non-tensor arguments and keyword arguments
pass through untouched.

=========================  =========================================  ===========================================
rule                       relevance view                             gradient view
=========================  =========================================  ===========================================
EpsilonRule                ``R_i = x_i * vjp(R_y / stab(y))_i``       ``G_i = vjp(G_y * y / stab(y))_i``
UniformEpsilonRule         ``R_i = x_i * vjp(R_y / (n stab(y)))_i``   ``G_i = vjp(G_y * y / (n stab(y)))_i``
UniformRule                ``R_i = R_y / n`` (summed to x_i's shape)  ``G_i = (G_y * y / n) / stab(x_i)``
IdentityRule               ``R_x = R_y`` (one input, same shape)      ``G_x = G_y * y / stab(x)``
StopRelevanceRule          ``R_i = 0`` (None)                         ``G_i = 0`` (None)
TaylorDecompositionRule    see the class                              see the class
=========================  =========================================  ===========================================

How the backward gets the module's Jacobian (one :class:`torch.autograd.Function`, the module
call passed in as a closure):

* ``recompute=False`` (default, "save the graph"): the forward runs the module once with grad
  enabled on detached copies of the inputs and keeps that small graph on the autograd context;
  the backward takes VJPs through it. One forward, no side effect repeated (KV caches,
  BatchNorm statistics, dropout masks stay as they were), the memory of a plain forward.
* ``recompute=True`` ("checkpoint-style"): the forward runs under ``no_grad`` and saves only the
  inputs; the backward re-runs the module with grad enabled (CPU/CUDA RNG and autocast state
  restored, so dropout draws the same mask) and takes the VJPs. Less memory, one more forward; the module
  must have no side effects (a KV cache would be appended twice).

Both are safe under ``torch.utils.checkpoint(..., use_reentrant=False)`` (tested), both store
nothing on the module, so a module called several times in one forward is handled per call.
A wrapped ``nn.Linear`` called with one tensor under :class:`EpsilonRule` routes to the fused
:func:`lrp_kernels.ops.linear_epsilon.linear_epsilon` (same math, dispatch picks the backend).

Inside :func:`lrp_kernels.tools.check.conservation` every rule application is recorded (relevance in
and out). Whether conservation is *expected*: always for the identity, uniform and
Taylor-without-bias rules; for the epsilon rules exactly when the module is bias-free at this
input, i.e. positively homogeneous, ``J(x) x == f(x)`` (Euler; one JVP, computed only while
checking). Don't nest rules by hand: the VJP of a wrapped module would run through the inner
rules' modified backward (the Composite never visits the inside of a wrapped module).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..ops import linear_epsilon as _lin
from ..ops._common import (DEFAULT_EPSILON, check_epsilon, compute_dtype, record, recording,
                           recording_suspended, stabilize, zero_masked)
from ..ops.linear_epsilon import epsilon_scale

__all__ = ["Rule", "EpsilonRule", "UniformRule", "UniformEpsilonRule", "IdentityRule",
           "StopRelevanceRule", "TaylorDecompositionRule"]


class Rule(nn.Module):
    """Base class: holds ``module``, forwards to it unchanged, backward is :meth:`propagate`.

    Subclasses implement ``propagate(inputs, outputs, grad_outputs, vjp)`` returning one
    tensor (or None) per entry of ``inputs`` -- the inputs that receive relevance -- and may
    override ``validate(inputs, outputs)`` to reject calls they cannot handle (raised in the
    forward, where the traceback points at the model code).
    """

    #: what the conservation check should expect of this rule (sum in == sum out?)
    conserves = True

    def __init__(self, module: nn.Module, *, relevance: bool = True, recompute: bool = False) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"{type(self).__name__} wraps an nn.Module, got {type(module).__name__}")
        super().__init__()
        self.module = module
        self.relevance, self.recompute = bool(relevance), bool(recompute)

    def __getattr__(self, name: str):
        # Code written for the wrapped module reads its attributes (weight, config, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "module" in modules and name != "module":
                return getattr(modules["module"], name)
            raise

    def forward(self, *args, **kwargs):
        return _apply(self, args, kwargs)

    def validate(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        """Raise a clear error if this rule cannot propagate through this call."""

    def expects_conservation(self, inputs, outputs, vjp) -> bool:
        """Whether docs/math.md promises ``sum(R_in) == sum(R_out)`` for this call (the check mode's
        ``expected``; evaluated only while a check is active)."""
        return self.conserves

    def propagate(self, inputs, outputs, grad_outputs, vjp):  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        view = "relevance" if self.relevance else "gradient"
        return f"view={view}" + (", recompute=True" if self.recompute else "")


# ---- the one autograd Function -------------------------------------------------------------

def _apply(rule: Rule, args: tuple, kwargs: dict):
    leaves, spec = tree_flatten((args, kwargs))
    t_idx = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    tensors = [leaves[i] for i in t_idx]
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return rule.module(*args, **kwargs)  # nothing to propagate: the plain call
    box: dict = {}  # per call: the output structure (nothing is stored on the module)
    outs = _RuleFn.apply(rule, leaves, spec, t_idx, box, *tensors)
    out_leaves, out_spec, o_idx = box.pop("out")
    out_leaves = list(out_leaves)
    for i, t in zip(o_idx, outs):
        out_leaves[i] = t
    return tree_unflatten(out_leaves, out_spec)


def _call(rule: Rule, leaves: list, spec, t_idx: list, tensors: Sequence[torch.Tensor]):
    leaves = list(leaves)
    for i, t in zip(t_idx, tensors):
        leaves[i] = t
    args, kwargs = tree_unflatten(leaves, spec)
    return rule.module(*args, **kwargs)


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _track(tensors: Sequence[torch.Tensor], needs: Sequence[bool]) -> list[torch.Tensor]:
    return [t.detach().requires_grad_(n) for t, n in zip(tensors, needs)]


class _RuleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rule, leaves, spec, t_idx, box, *tensors):
        needs = [n and _differentiable(t) for n, t in zip(ctx.needs_input_grad[5:], tensors)]
        # the tensors travel only as Function inputs (saved tensors go through checkpoint hooks)
        holes = set(t_idx)
        ctx.leaves = [None if i in holes else leaf for i, leaf in enumerate(leaves)]
        ctx.rule, ctx.spec, ctx.t_idx, ctx.needs = rule, spec, t_idx, needs
        if rule.recompute:
            ctx.rng = _rng_state(tensors)
            out = _call(rule, leaves, spec, t_idx, tensors)
            ctx.save_for_backward(*tensors)
            ctx.graph = None
        else:
            with torch.enable_grad():
                tracked = _track(tensors, needs)
                out = _call(rule, leaves, spec, t_idx, tracked)
        out_leaves, out_spec = tree_flatten(out)
        o_idx = [i for i, leaf in enumerate(out_leaves) if isinstance(leaf, torch.Tensor)]
        out_tensors = [out_leaves[i] for i in o_idx]
        if not out_tensors:
            raise TypeError(f"{type(rule).__name__}: {type(rule.module).__name__} returned no tensor")
        receivers = [t for t, n in zip(tracked if not rule.recompute else tensors, needs) if n]
        rule.validate(receivers, [o for o in out_tensors if _differentiable(o)])
        if not rule.recompute:
            ctx.graph = (tracked, out_tensors)
        box["out"] = ([None if isinstance(x, torch.Tensor) else x for x in out_leaves], out_spec, o_idx)
        results = tuple(o.detach() for o in out_tensors)
        ctx.mark_non_differentiable(*(r for r in results if not _differentiable(r)))
        return results

    @staticmethod
    def backward(ctx, *grad_outputs):
        rule = ctx.rule
        if ctx.graph is None:  # recompute: re-run the module with grad, same RNG draws
            with torch.enable_grad(), _restore_rng(ctx.rng):
                tracked = _track(ctx.saved_tensors, ctx.needs)
                out = _call(rule, ctx.leaves, ctx.spec, ctx.t_idx, tracked)
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        else:
            tracked, outs = ctx.graph
        receivers = [t for t, n in zip(tracked, ctx.needs) if n]
        pairs = [(o, g) for o, g in zip(outs, grad_outputs)
                 if _differentiable(o) and o.requires_grad and g is not None]
        if not receivers or not pairs:
            return (None,) * (5 + len(tracked))
        ys = [o for o, _ in pairs]
        gys = [g for _, g in pairs]

        def vjp(vectors: Sequence[torch.Tensor], create_graph: bool = False):
            got = torch.autograd.grad(ys, receivers, [v.to(y.dtype) for v, y in zip(vectors, ys)],
                                      retain_graph=True, allow_unused=True, create_graph=create_graph)
            return [torch.zeros_like(x) if g is None else g for g, x in zip(got, receivers)]

        with torch.enable_grad(), recording_suspended():
            grads = rule.propagate(receivers, [y.detach() for y in ys], gys, vjp)
        grads = [None if g is None else g.to(x.dtype) for g, x in zip(grads, receivers)]
        if recording():
            xs, outs_d = [x.detach() for x in receivers], [y.detach() for y in ys]

            def expected() -> bool:
                with recording_suspended():
                    return rule.expects_conservation(xs, outs_d, vjp)

            record(_op_name(rule), xs, grads, outs_d, gys, rule.relevance, expected)
        it = iter(grads)
        return (None,) * 5 + tuple(next(it) if n else None for n in ctx.needs)


def _op_name(rule: Rule) -> str:
    return f"{type(rule).__name__}({type(rule.module).__name__})"


def _rng_state(tensors: Sequence[torch.Tensor]):
    """What a re-run needs to repeat the forward: RNG states (dropout) and the autocast state."""
    cuda = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
    dev = "cuda" if cuda else "cpu"
    autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in cuda], autocast


@contextlib.contextmanager
def _restore_rng(state):
    cpu, cuda, (dev, enabled, dtype) = state
    with torch.random.fork_rng(devices=[d for d, _ in cuda]), torch.autocast(dev, dtype=dtype, enabled=enabled):
        torch.set_rng_state(cpu)
        for d, s in cuda:
            torch.cuda.set_rng_state(s, d)
        yield


def _jvp(outputs, tangents, vjp):
    """``J(x) @ t`` per output by the double-VJP trick (``u(v) = J^T v`` is linear in ``v``)."""
    vs = [torch.zeros_like(y, requires_grad=True) for y in outputs]
    us = vjp(vs, create_graph=True)
    pairs = [(u, t.to(u.dtype)) for u, t in zip(us, tangents) if u.requires_grad]
    if not pairs:
        return [torch.zeros_like(y) for y in outputs]
    got = torch.autograd.grad([u for u, _ in pairs], vs, [t for _, t in pairs], allow_unused=True)
    return [torch.zeros_like(y) if g is None else g for g, y in zip(got, outputs)]


# ---- the rules -----------------------------------------------------------------------------

def _times(factor: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``factor * v`` with exactly 0 where ``x`` is masked (-inf or the dtype's minimum): masked
    logits carry no relevance, and ``-inf * 0`` must not become NaN (docs/math.md, masked logits)."""
    return zero_masked(factor * v, x) if x.is_floating_point() else factor * v


def _divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (only reachable with ``epsilon=0``): no NaN."""
    return torch.where(den == 0, torch.zeros((), dtype=num.dtype, device=num.device), num / den)


def _cd(*ts):
    return compute_dtype(*ts)


class _StabilisedRule(Rule):
    """A rule with a stabiliser ``epsilon`` (for the uniform and identity rules it only
    stabilises the gradient view's division by the input)."""

    def __init__(self, module: nn.Module, epsilon: float = DEFAULT_EPSILON, *, relevance: bool = True,
                 recompute: bool = False) -> None:
        check_epsilon(epsilon)
        super().__init__(module, relevance=relevance, recompute=recompute)
        self.epsilon = epsilon


class EpsilonRule(_StabilisedRule):
    """Epsilon-LRP for any module (AttnLRP Eq. 8 generalised by the VJP; docs/math.md, any module through VJPs)."""

    share_between_inputs = False

    def forward(self, *args, **kwargs):
        m = self.module
        if (type(m).forward is nn.Linear.forward and len(args) == 1 and not kwargs
                and isinstance(args[0], torch.Tensor) and not self.share_between_inputs):
            # the same rule, fused: one GEMM in the backward, backend chosen by dispatch
            return _lin.linear_epsilon(args[0], m.weight, m.bias, self.epsilon,
                                       relevance=self.relevance, recompute=self.recompute)
        return _apply(self, args, kwargs)

    def propagate(self, inputs, outputs, grad_outputs, vjp):
        n = len(inputs) if self.share_between_inputs else 1
        cd = _cd(*outputs, *inputs)
        got = vjp([epsilon_scale(g, y, self.epsilon, self.relevance, share=n).to(cd)
                   for y, g in zip(outputs, grad_outputs)])
        if not self.relevance:
            return got
        return [_times(x.to(cd), v.to(cd), x) for x, v in zip(inputs, got)]

    def expects_conservation(self, inputs, outputs, vjp) -> bool:
        """Conserving exactly when the module has no bias at this input: ``f`` is positively
        homogeneous there, ``J(x) x == f(x)`` (Euler), tested with one JVP. A module whose
        backward is not twice differentiable is reported as not expected to conserve."""
        try:
            with torch.enable_grad():
                lin = _jvp(outputs, inputs, vjp)
        except RuntimeError:
            return False
        for y, j in zip(outputs, lin):
            scale = y.detach().abs().max().clamp_min(1e-30).item()
            if not torch.allclose(j.double(), y.double(), rtol=1e-4, atol=1e-5 * scale):
                return False
        return True

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, {super().extra_repr()}"


class UniformEpsilonRule(EpsilonRule):
    """Epsilon rule with the relevance split evenly: ``R_y / (n stab(y))`` (AttnLRP Prop. 3.3)."""

    share_between_inputs = True


def _broadcasts_to(shape, target) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _check_reducible(rule: Rule, inputs, outputs) -> None:
    if len(outputs) != 1:
        raise ValueError(f"{type(rule).__name__} needs a module with exactly one floating-point output, "
                         f"got {len(outputs)}")
    y = outputs[0]
    for i, x in enumerate(inputs):
        if not _broadcasts_to(x.shape, y.shape):
            raise ValueError(f"{type(rule).__name__}: input {i} of shape {tuple(x.shape)} does not broadcast "
                             f"to the output shape {tuple(y.shape)}; this rule hands the output relevance "
                             f"to the inputs element-wise (use EpsilonRule for shape-changing modules)")


class UniformRule(_StabilisedRule):
    """The output relevance split evenly over the ``n`` inputs that receive relevance
    (AttnLRP Prop. 3.2 for products): ``R_i = R_y / n``, summed over broadcast dims."""

    def validate(self, inputs, outputs):
        _check_reducible(self, inputs, outputs)

    def propagate(self, inputs, outputs, grad_outputs, vjp):
        (y,), (g,) = outputs, grad_outputs
        n = len(inputs)
        cd = _cd(y, *inputs)
        r = g.to(cd) / n if self.relevance else g.to(cd) * y.to(cd) / n
        out = [r.sum_to_size(x.shape) for x in inputs]
        if self.relevance:
            return out
        return [o / stabilize(x, self.epsilon) for o, x in zip(out, inputs)]


class IdentityRule(_StabilisedRule):
    """The relevance passes unchanged: ``R_x = R_y`` (AttnLRP Eq. 9; element-wise activations,
    normalisations). Needs one input receiving relevance whose shape broadcasts to the output's."""

    def validate(self, inputs, outputs):
        if len(inputs) != 1:
            raise ValueError(f"IdentityRule needs exactly one input that receives relevance, got {len(inputs)} "
                             f"for {type(self.module).__name__} (UniformRule splits between several)")
        _check_reducible(self, inputs, outputs)

    def propagate(self, inputs, outputs, grad_outputs, vjp):
        (x,), (y,), (g,) = inputs, outputs, grad_outputs
        if self.relevance:
            return [g.sum_to_size(x.shape)]
        cd = _cd(y, x)
        return [(g.to(cd) * y.to(cd)).sum_to_size(x.shape) / stabilize(x, self.epsilon)]


class StopRelevanceRule(Rule):
    """No relevance (and no gradient) reaches the inputs: ``R_i = 0``."""

    conserves = False

    def forward(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        leaves = [leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        args, kwargs = tree_unflatten(leaves, spec)
        return self.module(*args, **kwargs)

    def propagate(self, inputs, outputs, grad_outputs, vjp):  # pragma: no cover - never reached
        return [None for _ in inputs]


Reference = Union[None, torch.Tensor, Sequence[torch.Tensor], Callable[..., object]]


class TaylorDecompositionRule(Rule):
    r"""First-order Taylor decomposition of the module at its input (Deep Taylor; AttnLRP Prop. 3.1).

    Linearise ``f`` at the input ``x`` and expand towards a reference point ``r`` (default 0)::

        y_k = sum_i J_ki(x) (x_i - r_i)  +  b_k,     b_k = y_k - sum_i J_ki(x) (x_i - r_i)

    and hand each output's relevance to the terms in proportion to their contribution::

        R_i = (x_i - r_i) * vjp(R_y / D)_i,     vjp evaluated at x

    * ``bias=True``:  ``D = stab(y)``. The bias term ``b`` keeps its share, so relevance is
      absorbed (not conservative). With ``r = 0`` on a softmax this is exactly the softmax
      rule (docs/math.md) ``R_x = x * (R_s - s * sum(R_s))``; on a linear layer it is the epsilon rule.
    * ``bias=False``: ``D = stab(sum_i J_ki(x) (x_i - r_i))`` (a Jacobian-vector product): the
      bias is dropped and the relevance is conserved, ``sum_i R_i = sum_k R_y_k`` (eps -> 0).
      Needs a twice-differentiable module (the JVP is a double VJP).

    ``reference``: None (zeros), a tensor (one input receiving relevance), a sequence (one per
    input receiving relevance), or a callable taking those inputs and returning either.
    Gradient view: ``G_i = vjp(G_y * y / D)_i * (x_i - r_i) / stab(x_i)`` (no division by ``x``
    when ``r = 0``).
    """

    def __init__(self, module: nn.Module, bias: bool = True, reference: Reference = None,
                 epsilon: float = DEFAULT_EPSILON, *, relevance: bool = True, recompute: bool = False) -> None:
        check_epsilon(epsilon)
        super().__init__(module, relevance=relevance, recompute=recompute)
        self.bias, self.reference, self.epsilon = bool(bias), reference, epsilon
        self.conserves = not self.bias

    def _references(self, inputs) -> Optional[list]:
        ref = self.reference
        if ref is None:
            return None
        if callable(ref) and not isinstance(ref, torch.Tensor):
            ref = ref(*inputs)
        refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        if len(refs) != len(inputs):
            raise ValueError(f"TaylorDecompositionRule: reference gives {len(refs)} tensor(s) for "
                             f"{len(inputs)} input(s) receiving relevance")
        for i, (r, x) in enumerate(zip(refs, inputs)):
            if not (isinstance(r, torch.Tensor) and _broadcasts_to(r.shape, x.shape)):
                raise ValueError(f"TaylorDecompositionRule: reference {i} must be a tensor broadcastable to "
                                 f"the input shape {tuple(x.shape)}, got {getattr(r, 'shape', type(r))}")
        return refs

    def validate(self, inputs, outputs):
        self._references(inputs)

    def propagate(self, inputs, outputs, grad_outputs, vjp):
        cd = _cd(*outputs, *inputs)
        refs = self._references(inputs)
        deltas = [x.to(cd) if refs is None else x.to(cd) - r.to(device=x.device, dtype=cd)
                  for x, r in zip(inputs, refs or inputs)]
        if self.bias:
            denoms = [stabilize(y, self.epsilon).to(cd) for y in outputs]
        else:
            denoms = [stabilize(lin, self.epsilon).to(cd) for lin in _jvp(outputs, deltas, vjp)]
        vecs = []
        for y, g, dn in zip(outputs, grad_outputs, denoms):
            v = _divide(g.to(cd), dn)
            vecs.append(v if self.relevance else v * y.to(cd))
        got = [v.to(cd) for v in vjp(vecs)]
        if self.relevance:
            return [_times(dl, v, x) for dl, v, x in zip(deltas, got, inputs)]
        if refs is None:
            return got
        return [v * dl / stabilize(x, self.epsilon) for v, dl, x in zip(got, deltas, inputs)]

    def extra_repr(self) -> str:
        return f"bias={self.bias}, epsilon={self.epsilon}, {super().extra_repr()}"
