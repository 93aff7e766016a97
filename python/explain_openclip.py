"""Explain an OpenCLIP image-text similarity with AttnLRP + gamma rules; save the gamma grid as one PNG.

The workflow of LXT's OpenCLIP quickstart, on our rules: trace the model once
(:mod:`lrp_kernels.explicit.openclip`: AttnLRP on every ``nn.MultiheadAttention``, identity on
LayerNorm / GELU, epsilon on the residual sums, uniform-epsilon on the similarity product), then
for every ``(conv gamma, linear gamma)`` put Gamma rules on the ``nn.Conv2d`` patch embedding and
every ``nn.Linear`` (MLPs and attention out-projections) with a Zennit-style
:class:`~lrp_kernels.hooks.composites.LayerMapComposite`, explain the similarity of the image
with one caption among several, and remove the hooks again. Relevance view: ``image.grad`` is
the pixel relevance, the caption's token-embedding ``.grad`` (summed over features) the token
relevance. Rows of the grid: conv gamma; columns: linear gamma.

Tracing (not patching), because OpenCLIP is plain PyTorch code: its residual sums, the final
``F.normalize`` and the similarity product are written in ``forward`` and only a traced graph
gives each its exact rule (see :mod:`lrp_kernels.explicit.openclip`).

Usage::

    python python/explain_openclip.py --out openclip_gamma_grid.png     # random ViT-S-32, random image
    python python/explain_openclip.py --model ViT-B-32 --weights open_clip_model.safetensors \\
        --image cat_dog.jpg --captions "a dog" "a cat" "a car" --target 0

Needs ``open_clip_torch`` and ``torchvision`` beside a matching torch (README, "OpenCLIP"). No
weights are downloaded: without ``--weights`` the model is randomly initialised (the heatmaps
then show the mechanics, not a trained model's evidence); ``--weights`` is a local file.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lrp_kernels.explanations.imaging import imgify  # noqa: E402
from lrp_kernels.explicit import openclip as lrp_openclip  # noqa: E402
from lrp_kernels.hooks import Gamma, LayerMapComposite  # noqa: E402

DEFAULT_CAPTIONS = ("a dog", "a cat", "a car")
DEFAULT_CONV_GAMMAS = (0.1, 0.5, 100.0)
DEFAULT_LINEAR_GAMMAS = (0.0, 0.05, 1.0)


def load_model(name: str, weights: Optional[str] = None, image_size: Optional[int] = None,
               context_length: Optional[int] = None, seed: int = 0):
    """``(model, tokenizer)`` of an open_clip config; random weights unless ``weights`` (a local file)."""
    import open_clip
    if weights is not None and not os.path.isfile(weights):
        raise SystemExit(f"--weights must be a local file, got {weights!r}")
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=weights, force_image_size=image_size,
                                   force_context_length=context_length)
    return model.eval(), open_clip.get_tokenizer(name, context_length=context_length)


def image_size_of(model: nn.Module) -> Tuple[int, int]:
    size = model.visual.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def load_image(path: Optional[str], model: nn.Module) -> torch.Tensor:
    """``[1, 3, H, W]`` at the model's resolution, normalised as OpenCLIP's preprocessing; random
    pixels when ``path`` is None."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    h, w = image_size_of(model)
    if path is None:
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    else:
        import numpy as np
        from PIL import Image
        img = Image.open(path).convert("RGB").resize((w, h), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    mean = torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_DATASET_STD)[:, None, None]
    return (x - mean) / std


def explain(traced: nn.Module, similarity: lrp_openclip.CLIPSimilarity, image: torch.Tensor,
            tokens: torch.Tensor, target: int, conv_gamma: float, linear_gamma: float
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pixel relevance [H, W], token relevance [context], similarities [n_captions])`` of the
    similarity of ``image`` with caption ``target``, Gamma on Conv2d / Linear."""
    comp = LayerMapComposite([(nn.Conv2d, Gamma(conv_gamma)), (nn.Linear, Gamma(linear_gamma))])
    with comp.context(traced):
        x = image.clone().requires_grad_(True)
        emb = similarity.embed(tokens).detach().requires_grad_(True)
        sims = traced(x, emb, tokens)
        sims[0, target].backward()   # relevance view: the seed 1 is the relevance of the similarity
    return x.grad[0].sum(0), emb.grad[target].sum(-1), sims[0].detach()


def token_relevance(tokenizer, ids: torch.Tensor, relevance: torch.Tensor) -> List[Tuple[str, float]]:
    """``(token, relevance)`` from the start token to the end token (the pooled position)."""
    end = int(ids.argmax())
    decode = getattr(tokenizer, "decode", None)
    out = []
    for i in range(end + 1):
        tid = int(ids[i])
        text = decode([tid]).strip() if decode is not None else str(tid)
        out.append((text or str(tid), float(relevance[i])))
    return out


def grid_search(traced, similarity, image, tokens, target: int, conv_gammas: Sequence[float],
                linear_gammas: Sequence[float], verbose: bool = True):
    """One pixel heatmap per ``(conv gamma, linear gamma)`` (each divided by its max |R|), and
    the token relevance of each cell."""
    heatmaps, texts = [], []
    for cg, lg in itertools.product(conv_gammas, linear_gammas):
        rel, tok_rel, _ = explain(traced, similarity, image, tokens, target, cg, lg)
        if not (torch.isfinite(rel).all() and torch.isfinite(tok_rel).all()):
            raise RuntimeError(f"non-finite relevance for conv gamma {cg}, linear gamma {lg}")
        if verbose:
            print(f"conv gamma {cg:<6g} linear gamma {lg:<6g} sum R pixels = {rel.sum().item():+.4g}  "
                  f"sum R tokens = {tok_rel.sum().item():+.4g}")
        m = rel.abs().max()
        heatmaps.append(rel / m if m > 0 else rel)
        texts.append(tok_rel)
    return heatmaps, texts


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-S-32", help="open_clip config name (default: ViT-S-32, the smallest ViT)")
    ap.add_argument("--weights", default=None, help="local open_clip checkpoint file (default: random weights)")
    ap.add_argument("--image", default=None, help="image file (default: random pixels)")
    ap.add_argument("--captions", nargs="+", default=list(DEFAULT_CAPTIONS))
    ap.add_argument("--target", type=int, default=0, help="index of the caption to explain")
    ap.add_argument("--rule", choices=("attnlrp", "cp-lrp"), default="attnlrp")
    ap.add_argument("--conv-gammas", type=float, nargs="+", default=list(DEFAULT_CONV_GAMMAS))
    ap.add_argument("--linear-gammas", type=float, nargs="+", default=list(DEFAULT_LINEAR_GAMMAS))
    ap.add_argument("--image-size", type=int, default=None, help="force the model's image size (smaller: faster)")
    ap.add_argument("--context-length", type=int, default=None, help="force the text context length")
    ap.add_argument("--scale", type=int, default=2, help="pixels per heatmap pixel in the PNG")
    ap.add_argument("--out", default="openclip_gamma_grid.png")
    args = ap.parse_args(argv)
    if not 0 <= args.target < len(args.captions):
        raise SystemExit(f"--target must index --captions (0..{len(args.captions) - 1}), got {args.target}")

    start = time.perf_counter()
    model, tokenizer = load_model(args.model, args.weights, args.image_size, args.context_length)
    image = load_image(args.image, model)
    similarity = lrp_openclip.CLIPSimilarity(model)
    tokens = similarity.trim(tokenizer(args.captions))  # no padding after the last end token: same result
    lrp = lrp_openclip.composite(rule=args.rule)
    traced = lrp_openclip.register(lrp, similarity, image, tokens)
    try:
        heatmaps, texts = grid_search(traced, similarity, image, tokens, args.target, args.conv_gammas,
                                      args.linear_gammas)
        with torch.no_grad():
            sims = traced(image, similarity.embed(tokens), tokens)[0]
    finally:
        lrp.remove()
    grid = (len(args.conv_gammas), len(args.linear_gammas))
    imgify(heatmaps, vmin=-1.0, vmax=1.0, grid=grid, scale=args.scale).save(args.out)
    for caption, s in zip(args.captions, sims.tolist()):
        print(f"similarity {s:+.4f}  {caption!r}" + ("   <- explained" if caption == args.captions[args.target] else ""))
    print(f"token relevance of {args.captions[args.target]!r} (first grid cell):")
    for text, r in token_relevance(tokenizer, tokens[args.target], texts[0]):
        print(f"  {text:<16} {r:+.4g}")
    print(f"wrote {args.out} (rows: conv gamma {args.conv_gammas}; columns: linear gamma {args.linear_gammas}) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
