"""``from lxt.explicit.models.mixtral import MixtralForCausalLM, attnlrp``: transformers' own
Mixtral classes and the AttnLRP patch in the relevance view (routing weights are constants,
see :mod:`lrp_kernels.hf.families.mixtral`)."""
from transformers import MixtralForCausalLM, MixtralModel  # noqa: F401

from ._attnlrp import AttnLRP

attnlrp = AttnLRP("attnlrp")
cp_lrp = AttnLRP("cp-lrp")

__all__ = ["MixtralForCausalLM", "MixtralModel", "attnlrp", "cp_lrp"]
