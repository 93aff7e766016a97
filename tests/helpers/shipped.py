"""The model that ships in the repo (lrp_kernels/assets/recall-llama), loaded the one way the
tests need it: float32, eval mode, offline."""
from __future__ import annotations

import os

import torch

from lrp_kernels.cli.explain import SHIPPED_MODEL


def load_shipped():
    """``(model, tokenizer)`` of the shipped recall Llama (float32, eval), never touching a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL, dtype=torch.float32).eval()
    return model, tok
