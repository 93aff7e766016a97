"""The Composite: attach LRP rules to any PyTorch model on the fly, and take them off again.

::

    lrp = Composite({nn.Linear: rules.EpsilonRule, RMSNorm: rules.IdentityRule})
    lrp.register(model, verbose=True)          # wraps modules in place, freezes parameters
    y = model(x.requires_grad_())
    y.backward(y)                              # relevance view: x.grad is the relevance
    lrp.remove()                               # the original module objects, exactly

Keys and values of the mapping:

* an ``nn.Module`` subclass -> a rule class (:mod:`lrp_kernels.explicit.rules`; the module is wrapped),
  a drop-in module class (:mod:`lrp_kernels.ops.modules`; the module is *replaced* by one sharing
  its Parameters and computing the same forward), or any callable ``module -> nn.Module``
  (``functools.partial(rules.EpsilonRule, epsilon=1e-3)``). Subclasses match too (the most
  specific key wins); modules that already are LRP rules / drop-ins are left alone, and the
  inside of a wrapped module is not visited (its rule covers it).
* a function, operator or method (``operator.add``, ``torch.matmul``, ``F.softmax``,
  ``torch.Tensor.add``, or a method name such as ``"exp"`` for ``x.exp()``) -> the drop-in that
  replaces it (``lrp_kernels.ops.functional``); a method is called as ``fn(self, *args)``.
  Needs ``dummy_inputs``: the model is traced with torch.fx (:mod:`lrp_kernels.explicit.fx`) and every
  spelling of the op is rewritten (``a + b``, ``torch.add``, ``a.add(b)``, ...).

Two paths:

* **module path** (no ``dummy_inputs``): modules are swapped in place on the model;
  :meth:`remove` puts the very same original objects back where they were (shared modules at
  every place) and restores the ``requires_grad`` flags it found. Usable as a context manager.
  While registered, a wrapped module's ``state_dict`` keys gain ``.module`` (drop-in
  replacements keep the original keys). Operations written as plain code in ``forward``
  (``a + b``, ``torch.matmul``) keep their plain gradient on this path: use module wrappers,
  explicit drop-ins, or the traced path for them.
* **traced path** (``dummy_inputs`` given): :meth:`register` returns a new
  ``torch.fx.GraphModule``; the original model is not modified (only its parameters are
  frozen, they are shared). Every operation on the relevance path must be handled or
  harmless, else an error (``strict=True``, the default) or a warning (``strict=False``): a
  silently wrong relevance is the worst outcome. :meth:`remove` restores the flags and returns
  the untouched original; the traced module stays a working LRP model, simply stop using it.
  The traced path runs the model once on the dummy inputs (to know which nodes carry relevance).
  Gradient checkpointing and models that do not trace (Hugging Face transformers >= 5) need
  the module path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from . import fx as _fx
from ..ops import modules as _m
from . import rules as _rules


@dataclass
class Entry:
    """One module the Composite looked at."""

    path: str
    type_name: str
    action: str       # "wrapped" | "replaced" | "left alone" | "shared"
    new: str = ""


class Composite:
    """Maps module types and functions to LRP rules; see the module docstring.

    Args:
        layer_map: ``{module type or function: rule class, drop-in, or factory}``.
        freeze: set ``requires_grad=False`` on every parameter while registered (restored by
            :meth:`remove`), so the backward computes only the input relevance.
        strict: traced path only: an operation with no rule on the relevance path is an error
            (``True``) or a warning (``False``).
        verbose: print a progress bar and the table of what was done (also per :meth:`register`).

    After :meth:`register`: ``entries`` lists each module looked at (wrapped / replaced / shared
    / left alone), ``operations`` each traced operation with its status, :meth:`table` both.
    """

    def __init__(self, layer_map: Mapping[Any, Any], *, freeze: bool = True, strict: bool = True,
                 verbose: bool = False) -> None:
        if not isinstance(layer_map, Mapping) or not layer_map:
            raise TypeError("layer_map must be a non-empty dict {module type or function: rule, drop-in or factory}")
        self.module_map: dict[type, Any] = {}
        self.function_map: dict[Any, Callable] = {}
        for key, value in layer_map.items():
            if not callable(value):
                raise TypeError(f"the value for {key!r} must be a rule class, a module class or a callable, "
                                f"got {type(value).__name__}")
            if isinstance(key, type) and issubclass(key, nn.Module):
                self.module_map[key] = value
            elif callable(key) or isinstance(key, str):  # a function, operator, or a method name
                self.function_map[key] = value
            else:
                raise TypeError(f"layer_map keys are nn.Module subclasses or functions/operators, got {key!r}")
        self.freeze, self.strict, self.verbose = freeze, strict, verbose
        self.entries: list[Entry] = []
        self.operations: list[_fx.Row] = []
        self._swaps: list[tuple[nn.Module, str, nn.Module]] = []   # (parent, name, original)
        self._flags: list[tuple[nn.Parameter, bool]] = []
        self._model: Optional[nn.Module] = None
        self._traced = False

    # ---- public --------------------------------------------------------------------------------

    @property
    def registered(self) -> bool:
        return self._model is not None

    def register(self, model: nn.Module, dummy_inputs: Optional[Mapping[str, Any]] = None, *,
                 verbose: Optional[bool] = None, strict: Optional[bool] = None) -> nn.Module:
        """Attach the rules; returns the model to use (the same object unless traced or the
        root itself was wrapped)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if self.registered:
            raise RuntimeError("this Composite is already registered on a model; call remove() first")
        verbose = self.verbose if verbose is None else verbose
        strict = self.strict if strict is None else strict
        if self.function_map and dummy_inputs is None:
            keys = ", ".join(getattr(k, "__name__", str(k)) for k in self.function_map)
            raise ValueError(f"functions in the layer map ({keys}) are replaced by tracing the model: "
                             f"pass dummy_inputs={{forward argument name: example value}}")
        self.entries, self.operations = [], []
        if dummy_inputs is None:
            out = self._register_modules(model, verbose)
        else:
            out = self._register_traced(model, dummy_inputs, verbose, strict)
        self._model = model
        if self.freeze:
            seen = set()
            for p in model.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    self._flags.append((p, p.requires_grad))
                    p.requires_grad_(False)
        if verbose:
            print(self.table())
        return out

    def remove(self) -> nn.Module:
        """Undo :meth:`register`: the original module objects and ``requires_grad`` flags.
        Returns the original model (for the traced path: the untouched model that was traced)."""
        if not self.registered:
            raise RuntimeError("nothing to remove: this Composite is not registered on a model")
        for parent, name, original in reversed(self._swaps):
            setattr(parent, name, original)
        for p, flag in self._flags:
            p.requires_grad_(flag)
        model = self._model
        self._swaps, self._flags, self._model, self._traced = [], [], None, False
        return model

    def __enter__(self) -> "Composite":
        return self

    def __exit__(self, *exc) -> None:
        if self.registered:
            self.remove()

    def table(self) -> str:
        """What :meth:`register` did: modules by type and action; operations for the traced path."""
        from collections import Counter
        counts = Counter((e.action, e.type_name, e.new) for e in self.entries)
        order = {"wrapped": 0, "replaced": 1, "shared": 2, "left alone": 3}
        items = sorted(counts.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1]))
        w = max([len("module type")] + [len(k[1]) for k, _ in items])
        lines = [f"{'action':<10}  {'module type':<{w}}  {'count':>5}  by",
                 "-" * (w + 34)]
        for (action, type_name, new), n in items:
            by = new or ("plain gradient" if action == "left alone" else "")
            lines.append(f"{action:<10}  {type_name:<{w}}  {n:>5}  {by}")
        if self.operations:
            lines += ["", _fx.table(self.operations)]
        return "\n".join(lines)

    # ---- module path ---------------------------------------------------------------------------

    def _factory(self, module: nn.Module):
        if isinstance(module, _rules.Rule) or type(module).__module__.startswith("lrp_kernels"):
            return None  # already LRP
        for cls in type(module).__mro__:
            if cls in self.module_map:
                return self.module_map[cls]
        return None

    def _build(self, module: nn.Module, path: str) -> tuple[nn.Module, str]:
        factory = self._factory(module)
        if isinstance(factory, type) and issubclass(factory, _rules.Rule):
            new, action = factory(module), "wrapped"
        elif isinstance(factory, type) and issubclass(factory, nn.Module):
            new, action = convert(module, factory), "replaced"
        else:
            new = factory(module)
            action = "wrapped" if isinstance(new, _rules.Rule) else "replaced"
        if not isinstance(new, nn.Module):
            raise TypeError(f"the factory for {type(module).__name__} (at {path or 'the root'}) returned "
                            f"{type(new).__name__}, expected an nn.Module")
        return new, action

    def _register_modules(self, model: nn.Module, verbose: bool) -> nn.Module:
        from tqdm.auto import tqdm
        todo = sum(1 for _ in model.modules())
        memo: dict[int, nn.Module] = {}
        with tqdm(total=todo, desc="Composite", disable=not verbose, leave=False) as bar:
            if self._factory(model) is not None:
                new, action = self._build(model, "")
                self.entries.append(Entry("", type(model).__name__, action, type(new).__name__))
                bar.update(todo)
                return new
            try:
                self._visit(model, "", memo, bar)
            except Exception:
                for parent, name, original in reversed(self._swaps):  # leave nothing half-done
                    setattr(parent, name, original)
                self._swaps = []
                raise
        return model

    def _visit(self, parent: nn.Module, prefix: str, memo: dict, bar) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            bar.update(1)
            if id(child) in memo:  # the same module at a second place: the same wrapper
                setattr(parent, name, memo[id(child)])
                self._swaps.append((parent, name, child))
                self.entries.append(Entry(path, type(child).__name__, "shared", type(memo[id(child)]).__name__))
                continue
            if self._factory(child) is not None:
                new, action = self._build(child, path)
                memo[id(child)] = new
                setattr(parent, name, new)
                self._swaps.append((parent, name, child))
                self.entries.append(Entry(path, type(child).__name__, action, type(new).__name__))
                bar.update(sum(1 for _ in child.modules()) - 1)
            elif not child._modules:
                self.entries.append(Entry(path, type(child).__name__, "left alone"))
            else:
                self._visit(child, path, memo, bar)

    # ---- traced path ---------------------------------------------------------------------------

    def _register_traced(self, model: nn.Module, dummy_inputs: Mapping[str, Any], verbose: bool,
                         strict: bool) -> nn.Module:
        gm = _fx.trace(model, dummy_inputs, tuple(self.module_map))
        info = _fx.annotate(gm, dummy_inputs)
        memo: dict[int, nn.Module] = {}
        pending: list[tuple[str, nn.Module]] = []

        def decide(path: str, module: nn.Module) -> Optional[str]:
            if self._factory(module) is None:
                return None
            pending.append((path, module))
            factory = self._factory(module)
            return getattr(factory, "__name__", type(factory).__name__)

        self.operations = _fx.rewrite(gm, info, self.function_map, decide)
        _fx.check_unhandled(self.operations, strict)
        for path, module in pending:  # swap inside the GraphModule only: the model is untouched
            if id(module) not in memo:
                memo[id(module)], action = self._build(module, path)
                self.entries.append(Entry(path, type(module).__name__, action, type(memo[id(module)]).__name__))
            parent_path, _, name = path.rpartition(".")
            parent = gm.get_submodule(parent_path) if parent_path else gm
            setattr(parent, name, memo[id(module)])
        self._traced = True
        return gm


# ---- drop-in replacements from the modules they replace ---------------------------------------

def _norm_eps(module: nn.Module, dtype: torch.dtype) -> float:
    for attr in ("eps", "variance_epsilon", "epsilon"):
        v = getattr(module, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
        if attr == "eps" and hasattr(module, attr) and v is None:
            return torch.finfo(dtype).eps  # torch.nn.RMSNorm(eps=None)
    raise ValueError(f"cannot find the epsilon of {type(module).__name__} (looked for eps, variance_epsilon, "
                     f"epsilon); wrap it with rules.IdentityRule instead")


def _hidden_size(module: nn.Module) -> int:
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1:
        return w.shape[0]
    shape = getattr(module, "normalized_shape", None) or getattr(module, "hidden_size", None)
    if isinstance(shape, int):
        return shape
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    raise ValueError(f"cannot tell the normalised size of {type(module).__name__}; it must normalise the last "
                     f"dim and have a 1-D weight")


def _same_forward(original: nn.Module, new: nn.Module, hidden: int, like: Optional[torch.Tensor]) -> None:
    """A norm replacement must compute what the original computes: probe once on random input
    (catches conventions such as Gemma's ``(1 + weight)``)."""
    dtype = like.dtype if like is not None else torch.float32
    device = like.device if like is not None else None
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(3, hidden, generator=gen).to(device=device, dtype=dtype)
    with torch.no_grad():
        want, got = original(x), new(x)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        raise ValueError(f"{type(new).__name__} does not compute the forward of {type(original).__name__} "
                         f"(largest difference {(got.float() - want.float()).abs().max().item():.3g} on a "
                         f"probe input); wrap it with a rule (rules.IdentityRule) instead of replacing it")


def _rms(module: nn.Module) -> nn.Module:
    weight = getattr(module, "weight", None)
    hidden = _hidden_size(module)
    new = _m.RMSNormIdentity(hidden, _norm_eps(module, weight.dtype if weight is not None else torch.float32),
                             device="meta")
    new.weight = weight  # shared Parameter (or None)
    _same_forward(module, new, hidden, weight)
    return new


def _layer_norm(module: nn.Module) -> nn.Module:
    if not isinstance(module, nn.LayerNorm):
        raise TypeError(f"LayerNormIdentity replaces nn.LayerNorm, got {type(module).__name__}")
    new = _m.LayerNormIdentity(module.normalized_shape, eps=module.eps,
                               elementwise_affine=module.elementwise_affine, bias=module.bias is not None,
                               device="meta")
    new.weight, new.bias = module.weight, module.bias
    return new


def _softmax(module: nn.Module) -> nn.Module:
    if not isinstance(module, nn.Softmax) or module.dim is None:
        raise TypeError(f"SoftmaxDT replaces nn.Softmax with an explicit dim, got {module!r}")
    return _m.SoftmaxDT(dim=module.dim)


def _linear(module: nn.Module) -> nn.Module:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"LinearEpsilon replaces nn.Linear, got {type(module).__name__}")
    return _m.LinearEpsilon.from_linear(module)


_STATELESS = (_m.AddEpsilon, _m.MulUniform, _m.MatmulUE)

CONVERTERS: dict[type, Callable[[nn.Module], nn.Module]] = {
    _m.LinearEpsilon: _linear,
    _m.RMSNormIdentity: _rms,
    _m.LayerNormIdentity: _layer_norm,
    _m.SoftmaxDT: _softmax,
    _m.IdentityRuleActivation: lambda module: _m.IdentityRuleActivation(module),
}


def convert(module: nn.Module, target: type) -> nn.Module:
    """A ``target`` drop-in for ``module``, sharing its Parameters and computing its forward."""
    if target in CONVERTERS:
        return CONVERTERS[target](module)
    if hasattr(target, "from_module"):
        return target.from_module(module)
    if target in _STATELESS:
        if any(True for _ in module.parameters(recurse=True)):
            raise TypeError(f"{target.__name__} has no parameters; it cannot replace {type(module).__name__}, "
                            f"which has some")
        return target()
    known = ", ".join(c.__name__ for c in (*CONVERTERS, *_STATELESS))
    raise TypeError(f"don't know how to build {target.__name__} from {type(module).__name__}: known drop-ins are "
                    f"{known}; for others pass a factory callable (module -> nn.Module) or give the class a "
                    f"from_module(module) classmethod")
