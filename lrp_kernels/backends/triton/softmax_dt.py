r"""Deep-Taylor softmax backward, row-wise in one kernel (op ``softmax_dt_backward``).

For ``s = softmax(x / T)`` over ``dim`` (docs/math.md; AttnLRP Prop. 3.1), per row:

    relevance view:  R_x = (x / T) * (R_s - s * sum(R_s))
    gradient view:   G_x = s * (G_s - sum(s * G_s)) / T

Masked logits (``x == -inf`` or ``x <= finfo(x.dtype).min``) are excluded from the row sum
and get exactly 0 (never ``-inf * 0 = NaN``); a fully masked row gives 0 everywhere (its
``s`` may be NaN or uniform: it is never read there).

Rows up to ``MAX_BLOCK`` are loaded once and kept in registers, several short rows per
program (``ELEMS_PER_PROGRAM``); a longer row gets a program that loops over it twice (sum,
then output). ``dim`` is moved last (a view when the
layout allows, else a copy). All arithmetic is float32; the output has ``x``'s dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import dispatch
from .. import triton as _backend

MAX_BLOCK = 8192        # longest row kept in registers on a GPU
MAX_BLOCK_INTERPRET = 128  # small under the interpreter, so tests reach the looped path cheaply
# short rows: several per program (elements per program), so tiny programs do not bound bandwidth
ELEMS_PER_PROGRAM = 4096
ELEMS_PER_PROGRAM_INTERPRET = 256


@triton.jit
def _row_terms(g, s, x, xmin, RELEVANCE: tl.constexpr):
    """Mask and the per-element term whose row sum the rule needs."""
    keep = x > xmin  # False for -inf, the dtype minimum and padding (-inf)
    g = tl.where(keep, g, 0.0)
    s = tl.where(keep, s, 0.0)  # a fully masked row's s may be NaN
    if RELEVANCE:
        term = g
    else:
        term = s * g
    return keep, g, s, term


@triton.jit
def _load_row_terms(g_row, x_row, s_row, cols, inb, stride_gc, stride_xc, stride_sc, xmin,
                    RELEVANCE: tl.constexpr):
    """One block of a long row (both passes read it the same way), in float32, with its terms."""
    x = tl.load(x_row + cols * stride_xc, mask=inb, other=float("-inf")).to(tl.float32)
    g = tl.load(g_row + cols * stride_gc, mask=inb, other=0.0).to(tl.float32)
    s = tl.load(s_row + cols * stride_sc, mask=inb, other=0.0).to(tl.float32)
    keep, g, s, term = _row_terms(g, s, x, xmin, RELEVANCE)
    return keep, g, s, x, term


@triton.jit
def _row_out(keep, g, s, x, total, inv_t, RELEVANCE: tl.constexpr):
    if RELEVANCE:
        out = (tl.where(keep, x, 0.0) * inv_t) * (g - s * total)  # no -inf * 0
    else:
        out = s * (g - total) * inv_t
    return tl.where(keep, out, 0.0)


@triton.jit
def _softmax_dt_bwd_kernel(
    G, X, S, OUT, L, n_rows,
    stride_gr, stride_gc, stride_xr, stride_xc, stride_sr, stride_sc, stride_or, stride_oc,
    inv_t, xmin,
    RELEVANCE: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:  # ROWS short rows per program, each loaded once
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        inb = (rows < n_rows)[:, None] & (offs < L)[None, :]
        cols = offs[None, :]
        x = tl.load(X + rows[:, None] * stride_xr + cols * stride_xc, mask=inb, other=float("-inf"))
        g = tl.load(G + rows[:, None] * stride_gr + cols * stride_gc, mask=inb, other=0.0)
        s = tl.load(S + rows[:, None] * stride_sr + cols * stride_sc, mask=inb, other=0.0)
        x = x.to(tl.float32)
        keep, g, s, term = _row_terms(g.to(tl.float32), s.to(tl.float32), x, xmin, RELEVANCE)
        total = tl.sum(term, axis=1)[:, None]
        out = _row_out(keep, g, s, x, total, inv_t, RELEVANCE)
        tl.store(OUT + rows[:, None] * stride_or + cols * stride_oc, out.to(OUT.dtype.element_ty), mask=inb)
    else:  # one long row per program: a pass for the sum, a pass for the output
        row = tl.program_id(0).to(tl.int64)
        g_row = G + row * stride_gr
        x_row = X + row * stride_xr
        s_row = S + row * stride_sr
        o_row = OUT + row * stride_or
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, L, BLOCK):
            cols = c0 + offs
            inb = cols < L
            keep, g, s, x, term = _load_row_terms(g_row, x_row, s_row, cols, inb, stride_gc, stride_xc,
                                                  stride_sc, xmin, RELEVANCE)
            acc += term
        total = tl.sum(acc, axis=0)
        for c0 in range(0, L, BLOCK):
            cols = c0 + offs
            inb = cols < L
            keep, g, s, x, term = _load_row_terms(g_row, x_row, s_row, cols, inb, stride_gc, stride_xc,
                                                  stride_sc, xmin, RELEVANCE)
            out = _row_out(keep, g, s, x, total, inv_t, RELEVANCE)
            tl.store(o_row + cols * stride_oc, out.to(OUT.dtype.element_ty), mask=inb)


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` with ``dim`` last, as ``[rows, L]`` (a view when the layout allows)."""
    moved = t.movedim(dim, -1)
    return moved.reshape(-1, moved.shape[-1])


def softmax_dt_backward_triton(
    grad_s: torch.Tensor,
    x: torch.Tensor,
    s: torch.Tensor,
    dim: int,
    temperature: float,
    relevance: bool,
) -> torch.Tensor:
    """Fused Deep-Taylor softmax backward; same contract as the torch backend."""
    if x.dim() == 0:  # softmax of a scalar is 1: nothing to redistribute
        return torch.zeros_like(x)
    dim = dim % x.dim()
    g2, x2, s2 = _rows(grad_s, dim), _rows(x, dim), _rows(s, dim)
    n_rows, length = x2.shape
    out2 = _backend.alloc_output((n_rows, length), x.dtype, x.device)
    moved_shape = x.movedim(dim, -1).shape
    if n_rows and length:
        limit = MAX_BLOCK_INTERPRET if _backend.interpreting() else MAX_BLOCK
        single = length <= limit
        block = triton.next_power_of_2(length) if single else limit
        per_program = ELEMS_PER_PROGRAM_INTERPRET if _backend.interpreting() else ELEMS_PER_PROGRAM
        rows = max(1, min(64, per_program // block)) if single else 1
        elems = rows * block
        warps = 16 if elems >= 8192 else 8 if elems >= 2048 else 4
        xmin = float(torch.finfo(x.dtype).min)
        args = (g2, x2, s2, out2, length, n_rows, *g2.stride(), *x2.stride(), *s2.stride(),
                *out2.stride(), 1.0 / float(temperature), xmin)
        kwargs = {"RELEVANCE": bool(relevance), "BLOCK": block, "SINGLE_BLOCK": single, "ROWS": rows}
        grid = (triton.cdiv(n_rows, rows),)
        if _backend.interpreting():
            _softmax_dt_bwd_kernel[grid](*args, **kwargs)
        else:
            with torch.cuda.device(x.device):
                _softmax_dt_bwd_kernel[grid](*args, **kwargs, num_warps=warps)
    return out2.reshape(moved_shape).movedim(-1, dim)


def supports(grad_s, x, s, dim, temperature, relevance) -> Optional[str]:
    """None if the fused kernel takes these inputs, else why not."""
    reason = _backend.device_reason(grad_s, x, s)
    if reason:
        return reason
    if grad_s.shape != x.shape or s.shape != x.shape:
        return (f"grad_s {tuple(grad_s.shape)}, x {tuple(x.shape)} and s {tuple(s.shape)} "
                f"must have one shape")
    if not temperature > 0:
        return f"temperature must be > 0, got {temperature}"
    return None


dispatch.register("softmax_dt_backward", "triton", softmax_dt_backward_triton, supports=supports)
