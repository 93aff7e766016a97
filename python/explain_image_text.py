"""Explain a CLIP / SigLIP model: a batch of images against every caption, and a contrast; one PNG grid.

What this adds to ``lrp-kernels explain-image`` (one image, one caption per call): one forward
of the whole batch under :func:`lrp_kernels.patch`, then one backward per caption over all
images at once (rows of ``logits_per_image`` are independent: each image gets the relevance it
gets alone), and a *contrast* ``logit(caption 0) - logit(caption 1)``: "why a dog rather than a
cat". The backward is linear in its seed, so the contrast's heatmap is exactly the difference of
the two captions' heatmaps; the script checks it. The grid has one row per image and one column
per caption, then the contrast, on one colour scale (red: for, blue: against).

Only the pixels require grad here (the captions are constants), so by the uniform rule of the
similarity they receive its whole relevance (``explain_image`` reads the tokens too, half each).

Usage::

    python python/explain_image_text.py --out grid.png                   # tiny random CLIP
    python python/explain_image_text.py --model ./clip --image dog.jpg --image cat.jpg \\
        --caption "a dog" --caption "a cat" --caption "a car" --out grid.png

``--model``: a local ``CLIPModel`` / ``SiglipModel`` folder with its image processor and
tokenizer (nothing is fetched from a hub). Without it a tiny random CLIP and random images are
used (for a demo of the mechanics; the heatmaps of random weights mean nothing).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lrp_kernels  # noqa: E402
from lrp_kernels.explanations.image import load_image  # noqa: E402
from lrp_kernels.explanations.imaging import imgify  # noqa: E402

WORDS = ("a", "an", "the", "photo", "of", "dog", "cat", "car")


def tiny_clip(seed: int = 0):
    """A tiny random ``CLIPModel`` and a word-level tokenizer over ``WORDS`` (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|startoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(layers, vocab_size=len(vocab), max_position_embeddings=16,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(layers, image_size=32, patch_size=8), projection_dim=16)
    return CLIPModel(config).eval(), tokenizer


def load(path: Optional[str]):
    """(model, image processor or None, tokenizer) from a local folder, or the tiny demo model."""
    if path is None:
        model, tokenizer = tiny_clip()
        return model, None, tokenizer
    if not os.path.isdir(path):
        raise SystemExit(f"--model must be a local model folder, got {path!r}")
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
    model = AutoModel.from_pretrained(path).eval()
    if model.config.model_type not in ("clip", "siglip"):
        raise SystemExit(f"--model must be a CLIP or SigLIP model, got a {model.config.model_type!r} model")
    return model, AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def pixel_batch(model, processor, paths: Sequence[str], seed: int = 1) -> torch.Tensor:
    """``[B, 3, H, W]`` pixel values of the image files (random images without files)."""
    if not paths:
        size = model.config.vision_config.image_size
        return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    if processor is None:
        raise SystemExit("--image needs --model (a folder with its image processor)")
    images = [load_image(p) for p in paths]  # a clear error for a bad image
    return processor(images=images, return_tensors="pt")["pixel_values"]


def explain(model, tokenizer, pixels: torch.Tensor, captions: List[str]):
    """Per-caption pixel relevance ``[C + 1, B, H, W]`` (the last: the contrast caption 0 vs 1),
    the logits ``[B, C]``, and the largest difference between the contrast's heatmap and the
    difference of the two captions' heatmaps."""
    siglip = model.config.model_type == "siglip"
    text = tokenizer(captions, padding="max_length" if siglip else True, truncation=True,
                     max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
    text = {k: v for k, v in text.items() if k in ("input_ids", "attention_mask")}
    with lrp_kernels.patch(model):
        x = pixels.to(next(model.parameters()).dtype).requires_grad_(True)
        logits = model(pixel_values=x, **text).logits_per_image          # one forward: [B, C]
        seeds = [logits[:, c].sum() for c in range(len(captions))]       # rows are independent
        seeds.append((logits[:, 0] - logits[:, 1]).sum())                # the contrast
        maps = []
        for seed in seeds:
            g, = torch.autograd.grad(seed, x, retain_graph=True)
            maps.append((x.detach() * g).sum(1))                          # [B, H, W]
    maps = torch.stack(maps)
    gap = float((maps[-1] - (maps[0] - maps[1])).abs().max())
    return maps, logits.detach(), gap


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local CLIP / SigLIP folder (default: a tiny random CLIP)")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for a batch)")
    parser.add_argument("--caption", action="append", default=None, help="a caption (repeat; at least two)")
    parser.add_argument("--out", default="image_text_grid.png", help="the PNG grid to write")
    parser.add_argument("--scale", type=int, default=4, help="pixel size in the grid (default: 4)")
    args = parser.parse_args(argv)
    captions = args.caption or ["a photo of a dog", "a photo of a cat", "a photo of a car"]
    if len(captions) < 2:
        raise SystemExit("give at least two --caption (the contrast is caption 0 vs caption 1)")
    model, processor, tokenizer = load(args.model)
    pixels = pixel_batch(model, processor, args.image)
    maps, logits, gap = explain(model, tokenizer, pixels, captions)
    probs = torch.sigmoid(logits) if model.config.model_type == "siglip" else logits.softmax(-1)
    for i in range(len(pixels)):
        row = ", ".join(f"{c!r} {p:.3f}" for c, p in zip(captions, probs[i].tolist()))
        print(f"image {i}: {row}")
    print(f"contrast {captions[0]!r} vs {captions[1]!r}: its heatmap minus the difference of the two "
          f"heatmaps, max |.| = {gap:.2e}")
    cells = [maps[c, i] for i in range(len(pixels)) for c in range(len(maps))]
    imgify(cells, grid=(len(pixels), len(maps)), scale=args.scale).save(args.out)
    print(f"wrote {args.out} (rows: images; columns: {', '.join(map(repr, captions))}, contrast)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
