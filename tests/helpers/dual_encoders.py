"""Helpers: tiny CLIP / SigLIP dual encoders and DINOv2 (random weights, float64), their inputs
(padded captions, a batch of images), and the independent plain-torch reference of the rules
for what :mod:`tests.helpers.models` does not cover: the image-text head and SigLIP's
attention-pooling ``nn.MultiheadAttention``.

Reference of the head (eps -> 0), written from the rule, not from lrp_kernels:
``unit(x) = x / |x|.detach()`` (identity rule on the division), ``_umm`` for the similarity
(half each side), ``exp(logit_scale)`` and ``logit_bias`` constants. Reference of the probe
attention: the probe's query is a constant, so ``q @ k^T`` keeps its plain gradient (all to the
key), softmax plain (Deep Taylor in the gradient view), ``_umm(P, V)`` (CP-LRP: ``P`` detached),
projections plain.
"""
from __future__ import annotations

import torch
import transformers as tr
from torch import nn

from helpers.models import _umm, reference_model

TEXT = dict(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, num_channels=3)
EOS = 1  # also the padding id, as in CLIP's tokenizer


def _randomize_biases(model: nn.Module) -> None:
    """Random biases and scales, so bias and normalisation terms of the rules matter."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("logit_scale") or name.endswith("lambda1"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1.0 if name.endswith("lambda1") else 0))


def build_dual(name: str) -> nn.Module:
    """A tiny float64 ``CLIPModel`` ("clip") or ``SiglipModel`` ("siglip"), eval mode."""
    torch.manual_seed(0)
    if name == "clip":
        config = tr.CLIPConfig(text_config=dict(TEXT, eos_token_id=EOS, bos_token_id=0, pad_token_id=EOS),
                               vision_config=VISION, projection_dim=16)
        model = tr.CLIPModel(config)
    elif name == "siglip":
        config = tr.SiglipConfig(text_config=dict(TEXT, eos_token_id=EOS, bos_token_id=0, pad_token_id=EOS),
                                 vision_config=VISION)
        model = tr.SiglipModel(config)
    else:
        raise KeyError(name)
    model = model.double().eval()
    _randomize_biases(model)
    return model


def build_dinov2(swiglu: bool = False, classifier: bool = True) -> nn.Module:
    torch.manual_seed(0)
    config = tr.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                             image_size=32, patch_size=8, use_swiglu_ffn=swiglu, num_labels=3)
    model = (tr.Dinov2ForImageClassification if classifier else tr.Dinov2Model)(config).double().eval()
    _randomize_biases(model)
    return model


def captions(batch: int = 3, n: int = 7, seed: int = 1) -> dict:
    """Token ids ``[BOS, words..., EOS, pad...]``: caption i has ``n - i`` real tokens (right padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, n), EOS, dtype=torch.long)
    mask = torch.zeros(batch, n, dtype=torch.long)
    for i in range(batch):
        length = n - i
        ids[i, 0] = 0
        ids[i, 1:length - 1] = torch.randint(2, 60, (length - 2,), generator=g)
        mask[i, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def images(batch: int = 2, size: int = 32, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)


class TokenLeaf:
    """Forward hook on a token-embedding layer: its output becomes a fresh leaf that requires
    grad (``self.embeds``), so the relevance of the token embeddings is ``embeds * embeds.grad``."""

    def __init__(self, layer: nn.Module):
        self.embeds = None
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.embeds = out.detach().requires_grad_(True)
        return self.embeds

    def remove(self) -> None:
        self.handle.remove()


def token_layer(model: nn.Module) -> nn.Module:
    return model.text_model.embeddings.token_embedding


def similarity_relevance(model, text: dict, pixels: torch.Tensor, pick: torch.Tensor, with_text: bool = True):
    """Relevance of the pixels and of the token embeddings (summed over the hidden dim) for
    ``sum_i logits_per_image[i, pick[i]]``, one backward; and the logits."""
    x = pixels.clone().requires_grad_(True)
    leaf = TokenLeaf(token_layer(model)) if with_text else None
    try:
        out = model(pixel_values=x, **text)
    finally:
        if leaf is not None:
            leaf.remove()
    logits = out.logits_per_image
    logits[torch.arange(len(pick)), pick].sum().backward()
    pix = (x * x.grad).detach()
    tok = (leaf.embeds * leaf.embeds.grad).sum(-1).detach() if with_text else None
    return pix, tok, logits.detach()


def _reference_probe_attention(m: nn.MultiheadAttention, rule: str):
    def forward(query, key, value, **kwargs):
        (wq, wk, wv), (bq, bk, bv) = m.in_proj_weight.chunk(3), m.in_proj_bias.chunk(3)
        h, d = m.num_heads, m.head_dim

        def split(t):
            return t.unflatten(-1, (h, d)).transpose(1, 2)
        q, k, v = split(query @ wq.T + bq), split(key @ wk.T + bk), split(value @ wv.T + bv)
        assert not q.requires_grad  # the probe is a constant
        p = torch.softmax((q @ k.transpose(-1, -2)) * d ** -0.5, -1)
        o = (_umm(p, v) if rule == "attnlrp" else p.detach() @ v).transpose(1, 2).flatten(-2)
        return o @ m.out_proj.weight.T + m.out_proj.bias, None
    return forward


def reference_tower(model, rule: str = "attnlrp") -> nn.Module:
    """:func:`helpers.models.reference_model` plus the probe attention's reference."""
    ref = reference_model(model, rule)
    for m in ref.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.forward = _reference_probe_attention(m, rule)
    return ref


def reference_dual(model, rule: str = "attnlrp"):
    """Independent reference of a patched dual encoder: the towers by
    :func:`helpers.models.reference_model`, the head and the probe attention as described in
    the module docstring; returns a callable with the model's call signature."""
    ref = reference_tower(model, rule)
    siglip = isinstance(ref, tr.SiglipModel)

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True).detach()

    class Out:
        pass

    def call(pixel_values, input_ids, attention_mask):
        if siglip:
            i = ref.vision_model(pixel_values=pixel_values).pooler_output
            t = ref.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        else:
            i = ref.visual_projection(ref.vision_model(pixel_values=pixel_values).pooler_output)
            t = ref.text_projection(ref.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)
        s = _umm(unit(t), unit(i).T) * ref.logit_scale.exp()
        if siglip:
            s = s + ref.logit_bias
        out = Out()
        out.logits_per_image = s.T
        return out
    call.text_model = ref.text_model  # for token_layer
    return call


# ---- model folders for the image API and CLI (no hub: tokenizer and image processor built here) ----

WORDS = ("a", "dog", "cat", "car", "photo", "of", "the")


def tiny_tokenizer():
    """A CLIP BPE tokenizer over letters plus the whole words of ``WORDS`` (vocab < 60 ids,
    ``<|endoftext|>`` = 1 = EOS and padding, as the tiny text towers expect)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": EOS}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
    merges = []
    for word in WORDS[1:]:  # merge letter by letter into the word (end-of-word marked)
        piece = word[0]
        for i, c in enumerate(word[1:], 1):
            right = c + ("</w>" if i == len(word) - 1 else "")
            merges.append((piece, right))
            piece = piece + right
            vocab.setdefault(piece, len(vocab))
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c + "</w>", len(vocab))
    vocab = {k: v for k, v in vocab.items() if v < TEXT["vocab_size"]}
    return tr.CLIPTokenizer(vocab=vocab, merges=[m for m in merges if all(p in vocab or p.endswith("</w>") for p in m)])


def image_processor(name: str):
    size = VISION["image_size"]
    if name == "siglip":
        return tr.SiglipImageProcessorPil(size={"height": size, "width": size})
    return tr.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def save_tiny(name: str, folder: str) -> str:
    """``save_pretrained`` a tiny model ("clip", "siglip" or "dinov2": an embedding model), its
    tokenizer (image-text models) and image processor into ``folder``."""
    if name == "dinov2":
        build_dinov2(classifier=False).float().save_pretrained(folder)
        tr.BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
        return folder
    build_dual(name).float().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    image_processor(name).save_pretrained(folder)
    return folder
