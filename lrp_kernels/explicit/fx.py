"""torch.fx rewriting for the Composite: trace, find every operation, swap in the LRP drop-ins.

In the relevance view every operation on the relevance path must either apply a rule or pass
relevance through unchanged; an op left with its plain gradient that is neither (a non-linearity,
a sum of two relevance-carrying tensors, a division by a constant) gives a silently wrong
relevance. So after tracing, every node is classified:

* **handled**: rewritten to the mapped function (``a + b`` -> ``add2``, ``torch.matmul`` ->
  ``matmul``, ``F.softmax`` -> ``softmax``, ...; methods ``Tensor.add`` / ``x.add(y)`` / ``x @ y``
  too), a mapped module (wrapped in its rule / replaced by its drop-in), or a scaling by a
  constant (``x * 0.5``, ``x / sqrt(d)``, ``-x``), rewritten to the identity rule because a
  plain gradient would scale the relevance.
* **passed through**: structural ops whose gradient moves relevance without changing it
  (reshape, view, permute, transpose, getitem, contiguous, expand, cat, stack, split, ...), and
  everything that carries no relevance (Python numbers, sizes, integer/bool tensors, tensors
  built only from constants and frozen parameters, such as masks).
* **unhandled**: anything else that carries relevance (``torch.exp``, an unmapped ``+``,
  ``nn.Tanh`` with no rule, ...): an error by default, a warning with ``strict=False``.

Whether a node carries relevance and whether it is a tensor is known, not guessed: the traced
graph is run once on the dummy inputs before rewriting.

What traces: models whose ``forward`` has no data-dependent control flow, traced with
:func:`torch.fx.symbolic_trace` semantics; forward parameters not in ``dummy_inputs`` are fixed
to their defaults (``concrete_args``). Hugging Face models (transformers >= 5) do **not** trace:
their mask construction branches on tensor shapes and their ``forward(**kwargs)`` defeats the
tracer (checked in tests/test_fx.py on a tiny Llama); use :func:`lrp_kernels.hf.patching` for those.
"""
from __future__ import annotations

import inspect
import operator
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..ops import functional as _lf

T = torch.Tensor

# ---- operation families: one mapping key covers every spelling of the op ----------------------

GROUPS: dict[str, tuple[set, set]] = {
    # name: (functions, method names)
    "add": ({operator.add, torch.add, T.add, T.__add__, T.__radd__}, {"add", "__add__", "__radd__"}),
    "mul": ({operator.mul, torch.mul, T.mul, T.__mul__, T.__rmul__}, {"mul", "__mul__", "__rmul__"}),
    "matmul": ({operator.matmul, torch.matmul, T.matmul, T.__matmul__, torch.bmm, T.bmm},
               {"matmul", "__matmul__", "bmm"}),
    "softmax": ({F.softmax, torch.softmax, T.softmax}, {"softmax"}),
    "mean": ({torch.mean, T.mean}, {"mean"}),
}

_SCALE_FUNCTIONS = {operator.mul, torch.mul, T.mul, operator.truediv, torch.div, torch.true_divide, T.div,
                    T.__truediv__, operator.neg, torch.neg, T.neg}
_SCALE_METHODS = {"mul", "__mul__", "__rmul__", "div", "__truediv__", "true_divide", "neg", "__neg__"}

# gradient == a re-arrangement (or selection, or copy) of the relevance: passes it unchanged
PASS_NAMES = {
    "reshape", "view", "view_as", "permute", "transpose", "t", "getitem", "size", "dim", "contiguous",
    "expand", "expand_as", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "split", "chunk",
    "unbind", "squeeze", "unsqueeze", "flatten", "unflatten", "clone", "to", "float", "double", "half",
    "bfloat16", "type", "type_as", "repeat", "repeat_interleave", "tile", "narrow", "select", "movedim",
    "moveaxis", "swapaxes", "swapdims", "flip", "roll", "masked_fill", "detach", "dropout", "getattr",
    "index_select", "gather", "tril", "triu", "pad", "broadcast_to", "_assert", "_assert_is_none",
    "eq", "ne", "lt", "le", "gt", "ge", "where",
}
PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.Flatten, nn.Unflatten)


def group_of_key(key: Any) -> Optional[str]:
    """The op family a mapping key names (``operator.add``, ``torch.add``, ``"add"``...), or None."""
    for name, (fns, methods) in GROUPS.items():
        if key in fns or key in methods:
            return name
    return None


def _name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return str(t)
    return getattr(t, "__name__", str(t))


def _label(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"module {type(gm.get_submodule(node.target)).__name__}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    mod = getattr(node.target, "__module__", None) or ""
    short = {"_operator": "operator", "torch._C._VariableFunctions": "torch", "torch.nn.functional": "F",
             "torch._tensor": "Tensor"}.get(mod, mod)
    return f"{short}.{_name(node)}" if short else _name(node)


# ---- tracing -------------------------------------------------------------------------------

class TraceFailure(TypeError):
    """The model cannot be symbolically traced; the message says what to use instead."""


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple):
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if type(m).__module__.startswith("lrp_kernels"):
            return True  # already an LRP module or rule: keep it whole
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module, dummy_inputs: Mapping[str, Any], leaf_types: tuple = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; ``dummy_inputs`` names the forward's traced inputs, every
    other forward parameter is fixed to its default. Modules of ``leaf_types`` stay whole."""
    if not isinstance(dummy_inputs, Mapping):
        raise TypeError(f"dummy_inputs must be a dict of forward argument name -> value, "
                        f"got {type(dummy_inputs).__name__}")
    sig = inspect.signature(model.forward)
    unknown = set(dummy_inputs) - set(sig.parameters)
    if unknown:
        raise ValueError(f"dummy_inputs names {sorted(unknown)}, not parameters of "
                         f"{type(model).__name__}.forward{sig}")
    concrete = {}
    for name, p in sig.parameters.items():
        if name in dummy_inputs or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise ValueError(f"dummy_inputs must give forward parameter {name!r} of {type(model).__name__} "
                             f"(it has no default to fix it to)")
        concrete[name] = p.default
    try:
        graph = _Tracer(tuple(leaf_types)).trace(model, concrete_args=concrete or None)
    except Exception as e:  # the tracer raises many types; the cause is kept
        raise TraceFailure(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: {e}). Models with "
            f"data-dependent control flow do not trace (Hugging Face transformers >= 5 models among "
            f"them): use Composite.register(model) without dummy_inputs (module rules only) plus "
            f"explicit drop-ins, or lrp_kernels.patch(model) for Hugging Face models") from e
    name = type(model).__name__
    return fx.GraphModule(model, graph, class_name=f"Traced{name}")


# ---- what each node is: run the graph once on the dummy inputs ----------------------------------

@dataclass
class NodeInfo:
    is_tensor: bool = False
    is_float: bool = False
    carries: bool = False        # a floating tensor that depends on an input (relevance flows here)
    shape: Optional[tuple] = None


class _Annotator(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.info: dict[fx.Node, NodeInfo] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        info = NodeInfo()
        if isinstance(out, torch.Tensor):
            info.is_tensor, info.is_float, info.shape = True, out.is_floating_point(), tuple(out.shape)
        if n.op == "placeholder":
            info.carries = info.is_float
        elif n.op != "get_attr":
            # a container output (tuple from split, ...) carries if any input does
            parents = n.all_input_nodes
            flows = any(self.info[p].carries for p in parents)
            info.carries = flows and (info.is_float or not info.is_tensor and _has_float(out))
        self.info[n] = info
        return out


def _has_float(out) -> bool:
    if isinstance(out, (tuple, list)):
        return any(_has_float(o) for o in out)
    if isinstance(out, dict):
        return any(_has_float(o) for o in out.values())
    return isinstance(out, torch.Tensor) and out.is_floating_point()


def annotate(gm: fx.GraphModule, dummy_inputs: Mapping[str, Any]) -> dict[fx.Node, NodeInfo]:
    args = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        if n.target in dummy_inputs:
            args.append(dummy_inputs[n.target])
        elif n.args:
            args.append(n.args[0])  # a parameter fixed to its default
        else:
            raise ValueError(f"no dummy input for traced input {n.target!r}")
    ann = _Annotator(gm)
    with torch.no_grad():
        ann.run(*args)
    return ann.info


# ---- adapters the rewritten graph calls ------------------------------------------------------

def _as_tensor(c, like: torch.Tensor) -> torch.Tensor:
    return c if isinstance(c, torch.Tensor) else torch.as_tensor(c, dtype=like.dtype, device=like.device)


def lrp_binary(fn: Callable, a, b, *extra, **kwargs):
    """``fn(a, b)`` with a Python-number operand turned into a constant tensor (no relevance)."""
    like = a if isinstance(a, torch.Tensor) else b
    return fn(_as_tensor(a, like), _as_tensor(b, like), *extra, **kwargs)


def lrp_scale(op: Callable, x: torch.Tensor, *args, **kwargs):
    """``op(x, c)`` (scaling by a constant) with the identity rule: the relevance passes unchanged."""
    return _lf.identity(lambda t: op(t, *args, **kwargs), x)


def lrp_rscale(op: Callable, c, x: torch.Tensor):
    """``op(c, x)`` for ``c * x`` with the identity rule."""
    return _lf.identity(lambda t: op(c, t), x)


_BOUND: dict = {}


def bind(adapter: Callable, fn: Callable) -> Callable:
    """``adapter`` with its first argument fixed to ``fn``, as a named function (fx's generated
    code calls targets by name; a function object cannot appear among a node's arguments)."""
    key = (adapter, id(fn))
    if key in _BOUND and _BOUND[key][0] is fn:
        return _BOUND[key][1]

    def bound(*args, **kwargs):
        return adapter(fn, *args, **kwargs)

    tag = getattr(fn, "__name__", type(fn).__name__)
    bound.__name__ = bound.__qualname__ = f"lrp_{adapter.__name__.replace('lrp_', '')}_{tag}"
    _BOUND[key] = (fn, bound)
    return bound


# ---- classification and rewriting ------------------------------------------------------------

HANDLED, WRAPPED, PASSED, CONSTANT, UNHANDLED = ("handled", "module rule", "passed through",
                                                 "no relevance", "UNHANDLED")


@dataclass
class Row:
    node: str
    label: str
    status: str
    detail: str = ""


def _in(target, mapping: Mapping) -> bool:
    try:
        return target in mapping
    except TypeError:  # unhashable target
        return False


def _lookup(function_map: Mapping, node: fx.Node):
    """(mapped function, group name) for a call node, exact key first, then the op family."""
    if node.op in ("call_function", "call_method") and _in(node.target, function_map):
        return function_map[node.target], group_of_key(node.target)
    for name, (fns, methods) in GROUPS.items():
        hit = node.target in fns if node.op == "call_function" else \
            (node.op == "call_method" and node.target in methods)
        if hit:
            for key, fn in function_map.items():
                if group_of_key(key) == name:
                    return fn, name
            return None, name
    return None, None


def rewrite(gm: fx.GraphModule, info: Mapping[fx.Node, NodeInfo], function_map: Mapping,
            module_decider: Callable[[str, nn.Module], Optional[str]]) -> list[Row]:
    """Classify every node and rewrite the handled ones in place; returns one row per node.

    ``module_decider(path, module)`` returns a description when the Composite takes the module
    (it is swapped by the caller), else None.
    """
    rows: list[Row] = []
    for node in list(gm.graph.nodes):
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        ni = info[node]
        label = _label(node, gm)
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            taken = module_decider(node.target, mod)
            if taken:
                rows.append(Row(node.name, label, WRAPPED, taken))
            elif type(mod).__module__.startswith("lrp_kernels"):
                rows.append(Row(node.name, label, HANDLED, "already an LRP module"))
            elif isinstance(mod, PASS_MODULES):
                rows.append(Row(node.name, label, PASSED))
            elif not ni.carries:
                rows.append(Row(node.name, label, CONSTANT))
            else:
                rows.append(Row(node.name, label, UNHANDLED, "module with its plain gradient"))
            continue
        if not ni.carries:
            rows.append(Row(node.name, label, CONSTANT))
            continue
        fn, group = _lookup(function_map, node)
        carriers = [a for a in node.args if isinstance(a, fx.Node) and info[a].carries]
        if _is_constant_scaling(node, info, carriers):
            _rewrite_scaling(node, carriers[0])
            rows.append(Row(node.name, label, HANDLED, "scaling by a constant: identity rule"))
        elif fn is not None and _rewrite_mapped(gm, node, fn, group):
            rows.append(Row(node.name, label, HANDLED, f"-> {getattr(fn, '__qualname__', fn)}"))
        elif _name(node) in PASS_NAMES:
            rows.append(Row(node.name, label, PASSED))
        else:
            why = "no mapping for this op" if fn is None else "arguments the mapped function cannot take"
            rows.append(Row(node.name, label, UNHANDLED, why))
    gm.graph.lint()
    gm.recompile()
    return rows


def _is_constant_scaling(node, info, carriers) -> bool:
    """x * c, c * x, x / c, -x with one relevance-carrying tensor and an output of its shape."""
    is_scale = (node.op == "call_function" and node.target in _SCALE_FUNCTIONS) or \
        (node.op == "call_method" and node.target in _SCALE_METHODS)
    if not is_scale or len(carriers) != 1 or node.kwargs:
        return False
    name = _name(node)
    if "neg" in name:
        return len(node.args) == 1
    if len(node.args) != 2:
        return False
    if "div" in name and node.args[0] is not carriers[0]:
        return False  # c / x is not a scaling of x
    return info[carriers[0]].shape == info[node].shape


def _rewrite_scaling(node: fx.Node, carrier: fx.Node) -> None:
    name = _name(node)
    node.op, node.kwargs = "call_function", {}
    if "neg" in name:
        node.target, node.args = bind(lrp_scale, operator.neg), (carrier,)
        return
    op = operator.truediv if "div" in name else operator.mul
    a, b = node.args
    node.target, node.args = bind(lrp_scale if a is carrier else lrp_rscale, op), (a, b)


def _rewrite_mapped(gm: fx.GraphModule, node: fx.Node, fn: Callable, group: Optional[str]) -> bool:
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if group in ("add", "mul", "matmul"):
        if len(args) != 2 or kwargs:  # torch.add(a, b, alpha=2), out=... : not the plain op
            return False
        node.op, node.target, node.args, node.kwargs = "call_function", bind(lrp_binary, fn), args, {}
        return True
    if group == "softmax":  # normalise to fn(x, dim, dtype)
        kwargs.pop("_stacklevel", None)
        dtype_pos = 3 if node.target is F.softmax else 2
        x = args[0]
        dim = args[1] if len(args) > 1 else kwargs.pop("dim", None)
        dtype = args[dtype_pos] if len(args) > dtype_pos else kwargs.pop("dtype", None)
        if dim is None or kwargs:
            return False
        args, kwargs = (x, dim, dtype), {}
    if group == "mean" and "dtype" in kwargs:
        return False
    node.op, node.target, node.args, node.kwargs = "call_function", fn, args, kwargs
    return True


def table(rows: list[Row]) -> str:
    """Operations found, counted by (operation, status)."""
    counts = Counter((r.label, r.status, r.detail) for r in rows)
    order = {UNHANDLED: 0, HANDLED: 1, WRAPPED: 2, PASSED: 3, CONSTANT: 4}
    items = sorted(counts.items(), key=lambda kv: (order.get(kv[0][1], 9), kv[0][0]))
    w = max([len("operation")] + [len(k[0]) for k, _ in items])
    lines = [f"{'operation':<{w}}  {'count':>5}  {'status':<14}  detail", "-" * (w + 40)]
    for (label, status, detail), n in items:
        lines.append(f"{label:<{w}}  {n:>5}  {status:<14}  {detail}")
    return "\n".join(lines)


def check_unhandled(rows: list[Row], strict: bool) -> None:
    bad = [r for r in rows if r.status == UNHANDLED]
    if not bad:
        return
    listed = ", ".join(f"{r.node} ({r.label}: {r.detail})" for r in bad)
    msg = (f"{len(bad)} operation(s) on the relevance path have no LRP rule and would give a wrong "
           f"relevance with their plain gradient: {listed}. Map them in the Composite (a rule for a "
           f"module type, a drop-in for a function), or pass strict=False to only warn")
    if strict:
        raise ValueError(msg)
    warnings.warn(msg, stacklevel=3)
