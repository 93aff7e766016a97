"""SigLIP (``SiglipModel``, its text and vision towers).

The towers are CLIP's building blocks (:mod:`.clip`) with ``gelu_pytorch_tanh`` (element-wise:
identity rule), a bidirectional text encoder that pools its *last* position (which may be
padding: SigLIP is trained with ``padding="max_length"``, so padding tokens can receive
relevance), a text ``head`` linear (epsilon) and the image-text head of :mod:`.clip` with a
constant ``logit_bias`` (a bias: it keeps its share of the logit, as an epsilon rule's bias does).

The vision tower's attention-pooling head (``SiglipMultiheadAttentionPoolingHead``): a learned
*probe* is the only query of a ``torch.nn.MultiheadAttention`` over the patch tokens. The probe
is a constant, so the query is too: the score ``q . k`` is linear in ``k`` and the key gets the
whole score relevance (the uniform rule gives it all when the other factor is constant; a half
would go to a parameter). Softmax: Deep Taylor, ``P @ V``: uniform (AttnLRP; CP-LRP: ``P``
constant), the in- and out-projections: epsilon. The values of the module's own forward are
returned (bit for bit), the gradient is the rule's: the generic ``nn.MultiheadAttention`` rule of
every patch (:func:`lrp_kernels.hf.installers.install_multihead_attention`).
"""
from __future__ import annotations

import torch

from . import Family
from .clip import install_similarity_head


def _siglip_image(model, pixel_values, interpolate, kwargs):
    return model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate, **kwargs)


def _siglip_text(model, input_ids, attention_mask, position_ids, kwargs):
    return model.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            **kwargs)


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x.norm(p=2, dim=-1, keepdim=True)  # SigLIP's own spelling of the norm


def install_siglip_model(handle, name, module) -> None:
    from transformers.models.siglip.modeling_siglip import SiglipOutput
    install_similarity_head(handle, module, norm=_l2, output_cls=SiglipOutput, image_features=_siglip_image,
                            text_features=_siglip_text, bias="logit_bias")


FAMILY = Family(
    name="siglip",
    model_types=("siglip", "siglip_text_model", "siglip_vision_model"),
    module_rules={"SiglipModel": install_siglip_model},
    # the probe is the pooling head's constant query
    parameter_holders=("SiglipMultiheadAttentionPoolingHead",),
)
