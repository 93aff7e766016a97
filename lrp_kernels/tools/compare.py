"""Compare every backend on every kernel op against a float64 oracle and the torch backend.

The library behind ``lrp-kernels compare`` (:mod:`lrp_kernels.cli.compare`): builds random
inputs of the given sizes ``(M, N, K)``, runs each kernel op on every available backend that implements it,
and prints the max absolute and norm-wise relative error vs a float64 evaluation of docs/math.md
(the small oracle below, written from the formulas) and vs the torch backend; a row whose error exceeds the dtype's tolerance (``TOLERANCE``) has
status ``MISMATCH``.

The oracle applies each rule to the *same* forward values the kernels receive (``z``, ``o``,
``s``, ``y`` computed once in the chosen dtype), so the error measured is the kernel's, not
the forward pass's rounding (which a rule near ``z = 0`` amplifies).

Triton on CPU: with ``TRITON_INTERPRET=1`` (the command sets it unless ``--no-interpret``) the
Triton kernels run through the interpreter on CPU tensors. Under the interpreter only float32 is meaningful (its
bfloat16 / float16 arithmetic is not the GPU's), so triton is skipped there for other dtypes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..ops._common import DEFAULT_EPSILON, stabilize

# norm-wise relative error allowed vs the float64 oracle / the torch backend, per input dtype
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
F64 = torch.float64


# ---- float64 oracle of docs/math.md (rules applied to given forward values) ------------------------

def _d(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(F64)


def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    # the one stabiliser (float64 in, float64 out); it is checked against tests/helpers/oracle.py
    return stabilize(z, eps)


def _masked(x: torch.Tensor) -> torch.Tensor:
    return torch.isneginf(x) | (x <= torch.finfo(x.dtype).min)


def oracle_linear(g, x, w, b, z, eps, relevance):
    g, x, w, z = _d(g), _d(x), _d(w), _d(z)
    h = g / _stab(z, eps) if relevance else g * z / _stab(z, eps)
    out = h @ w
    return out * x if relevance else out


def oracle_softmax(g, x, s, dim, temperature, relevance):
    keep = ~_masked(x)
    g, s = torch.where(keep, _d(g), 0.0), torch.where(keep, torch.nan_to_num(_d(s)), 0.0)
    if relevance:
        u = torch.where(keep, _d(x), 0.0) / temperature
        out = u * (g - s * g.sum(dim, keepdim=True))
    else:
        out = s * (g - (s * g).sum(dim, keepdim=True)) / temperature
    return torch.where(keep, out, 0.0)


def oracle_matmul(g, a, b, o, eps, relevance, need_a, need_b):
    g, a, b, o = _d(g), _d(a), _d(b), _d(o)
    h = g / ((2.0 if need_a and need_b else 1.0) * _stab(o, eps))
    if not relevance:
        h = h * o
    ga = h @ b.transpose(-1, -2) if need_a else None
    gb = a.transpose(-1, -2) @ h if need_b else None
    if relevance:
        ga = ga * a if need_a else None
        gb = gb * b if need_b else None
    return ga, gb


def oracle_add(g, inputs, z, eps, relevance, needs):
    h = _d(g) / _stab(_d(z), eps)
    outs = []
    for t, need in zip(inputs, needs):
        r = _d(t) * h if relevance else h * _d(z)
        outs.append(r.sum_to_size(t.shape) if need else None)
    return outs


def oracle_mul(g, a, b, relevance, need_a, need_b):
    share = 0.5 if (need_a and need_b) else 1.0
    g = _d(g) * share
    ga = (g if relevance else g * _d(b)).sum_to_size(a.shape) if need_a else None
    gb = (g if relevance else g * _d(a)).sum_to_size(b.shape) if need_b else None
    return ga, gb


def oracle_mean(g, x, z, dim, keepdim, eps, relevance):
    x, z, g = _d(x), _d(z), _d(g)
    h = g / _stab(z, eps) if relevance else g * z / _stab(z, eps)
    if not keepdim:
        for d in sorted(dim):
            h = h.unsqueeze(d)
    n = 1
    for d in dim:
        n *= x.shape[d]
    out = h.expand(x.shape) / n
    return out * x if relevance else out


def oracle_identity(g, x, y, eps, relevance):
    return _d(g) if relevance else _d(g) * _d(y) / _stab(_d(x), eps)


def oracle_rms_forward(x, w, eps):
    x = _d(x)
    rstd = 1.0 / torch.sqrt((x * x).mean(-1) + eps)
    return x * rstd[..., None] * _d(w), rstd


def oracle_rms_backward(g, w, rstd):
    return _d(g) * _d(w) * _d(rstd)[..., None]


def oracle_ln_forward(x, w, b, eps):
    x = _d(x)
    mu = x.mean(-1)
    c = x - mu[..., None]
    rstd = 1.0 / torch.sqrt((c * c).mean(-1) + eps)
    return c * rstd[..., None] * _d(w) + _d(b), mu, rstd


def oracle_ln_backward(g, x, w, b, mean, rstd, epsilon, relevance):
    g, x, w, b = _d(g), _d(x), _d(w), _d(b)
    c = x - _d(mean)[..., None]
    rs = _d(rstd)[..., None]
    if not relevance:
        u = g * w * rs
        return u - u.mean(-1, keepdim=True)
    yb = c * rs * w
    r_c = yb * g / _stab(yb + b, epsilon)
    n = r_c / _stab(c, epsilon)
    return x * (n - n.mean(-1, keepdim=True))


# ---- cases: inputs of the given sizes + the oracle's answer --------------------------------------

@dataclass
class Case:
    op: str
    view: str  # "R", "G" or "-" (no view)
    args: tuple
    oracle: Callable[[], object]


def _rand(gen, *shape, dtype, device, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(device=device, dtype=dtype)


def build_cases(sizes: Sequence[int], dtype: torch.dtype, device: str, seed: int = 0) -> list[Case]:
    """One case per kernel op and view, on fresh random inputs of sizes ``(M, N, K)``."""
    m, n, k = sizes
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return _rand(gen, *shape, dtype=dtype, device=device, scale=scale)

    cases = []
    for relevance in (True, False):
        view = "R" if relevance else "G"
        # epsilon linear: x [2, M, K] (batched), W [N, K]
        x, w, b = rnd(2, m, k), rnd(n, k, scale=k ** -0.5), rnd(n)
        z = torch.nn.functional.linear(x, w, b)
        g = rnd(2, m, n)
        args = (g, x, w, b, z, DEFAULT_EPSILON, relevance)
        cases.append(Case("linear_epsilon_backward", view, args, lambda a=args: oracle_linear(*a)))
        # Deep-Taylor softmax over N with masks: a partly and a fully masked row
        logits = rnd(2, m, n)
        logits[0, 0, : max(1, n // 3)] = float("-inf")
        logits[1, m - 1, :] = float("-inf")
        logits[0, m // 2, 0] = torch.finfo(dtype).min
        s = torch.softmax(logits.float(), -1).to(dtype)
        gs = rnd(2, m, n)
        if relevance:
            gs = (gs.float() * torch.nan_to_num(s.float())).to(dtype)
        args = (gs, logits, s, 2, 1.0, relevance)
        cases.append(Case("softmax_dt_backward", view, args, lambda a=args: oracle_softmax(*a)))
        # uniform-epsilon matmul, attention-like batch [2, 2, M, K] @ [2, 2, K, N]
        a_, b_ = rnd(2, 2, m, k), rnd(2, 2, k, n, scale=k ** -0.5)
        o = a_ @ b_
        args = (rnd(*o.shape), a_, b_, o, DEFAULT_EPSILON, relevance, True, True)
        cases.append(Case("matmul_ue_backward", view, args, lambda a=args: oracle_matmul(*a)))
        # epsilon add with broadcasting
        p, q = rnd(m, n), rnd(n)
        args = (rnd(m, n), [p, q], p + q, DEFAULT_EPSILON, relevance, [True, True])
        cases.append(Case("add_epsilon_backward", view, args, lambda a=args: oracle_add(*a)))
        # uniform product
        p, q = rnd(m, n), rnd(m, n)
        args = (rnd(m, n), p, q, relevance, True, True)
        cases.append(Case("mul_uniform_backward", view, args, lambda a=args: oracle_mul(*a)))
        # epsilon mean over dim 1
        xm = rnd(m, n, k)
        args = (rnd(m, k), xm, xm.mean(1), (1,), False, DEFAULT_EPSILON, relevance)
        cases.append(Case("mean_epsilon_backward", view, args, lambda a=args: oracle_mean(*a)))
        # identity rule on SiLU
        xi = rnd(m, n)
        args = (rnd(m, n), xi, torch.nn.functional.silu(xi), DEFAULT_EPSILON, relevance)
        cases.append(Case("identity_backward", view, args, lambda a=args: oracle_identity(*a)))
        # LayerNorm backward on saved statistics
        xl, wl, bl = rnd(m, n), rnd(n), rnd(n)
        mu = xl.to(F64).mean(-1)
        rstd = 1.0 / torch.sqrt((xl.to(F64) - mu[:, None]).pow(2).mean(-1) + 1e-5)
        stats_dtype = F64 if dtype == F64 else torch.float32
        # epsilon 1e-2 here: the R-view divides by stab(x - mean) and stab(y), which the kernels
        # recompute from the saved statistics in float32; near 0 that rounding is amplified by
        # up to 1/epsilon (conditioning of the rule, not a kernel error)
        args = (rnd(m, n), xl, wl, bl, mu.to(stats_dtype), rstd.to(stats_dtype), 1e-2, relevance)
        cases.append(Case("layer_norm_backward", view, args, lambda a=args: oracle_ln_backward(*a)))
    # view-less ops: norm forwards and the RMSNorm gradient
    xr, wr = rnd(m, n), rnd(n)
    cases.append(Case("rms_norm_forward", "-", (xr, wr, 1e-6), lambda: oracle_rms_forward(xr, wr, 1e-6)))
    rstd = torch.rsqrt(xr.to(F64).pow(2).mean(-1) + 1e-6).to(F64 if dtype == F64 else torch.float32)
    args = (rnd(m, n), wr, rstd)
    cases.append(Case("rms_norm_backward", "-", args, lambda a=args: oracle_rms_backward(*a)))
    xl, wl, bl = rnd(m, n), rnd(n), rnd(n)
    cases.append(Case("layer_norm_forward", "-", (xl, wl, bl, 1e-5),
                      lambda: oracle_ln_forward(xl, wl, bl, 1e-5)))
    return cases


# ---- running and scoring ----------------------------------------------------------------------------

def _outputs(result) -> list:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _errors(got: list, want: list) -> tuple[float, float]:
    """(max abs error, worst norm-wise relative error) over the outputs; inf on a mismatch."""
    max_abs = rel = 0.0
    if len(got) != len(want):
        return float("inf"), float("inf")
    for g, w in zip(got, want):
        if g is None or w is None:
            if (g is None) != (w is None):
                return float("inf"), float("inf")
            continue
        g, w = g.detach().to("cpu", F64), w.detach().to("cpu", F64)
        if g.shape != w.shape or not torch.isfinite(g).all():
            return float("inf"), float("inf")
        if g.numel() == 0:
            continue
        max_abs = max(max_abs, (g - w).abs().max().item())
        rel = max(rel, ((g - w).norm() / w.norm().clamp_min(1e-30)).item())
    return max_abs, rel


def run_case(case: Case, backends: Sequence[str], dtype: torch.dtype) -> list[dict]:
    """One row per backend: errors vs oracle and torch, or why it was skipped."""
    from ..backends import dispatch

    want = _outputs(case.oracle())
    ref = _outputs(dispatch.call(case.op, *case.args, backend="torch"))
    tol = TOLERANCE[dtype]
    rows = []
    for backend in backends:
        row = {"op": case.op, "view": case.view, "backend": backend, "dtype": str(dtype).replace("torch.", "")}
        try:
            chosen, fn = dispatch.resolve(case.op, *case.args, backend=backend)
        except dispatch.BackendUnavailableError as err:
            rows.append({**row, "status": "skip", "reason": str(err)})
            continue
        if chosen != backend:
            rows.append({**row, "status": "skip", "reason": f"no {backend} kernel (falls back to {chosen})"})
            continue
        if (backend == "triton" and dtype != torch.float32 and _triton_interpreted(case.args)):
            rows.append({**row, "status": "skip",
                         "reason": "the Triton interpreter's half-precision arithmetic is not the GPU's"})
            continue
        got = _outputs(fn(*case.args))
        abs_o, rel_o = _errors(got, want)
        abs_t, rel_t = _errors(got, ref)
        ok = rel_o <= tol and rel_t <= tol
        rows.append({**row, "status": "ok" if ok else "MISMATCH", "max_abs_vs_oracle": abs_o,
                     "rel_vs_oracle": rel_o, "max_abs_vs_torch": abs_t, "rel_vs_torch": rel_t,
                     "tolerance": tol})
    return rows


def _triton_interpreted(args) -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and not any(
        isinstance(a, torch.Tensor) and a.is_cuda for a in args)


def compare(sizes: Sequence[int], dtype: torch.dtype, device: str, ops: Optional[Sequence[str]] = None,
            backends: Optional[Sequence[str]] = None, seed: int = 0) -> list[dict]:
    """All rows (dicts) for the selected ops and backends."""
    from ..backends import dispatch

    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"sizes must be three positive integers (M, N, K), got {tuple(sizes)}")
    if ops:
        bad = [o for o in ops if o not in dispatch.ops()]
        if bad:
            raise ValueError(f"ops: unknown op(s) {bad}; known: {dispatch.ops()}")
    if backends:
        bad = [b for b in backends if b not in dispatch.BACKENDS]
        if bad:
            raise ValueError(f"backends: unknown backend(s) {bad}; known: {list(dispatch.BACKENDS)}")
    status = dispatch.available_backends()
    names = list(backends) if backends else list(dispatch.BACKENDS)
    rows = []
    for case in build_cases(sizes, dtype, device, seed):
        if ops and case.op not in ops:
            continue
        usable = [b for b in names if status[b]["available"]]
        rows += run_case(case, usable, dtype)
        for b in names:
            if not status[b]["available"]:
                rows.append({"op": case.op, "view": case.view, "backend": b, "status": "skip",
                             "dtype": str(dtype).replace("torch.", ""), "reason": status[b]["reason"]})
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'op':<24} {'view':<4} {'backend':<7} {'abs(oracle)':>11} {'rel(oracle)':>11} {'rel(torch)':>10}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] == "skip":
            lines.append(f"{r['op']:<24} {r['view']:<4} {r['backend']:<7} {'':>11} {'':>11} {'':>10}  "
                         f"skip: {r['reason']}")
        else:
            lines.append(f"{r['op']:<24} {r['view']:<4} {r['backend']:<7} {r['max_abs_vs_oracle']:>11.2e} "
                         f"{r['rel_vs_oracle']:>11.2e} {r['rel_vs_torch']:>10.2e}  {r['status']}")
    return "\n".join(lines)
