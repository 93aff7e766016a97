"""Latent relevance: the relevance of hidden states, collected in the same backward pass.

In the gradient view the relevance of any tensor ``h`` is ``h * h.grad``; :func:`record` hooks
the chosen modules, keeps their output (or input) and multiplies it by the gradient that
arrives there during the backward::

    with lrp_kernels.patch(model), lrp_kernels.hf.latent.record(
            model, ["layers.*", "layers.*.mlp.down_proj:input", "layers.*.self_attn.o_proj:input"]) as rec:
        logits = model(inputs_embeds=emb, use_cache=False).logits
        logits[0, -1].max().backward()
    rec.relevance["model.layers.3"]                      # residual stream after layer 3 [B, N, D]
    rec.relevance["model.layers.3.mlp.down_proj:input"]  # MLP neurons [B, N, I]
    rec.heads("model.layers.3.self_attn.o_proj:input", num_heads)  # per attention head [B, N, H]

Patterns are dotted module names where ``*`` matches exactly one name component; a pattern
matches the *end* of a module's full name (``"layers.*"`` matches ``model.layers.0`` but not
``model.layers.0.mlp``). A ``":input"`` suffix records the module's first input instead of its
output (the MLP neurons are the input of ``down_proj``; the attention heads, concatenated, are
the input of ``o_proj``). Relevance is accumulated in float32 (float64 for float64 models);
a module called several times per forward gets the sum.

Works with gradient checkpointing (reentrant or not): a hooked tensor whose gradient is never
computed (a recomputation) contributes nothing; the one on the backward path contributes once.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn


def _matches(name: str, pattern: str) -> bool:
    parts, pat = name.split("."), pattern.split(".")
    if len(pat) > len(parts):
        return False
    return all(p == "*" or p == n for p, n in zip(pat, parts[len(parts) - len(pat):]))


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if isinstance(value, dict):
        for v in value.values():
            if isinstance(v, torch.Tensor):
                return v
    return None


class Recorder:
    """Holds the latent relevance collected by :func:`record` (``relevance[name]``)."""

    def __init__(self) -> None:
        self.relevance: dict[str, torch.Tensor] = {}
        self.names: list[str] = []
        self._handles: list = []

    def _capture(self, key: str, t) -> None:
        t = _first_tensor(t)
        if t is None or not t.requires_grad:
            return  # not on the backward path (e.g. a no-grad forward before a recomputation)
        act = t.detach()

        def on_grad(g: torch.Tensor) -> None:
            cd = torch.float64 if act.dtype == torch.float64 else torch.float32
            r = act.to(cd) * g.to(cd)
            self.relevance[key] = self.relevance[key] + r if key in self.relevance else r
        t.register_hook(on_grad)

    def heads(self, name: str, num_heads: int) -> torch.Tensor:
        """Sum the relevance of a ``[..., num_heads * head_dim]`` record per head: ``[..., num_heads]``."""
        r = self.relevance[name]
        if r.shape[-1] % num_heads:
            raise ValueError(f"last dim {r.shape[-1]} of {name!r} is not a multiple of num_heads={num_heads}")
        return r.unflatten(-1, (num_heads, -1)).sum(-1)

    def clear(self) -> None:
        self.relevance.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextmanager
def record(model: nn.Module, patterns: Sequence[str] | str) -> Iterator[Recorder]:
    """Collect ``h * h.grad`` for the hidden states named by ``patterns`` (see module docs)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ValueError("patterns must name at least one module pattern, e.g. 'layers.*'")
    rec = Recorder()
    named = list(model.named_modules())
    try:
        for pattern in patterns:
            base, _, where = pattern.partition(":")
            if where not in ("", "input", "output"):
                raise ValueError(f"pattern {pattern!r}: suffix must be ':input' or ':output'")
            hits = [(n, m) for n, m in named if n and _matches(n, base)]
            if not hits:
                raise ValueError(f"pattern {pattern!r} matches no module of {type(model).__name__}")
            for name, module in hits:
                if where == "input":
                    key = f"{name}:input"
                    rec._handles.append(module.register_forward_pre_hook(
                        lambda mod, args, kwargs, key=key: rec._capture(key, args if args else kwargs),
                        with_kwargs=True))
                else:
                    key = name
                    rec._handles.append(module.register_forward_hook(
                        lambda mod, args, out, key=key: rec._capture(key, out)))
                rec.names.append(key)
        yield rec
    finally:
        rec.remove()


__all__ = ["record", "Recorder"]
