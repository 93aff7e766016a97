"""``from lxt.explicit.models.llama import LlamaForCausalLM, attnlrp``: transformers' own Llama
classes (TinyLlama, Llama 2 and 3 share them) and the AttnLRP patch in the relevance view."""
from transformers import LlamaForCausalLM, LlamaModel  # noqa: F401

from ._attnlrp import AttnLRP

attnlrp = AttnLRP("attnlrp")
cp_lrp = AttnLRP("cp-lrp")

__all__ = ["LlamaForCausalLM", "LlamaModel", "attnlrp", "cp_lrp"]
