"""Conservation check mode: per-rule relevance sums, and the first rule that loses relevance.

docs/math.md: with ``eps -> 0`` and zero biases the epsilon, identity and uniform rules conserve
relevance, ``sum(R_in) == sum(R_out)``; the softmax rule (Deep Taylor with bias) and biased
layers absorb some and are not expected to. Inside the block every rule application records,
during backward, the relevance entering it (output side) and leaving it (input side)::

    with lrp_kernels.tools.check.conservation(rtol=1e-3) as report:
        y = model(x)            # forward AND backward inside the block
        y.backward(y)           # relevance view (or: y.backward(ones), gradient view)
    print(report.table())
    bad = report.first_violation()   # None, or the first record (backward order) that breaks it

Sums per view: relevance view ``sum(grad_out)`` vs ``sum(grad_in)``; gradient view
``sum(z * G_z)`` vs ``sum(x * G_x)`` (the relevance of a tensor is ``t * t.grad``). Only inputs
that receive relevance count. Recording only reads tensors: relevance is unchanged.

A rule application is *conserved* when ``|R_in - R_out| <= atol + rtol * sum(|R_out|)``; the
absolute mass ``sum(|R_out|)`` is the scale because signed sums may cancel to ~0.

Rules written elsewhere (a Composite's own autograd Function) join by calling
:func:`record` from their backward; it does nothing when no check is active.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from ..ops import _common
from ..ops._common import record

__all__ = ["conservation", "record", "Record", "ConservationReport"]

@dataclass
class Record:
    """One rule application, in backward order (``index``)."""

    index: int
    op: str
    label: str          # innermost module name when ``conservation(module=...)``, else ""
    forward_index: int  # position in forward order (-1 when recorded via :func:`record`)
    view: str           # "relevance" | "gradient"
    r_out: float        # relevance entering (output side)
    r_in: float         # relevance leaving (input side, inputs that receive relevance)
    mass: float         # sum(|R_out|), the tolerance scale
    expected: bool      # docs/math.md promises conservation here
    conserved: bool     # |r_in - r_out| <= atol + rtol * mass

    @property
    def violation(self) -> bool:
        return self.expected and not self.conserved

    @property
    def rel_diff(self) -> float:
        return abs(self.r_in - self.r_out) / self.mass if self.mass > 0 else abs(self.r_in - self.r_out)

    @property
    def name(self) -> str:
        where = f" in {self.label}" if self.label else ""
        order = f" (forward #{self.forward_index})" if self.forward_index >= 0 else ""
        return f"{self.op}{where}{order}"


@dataclass
class _Token:
    """What the forward leaves for the backward of one rule application."""

    op: str
    label: str
    forward_index: int
    inputs: tuple
    output: torch.Tensor


class ConservationReport:
    """Records of one ``conservation`` block; also the recorder the op hooks talk to."""

    def __init__(self, rtol: float = 1e-3, atol: float = 0.0) -> None:
        if not rtol >= 0 or not atol >= 0:
            raise ValueError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
        self.rtol, self.atol = float(rtol), float(atol)
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._forward_count = 0
        self._labels: list[str] = []

    # -- results -------------------------------------------------------------------------------

    def first_violation(self) -> Optional[Record]:
        """The first record, in backward order, that breaks expected conservation (or None)."""
        return next((r for r in self.records if r.violation), None)

    def violations(self) -> list[Record]:
        return [r for r in self.records if r.violation]

    def table(self) -> str:
        """One line per rule application, backward order."""
        head = f"{'#':>3}  {'op':<34} {'view':<9} {'R_out':>12} {'R_in':>12} {'|diff|/mass':>11}  status"
        lines = [head, "-" * len(head)]
        for r in self.records:
            status = ("VIOLATION" if r.violation else "ok") if r.expected else \
                ("not conserved (not expected)" if not r.conserved else "ok (not expected)")
            lines.append(f"{r.index:>3}  {r.name[:34]:<34} {r.view:<9} {r.r_out:>12.5g} {r.r_in:>12.5g} "
                         f"{r.rel_diff:>11.3g}  {status}")
        first = self.first_violation()
        lines.append(f"first violation: {first.name} (#{first.index})" if first else
                     f"no violation (rtol={self.rtol:g}, atol={self.atol:g}, {len(self.records)} records)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"ConservationReport({len(self.records)} records, "
                f"{len(self.violations())} violations, rtol={self.rtol:g})")

    # -- recorder interface (called by lrp_kernels.ops._common hooks) --------------------------

    def on_forward(self, op: str, inputs: tuple, output: torch.Tensor) -> _Token:
        with self._lock:
            idx = self._forward_count
            self._forward_count += 1
            label = self._labels[-1] if self._labels else ""
        return _Token(op, label, idx, tuple(_detach(t) for t in inputs), output.detach())

    def on_backward(self, token: _Token, input_grads: Sequence[Optional[torch.Tensor]],
                    output_grad: torch.Tensor, relevance: bool, expected) -> None:
        self.add(token.op, token.inputs, input_grads, (token.output,), (output_grad,), relevance,
                 expected, label=token.label, forward_index=token.forward_index)

    def add(self, op: str, inputs: Sequence, input_grads: Sequence, outputs: Sequence,
            output_grads: Sequence, relevance: bool, expected, label: str = "",
            forward_index: int = -1) -> Record:
        if callable(expected):
            expected = expected()
        if len(inputs) != len(input_grads) or len(outputs) != len(output_grads):
            raise ValueError(f"record({op!r}): inputs/input_grads and outputs/output_grads must pair up, "
                             f"got {len(inputs)}/{len(input_grads)} and {len(outputs)}/{len(output_grads)}")
        r_out, mass = 0.0, 0.0
        for z, g in zip(outputs, output_grads):
            if g is None:
                continue
            rz = _relevance(z, g, relevance)
            r_out += rz.sum().item()
            mass += rz.abs().sum().item()
        r_in = 0.0
        for x, g in zip(inputs, input_grads):
            if g is not None:
                r_in += _relevance(x, g, relevance).sum().item()
        conserved = abs(r_in - r_out) <= self.atol + self.rtol * mass
        with self._lock:
            rec = Record(len(self.records), op, label, forward_index, "relevance" if relevance else "gradient",
                         r_out, r_in, mass, bool(expected), bool(conserved))
            self.records.append(rec)
        return rec


def _detach(t):
    return t.detach() if isinstance(t, torch.Tensor) else t


def _relevance(t: Optional[torch.Tensor], g: torch.Tensor, relevance_view: bool) -> torch.Tensor:
    """The relevance a grad stands for, in float64: ``g`` itself, or ``t * g`` (gradient view)."""
    g = g.detach().to(torch.float64)
    if relevance_view:
        return g
    if t is None:
        raise ValueError("the gradient view needs the tensor values to form t * t.grad")
    # masked logits (-inf) get no gradient: their relevance is 0, not -inf * 0 = nan
    return torch.where(g == 0, torch.zeros((), dtype=torch.float64, device=g.device),
                       t.detach().to(torch.float64) * g)


def _push_label(report: ConservationReport, label: str):
    def hook(_module, _args) -> None:  # must return None: a value would replace the inputs
        report._labels.append(label)
    return hook


def _pop_label(report: ConservationReport):
    def hook(_module, _args, _output) -> None:  # must return None: a value would replace the output
        if report._labels:
            report._labels.pop()
    return hook


def active() -> bool:
    """True inside a ``conservation`` block."""
    return _common.recording()


@contextlib.contextmanager
def conservation(rtol: float = 1e-3, atol: float = 0.0,
                 module: Optional[nn.Module] = None) -> Iterator[ConservationReport]:
    """Record every rule application run (forward and backward) inside the block.

    ``module``: label records with the name of the innermost submodule whose forward ran the
    rule (forward hooks, removed at exit). One block at a time (process-wide, so that CUDA
    backward passes on autograd worker threads are seen too).
    """
    if _common._RECORDER is not None:
        raise RuntimeError("a conservation check is already active; nesting is not supported")
    report = ConservationReport(rtol, atol)
    handles = []
    if module is not None:
        for name, sub in module.named_modules():
            handles.append(sub.register_forward_pre_hook(_push_label(report, name or type(sub).__name__)))
            handles.append(sub.register_forward_hook(_pop_label(report)))
    _common.set_recorder(report)
    try:
        yield report
    finally:
        _common.set_recorder(None)
        for h in handles:
            h.remove()
