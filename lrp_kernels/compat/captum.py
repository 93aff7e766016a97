"""AttnLRP as a Captum attribution method (optional extra ``pip install lrp-kernels[captum]``).

Two classes; everything else is Captum's own (its input types, result type and plots)::

    from captum.attr import LLMGradientAttribution, TextTokenInput
    from lrp_kernels.compat.captum import AttnLRP, LLMAttnLRP

    lrp = AttnLRP(model)                              # a Captum GradientAttribution
    lrp.attribute(input_ids, target=token_id)         # [batch, tokens, hidden]: next-token logit

    llm = LLMAttnLRP(lrp, tokenizer)                  # Captum's LLM wrapper, AttnLRP inside
    res = llm.attribute(TextTokenInput(prompt, tokenizer), target=" 42 ;")
    res.token_attr, res.seq_attr                      # [answer tokens, prompt tokens], [prompt tokens]
    res.plot_token_attr(); res.plot_seq_attr()

:class:`AttnLRP` is Captum's :class:`~captum.attr.LayerGradientXActivation` on the input
embeddings of the model patched with :func:`lrp_kernels.patch` for the duration of each call:
in the gradient view of docs/math.md, gradient x input of the patched model *is* the AttnLRP
relevance, so Captum's own machinery computes it. Being a ``LayerGradientXActivation`` it is
accepted by Captum's stock :class:`~captum.attr.LLMGradientAttribution`, which explains the
**log-probability** of each answer token (Captum's convention; the log-softmax adds an implicit
contrast against every other token, see :mod:`lrp_kernels.explanations.api`). Called directly
on a model, ``forward_func`` is the model's next-token logits, as :func:`lrp_kernels.explain`.

:class:`LLMAttnLRP` is an :class:`~captum.attr.LLMGradientAttribution` that explains each
answer token's **logit** (the quantity LRP conserves; row ``k`` equals
``lrp_kernels.explain(model, tokenizer, prefix, target=token_k)``) and computes all rows from
one forward and one input-only backward per token
(:func:`~lrp_kernels.explanations.matrix.explain_matrix`), instead of Captum's one forward and
backward per token of the whole prefix.

This module lives in ``compat`` because it adapts lrp_kernels to another library's interface
(its users keep Captum's tooling); the rules are the main package's.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

try:
    from captum.attr import LayerGradientXActivation, LLMAttributionResult, LLMGradientAttribution
    from captum.attr._core.llm_attr import _convert_ids_to_pretty_tokens
except ImportError as err:  # pragma: no cover - the extra is missing
    raise ImportError("lrp_kernels.compat.captum needs Captum: pip install 'lrp-kernels[captum]' "
                      "(or pip install 'captum>=0.7')") from err

from ..explanations import api as _api
from ..explanations.matrix import _rows

__all__ = ["AttnLRP", "LLMAttnLRP"]


class _NextTokenLogits(nn.Module):
    """``forward_func`` for direct calls: the logits of the next token, ``[batch, vocab]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *args: Any) -> torch.Tensor:
        return self.model(input_ids, *args).logits[:, -1]


class AttnLRP(LayerGradientXActivation):
    """AttnLRP relevance of the input embeddings, as a Captum ``GradientAttribution``.

    ``model``: a Hugging Face causal LM (what Captum's LLM wrappers need: ``generate``,
    ``device``). ``layer``: the layer whose output is attributed (default: the input
    embeddings, where :func:`lrp_kernels.explain` measures relevance). ``rules``, ``epsilon``,
    ``backend`` and ``strict`` go to :func:`lrp_kernels.patch` (the model is patched for each
    call only; a model the caller has patched already is used as it is).
    """

    def __init__(self, model: nn.Module, layer: Optional[nn.Module] = None, *,
                 rules: str = "attnlrp", epsilon: Optional[float] = None,
                 backend: Optional[str] = None, strict: bool = True) -> None:
        if not isinstance(model, nn.Module) or not hasattr(model, "get_input_embeddings"):
            raise TypeError("model must be a Hugging Face model (an nn.Module with "
                            f"get_input_embeddings), got {type(model).__name__}")
        if rules not in _api.LRP_RULES:
            raise _api.ExplainError(f"rules must be one of {_api.LRP_RULES} (for plain gradient x "
                                    f"input use Captum's InputXGradient), got {rules!r}")
        _api._check_options(rules, epsilon, None, strict)
        layer = model.get_input_embeddings() if layer is None else layer
        super().__init__(model, layer, multiply_by_inputs=True)
        self.lrp_model, self.rules, self.epsilon = model, rules, epsilon
        self.backend, self.strict = backend, strict

    def attribute(self, inputs, target=None, additional_forward_args=None,
                  attribute_to_layer_input: bool = False,
                  grad_kwargs: Optional[Dict[str, Any]] = None):
        """Relevance of ``layer``'s output (``[batch, tokens, hidden]``; sum the last dim for
        token relevance) for ``target`` of ``forward_func``'s output: a token id of the
        next-token logits when called on the model directly; inside Captum's LLM wrappers the
        quantity they choose. Arguments as Captum's ``LayerGradientXActivation.attribute``."""
        runner = self
        if self.forward_func is self.lrp_model:  # direct call: next-token logits
            runner = copy.copy(self)
            runner.forward_func = _NextTokenLogits(self.lrp_model)
        with _api._patch_context(self.lrp_model, self.rules, self.epsilon, self.backend,
                                 self.strict), _api._backend_context(self.backend), \
                _api._keep_parameters(self.lrp_model), torch.enable_grad():
            out = LayerGradientXActivation.attribute(
                runner, inputs, target=target, additional_forward_args=additional_forward_args,
                attribute_to_layer_input=attribute_to_layer_input, grad_kwargs=grad_kwargs)
        # detached: a result that keeps the forward graph alive would hold its memory
        return tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()


class LLMAttnLRP(LLMGradientAttribution):
    """Captum's LLM attribution with AttnLRP: each answer token's logit explained, all rows
    from one forward (see the module docstring). ``attr_method``: an :class:`AttnLRP` (or a
    model, wrapped in one); ``tokenizer``: the model's tokenizer."""

    def __init__(self, attr_method: Union[AttnLRP, nn.Module], tokenizer: Any) -> None:
        if not isinstance(attr_method, AttnLRP):
            attr_method = AttnLRP(attr_method)
        super().__init__(attr_method, tokenizer)
        self.lrp = attr_method

    def attribute(self, inp, target: Union[str, torch.Tensor, None] = None,
                  gen_args: Optional[Dict[str, Any]] = None, **kwargs: Any) -> LLMAttributionResult:
        """Captum's ``LLMGradientAttribution.attribute``: ``inp`` a ``TextTokenInput``,
        ``target`` the answer (a string, token ids, or None: generated with ``gen_args``).
        ``token_attr[k]`` is the relevance of each (not skipped) prompt token for answer token
        ``k``'s logit; ``seq_attr`` their sum, the relevance for the answer's logit sum."""
        if kwargs:
            raise TypeError(f"LLMAttnLRP.attribute takes no options of the attribution method, "
                            f"got {sorted(kwargs)}")
        target_tokens = self._get_target_tokens(inp, target, gen_args)
        if target_tokens.numel() == 0:
            raise ValueError("target has no tokens: there is nothing to explain")
        prompt_ids = inp.to_model_input().reshape(-1).tolist()
        lrp = self.lrp
        with _api._keep_parameters(self.model):
            rows = _rows(self.model, prompt_ids, target_tokens.reshape(-1).tolist(),
                         rules=lrp.rules, epsilon=lrp.epsilon, backend=lrp.backend,
                         strict=lrp.strict, memory_budget=None, progress=None)
        # relevance of the prompt tokens only: Captum's results do not attribute to earlier
        # answer tokens
        attr = rows.relevance[:, :len(prompt_ids)]
        if getattr(inp, "itp_mask", None) is not None:
            attr = attr[:, inp.itp_mask.reshape(-1).cpu()]
        return LLMAttributionResult(
            seq_attr=attr.sum(0), token_attr=attr, input_tokens=inp.values,
            output_tokens=_convert_ids_to_pretty_tokens(target_tokens, self.tokenizer))
