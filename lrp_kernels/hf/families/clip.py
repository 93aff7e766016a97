"""CLIP (``CLIPModel``, its text and vision towers, with or without projection).

Towers: ``quick_gelu`` / ``gelu`` (element-wise: identity rule), LayerNorm (std detached), the
patch-embedding ``Conv2d`` (epsilon, generic), the projections (epsilon), the CLS token and the
position embeddings (additive constants), attention through transformers' AttentionInterface
(causal with padding on the text side). The text tower pools the first end-of-text token
(an index: no rule).

The image-text head, ``logit = exp(s) * <t / |t|, i / |i|>`` (``CLIPModel.forward``), gets its
own forward on the patched instance (same ops, same values, bit for bit):

* **the normalisation** ``x / |x|``: the norm is a constant (identity rule on the division:
  ``G_x = G_y / |x|``, so ``x * G_x = y * G_y`` and the relevance of the unit vector reaches the
  embedding unchanged). The plain gradient would be wrong: ``x / |x|`` is scale-invariant, so
  ``x . d(x / |x|)/dx = 0`` and the plain gradient x input of a cosine similarity sums to zero;
* **the similarity** ``t_hat @ i_hat^T``, a product of two inputs: the uniform rule
  (:func:`lrp_kernels.grad.matmul`), half of each logit's relevance to the text side, half to
  the image side; all of it to the side that requires grad when the other is a constant
  (explaining only the pixels);
* ``exp(logit_scale)`` (and SigLIP's ``logit_bias``): constants.

``return_loss=True`` is refused while patched (an explanation needs no contrastive loss).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from ...ops import grad
from . import Family


def unit(x: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``x / norm(x)`` with the norm a constant (identity rule on the division); the model's own
    ``norm`` keeps the values bit-identical."""
    return x / norm(x).detach()


def install_similarity_head(handle, model, *, norm: Callable, output_cls: type,
                            image_features: Callable, text_features: Callable,
                            bias: Optional[str] = None) -> None:
    """Rebind ``model.forward`` (a CLIP-style dual encoder) to compute the same outputs with the
    rules of the module docstring. ``image_features(model, pixel_values, interpolate, kwargs)`` and
    ``text_features(model, input_ids, attention_mask, position_ids, kwargs)`` return the pooled
    (projected) embeddings; ``bias`` names a logit-bias parameter (SigLIP)."""
    from transformers.utils.generic import can_return_tuple

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                return_loss=None, interpolate_pos_encoding=False, **kwargs):
        if return_loss:
            raise ValueError(f"return_loss=True: {type(self).__name__} is patched by lrp_kernels for "
                             "explaining, which needs no contrastive loss; remove() the patch to train")
        vision = image_features(self, pixel_values, interpolate_pos_encoding, kwargs)
        text = text_features(self, input_ids, attention_mask, position_ids, kwargs)
        image_embeds = unit(vision.pooler_output, norm)
        text_embeds = unit(text.pooler_output, norm)
        logits_per_text = grad.matmul(text_embeds, image_embeds.t().to(text_embeds.device),
                                      epsilon=handle.epsilon, backend=handle.backend)
        logits_per_text = logits_per_text * self.logit_scale.to(text_embeds.device).exp()
        if bias is not None:
            logits_per_text = logits_per_text + getattr(self, bias).to(text_embeds.device)
        return output_cls(loss=None, logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
                          text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text,
                          vision_model_output=vision)

    # return_dict=False -> tuple, as transformers' own forward does
    handle.rebind(model, lambda orig: functools.partial(can_return_tuple(forward), model))


def _clip_image(model, pixel_values, interpolate, kwargs):
    return model.get_image_features(pixel_values=pixel_values, interpolate_pos_encoding=interpolate, **kwargs)


def _clip_text(model, input_ids, attention_mask, position_ids, kwargs):
    return model.get_text_features(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, **kwargs)


def _clip_vector_norm(x: torch.Tensor) -> torch.Tensor:
    # transformers' CLIP spells the norm as pow / sum / pow (for export); the same ops, the same bits
    from transformers.models.clip import modeling_clip
    return modeling_clip._get_vector_norm(x)


def install_clip_model(handle, name, module) -> None:
    from transformers.models.clip.modeling_clip import CLIPOutput
    install_similarity_head(handle, module, norm=_clip_vector_norm, output_cls=CLIPOutput,
                            image_features=_clip_image, text_features=_clip_text)


FAMILY = Family(
    name="clip",
    model_types=("clip", "clip_text_model", "clip_vision_model"),
    module_rules={"CLIPModel": install_clip_model},
    parameter_holders=("CLIPVisionEmbeddings",),
)
