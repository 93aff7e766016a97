"""LXT's ``Composite`` (``lxt.explicit.core``) on our :class:`lrp_kernels.explicit.Composite`.

Same constructor and methods as LXT: ``Composite(layer_map, canonizers=[],
zennit_composite=None)``, ``register(parent, dummy_inputs=None, tracer=None, verbose=False,
no_grad=True)`` (returns the model to use: the same one, or a traced ``GraphModule`` when
``dummy_inputs`` are given), ``remove()``, ``context(module)``, ``print_summary()``.

Layer map values are LXT's: rule classes (wrap the module), drop-in module classes (replace
it, built with ``INIT_MODULE_MAPPING``), and for function keys (``operator.add``,
``F.softmax``) the drop-in functions; our own rules and modules work too. Differences:

* tracing is plain ``torch.fx`` (:mod:`lrp_kernels.explicit.fx`), not transformers' HFTracer
  (gone in transformers 5); Hugging Face models do not trace, use the model patches
  (:mod:`lrp_kernels.compat.lxt.explicit.models`). ``tracer=`` is refused.
* operations on the relevance path that no rule covers are reported as warnings (LXT lists
  them in its summary); ``remove()`` also restores the ``requires_grad`` flags (LXT leaves the
  parameters frozen) and the original modules after tracing.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn

from ....explicit import Composite as _OurComposite
from ....explicit import rules as _our_rules
from . import modules as lm

__all__ = ["Composite", "CompositeContext"]


class _Engine(_OurComposite):
    """Ours, except that the two projection modules of ``MultiheadAttention_CP`` can take rules:
    our Composite leaves every lrp_kernels module alone (they are already LRP), these are not."""

    def _factory(self, module: nn.Module):
        if isinstance(module, (lm.LinearInProjection, lm.LinearOutProjection)):
            return next((self.module_map[c] for c in type(module).__mro__ if c in self.module_map), None)
        return super()._factory(module)


def _from_init_mapping(cls: type):
    def build(module: nn.Module) -> nn.Module:
        return lm.INIT_MODULE_MAPPING[cls](module, cls)
    build.__name__ = cls.__name__
    return build


def _translate(value: Any) -> Any:
    """An LXT layer-map value as our Composite takes it."""
    if isinstance(value, type) and issubclass(value, nn.Module) and not issubclass(value, _our_rules.Rule):
        if value in lm.INIT_MODULE_MAPPING:
            return _from_init_mapping(value)
    return value  # rules, our own drop-ins, functions and factories: ours takes them as they are


class Composite:
    """A layer map ``{module class or function: rule, drop-in module or drop-in function}``
    applied to a model by :meth:`register`; see the module docstring.

    Args:
        layer_map: what to put where.
        canonizers: objects with ``apply(model)`` returning instances with ``remove()``
            (LXT's or Zennit's canonizers), applied before the rules.
        zennit_composite: a composite with ``register(model)`` / ``remove()`` (Zennit's, or
            :mod:`lrp_kernels.hooks`), registered after the rules.
        verbose: the default of :meth:`register`'s ``verbose`` (older LXT's constructor argument).
    """

    def __init__(self, layer_map: Mapping[Any, Any], canonizers=(), zennit_composite=None,
                 verbose: bool = False) -> None:
        for c in canonizers:
            if isinstance(c, type):
                raise ValueError(f"pass canonizer instances: {c.__name__}() instead of the class")
        self.layer_map = dict(layer_map)
        self.canonizers = list(canonizers)
        self.zennit_composite = zennit_composite
        self.canonizer_instances: list = []
        self.verbose = verbose
        self._engine: Optional[_Engine] = None

    def register(self, parent: nn.Module, dummy_inputs: Optional[dict] = None, tracer=None,
                 verbose: Optional[bool] = None, no_grad: bool = True) -> nn.Module:
        """Attach the rules to ``parent``; returns the model to use.

        Args:
            parent: the model.
            dummy_inputs: ``{forward argument: example}``: trace the model with torch.fx and
                replace the functions of the layer map (needed when it has function keys).
            tracer: not supported (plain torch.fx is used); must stay None.
            verbose: print what was wrapped, replaced and traced (default: the constructor's).
            no_grad: freeze the parameters while registered (they need no gradient).
        """
        if tracer is not None:
            raise ValueError("tracer= is not supported: models are traced with plain torch.fx "
                             "(lrp_kernels.explicit.fx); Hugging Face models: use the model patches")
        if self._engine is not None:
            raise RuntimeError("this Composite is already registered; call remove() first")
        for canonizer in self.canonizers:
            try:
                instances = canonizer.apply(parent, verbose)
            except TypeError:  # Zennit's canonizers take no verbose
                instances = canonizer.apply(parent)
            self.canonizer_instances.extend(instances)
        engine = _Engine({k: _translate(v) for k, v in self.layer_map.items()}, freeze=no_grad, strict=False)
        model = engine.register(parent, dummy_inputs, verbose=self.verbose if verbose is None else verbose)
        self._engine = engine
        if self.zennit_composite is not None:
            self.zennit_composite.register(model)
        return model

    def remove(self) -> None:
        """Undo :meth:`register` (rules, replaced modules, canonizers, the Zennit composite);
        nothing happens when not registered."""
        if self.zennit_composite is not None and self._engine is not None:
            self.zennit_composite.remove()
        if self._engine is not None:
            self._engine.remove()
            self._engine = None
        for instance in self.canonizer_instances:
            instance.remove()
        self.canonizer_instances = []

    def print_summary(self) -> None:
        """Print what the last :meth:`register` did (modules; traced operations)."""
        print(self._engine.table() if self._engine is not None else "not registered")

    def context(self, module: nn.Module, verbose: Optional[bool] = None) -> "CompositeContext":
        """``with composite.context(model) as model:`` registers, and removes on exit."""
        return CompositeContext(module, self, verbose)


class CompositeContext:
    """Registers ``composite`` on ``module`` on entry (yields the model to use), removes on exit."""

    def __init__(self, module: nn.Module, composite: Composite, verbose: Optional[bool] = None) -> None:
        self.module, self.composite, self.verbose = module, composite, verbose

    def __enter__(self) -> nn.Module:
        return self.composite.register(self.module, verbose=self.verbose)

    def __exit__(self, *exc) -> bool:
        self.composite.remove()
        return False
