"""AttnLRP for OpenCLIP (``open_clip``) image-text models: trace once, explain image and caption.

::

    model = open_clip.create_model("ViT-B-32", pretrained=...).eval()
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a dog", "a cat", "a car"])
    sim = CLIPSimilarity(model)                    # (image, text_embeds, text) -> cosine similarities
    lrp = composite()                              # AttnLRP on attention, norms, activations, +, @
    traced = register(lrp, sim, image, tokens)     # fx; only Linear / Conv2d left (to the hooks)
    with LayerMapComposite([(nn.Conv2d, Gamma(0.5)), (nn.Linear, Gamma(0.05))]).context(traced):
        x, emb = image.clone().requires_grad_(), sim.embed(tokens).requires_grad_()
        traced(x, emb, tokens)[0, 1].backward()    # relevance view: seed 1 at "a cat"
    pixel_relevance, token_relevance = x.grad.sum(1), emb.grad.sum(-1)

**Why tracing, not patching.** :func:`lrp_kernels.patch` serves Hugging Face models (their
attention goes through transformers' attention registry; the residual sums need no rule in the
gradient view). An OpenCLIP model is plain PyTorch code: its residual sums (``x + attn(...)``),
the final ``F.normalize`` and the similarity ``image @ text.T`` are written in ``forward``. With
torch.fx (:class:`~lrp_kernels.explicit.Composite` with ``dummy_inputs``) every one of them gets
its rule (epsilon sum, identity for the normalisation, uniform-epsilon product), and the
Composite refuses to run if an operation on the relevance path has none, so the rules are the
exact ones of docs/math.md, operation by operation; the relevance view also matches the seed
workflow users bring from LXT (``.grad`` is the relevance).

What gets which rule (:func:`composite`): ``nn.MultiheadAttention`` -> AttnLRP
(:class:`lrp_kernels.modules.MultiheadAttentionLRP`, or CP-LRP), ``nn.LayerNorm`` (OpenCLIP's
subclasses included) -> identity on the scaling, ``nn.GELU`` / OpenCLIP's ``QuickGELU`` ->
identity, ``+`` -> epsilon, ``@`` -> uniform-epsilon, ``F.normalize`` -> identity (the norm a
constant), scalings by constants -> identity. ``nn.Linear`` and ``nn.Conv2d`` are left to a
Zennit-style composite (:mod:`lrp_kernels.hooks`, e.g. Gamma), or get the epsilon rule with
``linear_rule="epsilon"``. The token embedding is a lookup: the text side is explained at its
output, so :class:`CLIPSimilarity` takes the caption's token embeddings as a float input.
"""
from __future__ import annotations

import functools
import operator
import warnings
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import fx as _fx
from . import rules as _rules
from .composite import Composite
from ..ops import functional as _lf
from ..ops import modules as _m

__all__ = ["CLIPSimilarity", "composite", "register"]

#: module types the hook composites give their rules to (left unmapped by :func:`composite`)
HOOKED_TYPES = (nn.Linear, nn.Conv2d)


class CLIPSimilarity(nn.Module):
    """An OpenCLIP ``CLIP`` model as ``(image, text_embeds, text) -> [n_images, n_captions]``
    cosine similarities, the text tower starting at the token embeddings (``embed(text)``) so
    that relevance reaches the caption tokens. ``text`` (the token ids) only picks the pooled
    position (OpenCLIP's ``text_global_pool``). The features are exactly ``model.encode_image`` /
    ``model.encode_text`` (normalised); the parameters are the model's (shared)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        needed = ("visual", "token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
        missing = [a for a in needed if not hasattr(model, a)]
        if missing:
            raise TypeError(f"CLIPSimilarity needs an open_clip CLIP model (a built-in ViT config); "
                            f"{type(model).__name__} has no {missing}")
        self.model = model

    def trim(self, text: torch.Tensor) -> torch.Tensor:
        """``text`` without the padding after the last end token: the same similarities (the text
        attention is causal and pools at the end token, so later positions change nothing) for a
        fraction of the text tower's work (OpenCLIP pads every caption to 77 tokens)."""
        mask = self.model.attn_mask
        n = mask.shape[-1] if mask is not None else 0
        causal = mask is not None and bool(torch.isneginf(mask[torch.ones(n, n, dtype=torch.bool).triu(1)]).all())
        if not causal or getattr(self.model, "text_pool_type", "argmax") != "argmax":
            raise ValueError("trim() needs a causal text tower pooled at the end token (argmax); this model's "
                             "padding positions can change the similarity")
        return text[:, : int(text.argmax(dim=-1).max()) + 1]

    def embed(self, text: torch.Tensor) -> torch.Tensor:
        """The token embeddings of ``text`` (``[n_captions, context]`` ids), the text input of forward."""
        return self.model.token_embedding(text).to(self.model.transformer.get_cast_dtype())

    def dummy_inputs(self, image: torch.Tensor, text: torch.Tensor) -> Dict[str, Any]:
        """The ``dummy_inputs`` of :meth:`Composite.register` for these inputs."""
        with torch.no_grad():
            return {"image": image, "text_embeds": self.embed(text), "text": text}

    def encode_text(self, text_embeds: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``model.encode_text(text, normalize=True)`` from the token embeddings (of all
        positions, or of the first ones: :meth:`trim`)."""
        from open_clip.transformer import text_global_pool
        m = self.model
        n = text_embeds.shape[1]
        x = text_embeds + m.positional_embedding[:n].to(text_embeds.dtype)
        mask = m.attn_mask
        if mask is not None:  # narrow, not a slice: n is a traced value (a buffer is no fx proxy)
            mask = torch.narrow(torch.narrow(mask, 0, 0, n), 1, 0, n)
        x = m.transformer(x, attn_mask=mask)
        x = m.ln_final(x)
        x = text_global_pool(x, text, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if isinstance(m.text_projection, nn.Linear):
            x = m.text_projection(x)
        elif m.text_projection is not None:
            x = x @ m.text_projection
        return F.normalize(x, dim=-1)

    def forward(self, image: torch.Tensor, text_embeds: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image_features = self.model.encode_image(image, normalize=True)
        return image_features @ self.encode_text(text_embeds, text).T


def normalize(input: torch.Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.normalize`` (as traced: with its ``out`` argument) with the identity rule."""
    if out is not None:
        raise ValueError("F.normalize(..., out=...) has no LRP drop-in; call it without out")
    return _lf.normalize(input, p, dim, eps)


def _activation_types() -> tuple:
    types: tuple = (nn.GELU,)
    try:
        from open_clip.transformer import QuickGELU
        types += (QuickGELU,)
    except Exception:  # open_clip missing, or torchvision not importable beside this torch
        pass
    return types


def composite(rule: str = "attnlrp", epsilon: float = 1e-6, linear_rule: Optional[str] = None) -> Composite:
    """The :class:`~lrp_kernels.explicit.Composite` for OpenCLIP models (see the module docstring).

    Args:
        rule: ``"attnlrp"`` or ``"cp-lrp"`` on the attention.
        epsilon: the stabiliser of the epsilon / uniform-epsilon rules.
        linear_rule: None (``nn.Linear`` / ``nn.Conv2d`` left to a hook composite, e.g. Gamma;
            see :func:`register`) or ``"epsilon"``.
    """
    if linear_rule not in (None, "epsilon"):
        raise ValueError(f"linear_rule must be None (rules from a hook composite) or 'epsilon', got {linear_rule!r}")
    mha = functools.partial(_m.MultiheadAttentionLRP.from_module, rule=rule, epsilon=epsilon)
    mha.__name__ = "MultiheadAttentionLRP"
    layer_map: Dict[Any, Any] = {
        nn.MultiheadAttention: mha,
        nn.LayerNorm: _m.LayerNormIdentity,
        operator.add: functools.partial(_lf.add2, epsilon=epsilon),
        operator.matmul: functools.partial(_lf.matmul, epsilon=epsilon),
        F.normalize: normalize,
    }
    for act in _activation_types():
        layer_map[act] = _rules.IdentityRule
    if linear_rule == "epsilon":
        eps_rule = functools.partial(_rules.EpsilonRule, epsilon=epsilon)
        eps_rule.__name__ = "EpsilonRule"
        layer_map.update({t: eps_rule for t in HOOKED_TYPES})
    return Composite(layer_map, strict=linear_rule is not None)


def register(lrp: Composite, similarity: CLIPSimilarity, image: torch.Tensor, text: torch.Tensor) -> nn.Module:
    """Trace ``similarity`` on these inputs with ``lrp`` (from :func:`composite`); returns the
    traced model. Without ``linear_rule`` the only operations allowed to stay without a rule are
    ``nn.Linear`` / ``nn.Conv2d`` modules (a hook composite gives them theirs): anything else is
    an error, never a plain gradient."""
    if not isinstance(similarity, CLIPSimilarity):
        raise TypeError(f"similarity must be a CLIPSimilarity, got {type(similarity).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the list of unhandled operations is checked below
        traced = lrp.register(similarity, dummy_inputs=similarity.dummy_inputs(image, text))
    hooked = {f"module {t.__name__}" for t in HOOKED_TYPES}
    other = [r for r in lrp.operations if r.status == _fx.UNHANDLED and r.label not in hooked]
    if other:
        lrp.remove()
        listed = ", ".join(f"{r.node} ({r.label}: {r.detail})" for r in other)
        raise ValueError(f"operations on the relevance path without an LRP rule (besides the Linear / "
                         f"Conv2d modules a hook composite covers): {listed}")
    return traced
