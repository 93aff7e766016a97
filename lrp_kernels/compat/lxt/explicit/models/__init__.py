"""LXT's ``lxt.explicit.models``: AttnLRP for Hugging Face models, ``attnlrp.register(model)``.

LXT ships modified copies of the transformers model code; here the stock transformers classes
are used and :func:`lrp_kernels.patch` puts the rules on one model instance, in the
*relevance view* LXT's explicit code expects: after ``logit.backward(logit)``,
``inputs_embeds.grad`` is the relevance. Our main API's default is the gradient view
(``relevance = inputs_embeds * inputs_embeds.grad`` after ``logit.backward()``), which needs no
output-dependent seed; both give the same relevance.
"""
from ._attnlrp import AttnLRP  # noqa: F401

__all__ = ["AttnLRP"]
