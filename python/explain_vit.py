"""Explain a Hugging Face ViT image classifier with AttnLRP + gamma rules; save a heatmap grid.

Vision transformers suffer from gradient shattering: plain LRP heatmaps are noisy. The gamma
rule on the linear layers and on the patch-embedding convolution denoises them, but its
``gamma`` must be tuned, so this script runs a small grid search over ``(conv gamma, linear
gamma)`` and saves one heatmap per pair in a grid (rows: conv gamma, columns: linear gamma).

Rules (gradient view, relevance = pixels * pixels.grad):

* attention, LayerNorm, GELU, residuals: :func:`lrp_kernels.hf.patching` (AttnLRP);
* ``nn.Linear`` and the patch-embedding ``nn.Conv2d``: :class:`lrp_kernels.hooks.rules.Gamma`
  through :class:`lrp_kernels.hooks.composites.LayerMapComposite`, registered on top of the
  patch and removed after each grid cell (the patch stays).

Usage::

    python python/explain_vit.py --out heatmap.png                  # tiny random ViT (no download)
    python python/explain_vit.py --model /path/to/vit-checkpoint --image cat.jpg --target 281
    python python/explain_vit.py --conv-gammas 0.1 0.5 100 --linear-gammas 0 0.01 0.05 0.1 1

Any local ``ViTForImageClassification`` checkpoint directory works (weights are never fetched
from a hub by this script). Without ``--image`` a random image is used; without ``--target``
the predicted class is explained.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lrp_kernels.hooks.composites import LayerMapComposite  # noqa: E402
from lrp_kernels.explanations.imaging import imgify  # noqa: E402
from lrp_kernels.hooks.rules import Gamma  # noqa: E402

DEFAULT_CONV_GAMMAS = (0.1, 0.5, 100.0)
DEFAULT_LINEAR_GAMMAS = (0.0, 0.01, 0.05, 0.1, 1.0)


def tiny_vit(seed: int = 0, image_size: int = 32, patch_size: int = 4) -> nn.Module:
    """A small randomly initialised ViT classifier (for demos and tests; nothing downloaded)."""
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=image_size, patch_size=patch_size, num_channels=3, num_labels=10)
    return ViTForImageClassification(cfg).eval()


def load_model(path: Optional[str]) -> nn.Module:
    if path is None:
        return tiny_vit()
    if not os.path.isdir(path):
        raise SystemExit(f"--model must be a local checkpoint directory, got {path!r}")
    from transformers import ViTForImageClassification
    return ViTForImageClassification.from_pretrained(path).eval()


def load_image(path: Optional[str], model: nn.Module) -> torch.Tensor:
    """``[1, C, H, W]`` pixel values at the model's resolution (random when ``path`` is None)."""
    cfg = model.config
    size, channels = cfg.image_size, cfg.num_channels
    if path is None:
        return torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    import numpy as np
    from PIL import Image
    img = Image.open(path).convert("RGB").resize((size, size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return (x - 0.5) / 0.5  # the usual ViT normalisation (mean 0.5, std 0.5)


def attnlrp_patch(model: nn.Module, use_patch: bool = True):
    """The AttnLRP patch of :mod:`lrp_kernels` (None when disabled or unavailable)."""
    if not use_patch:
        return None
    try:
        from lrp_kernels import patch
    except ImportError:  # older checkout without model patches: gamma rules alone
        print("lrp_kernels.hf.patching unavailable: using the gamma rules alone", file=sys.stderr)
        return None
    return patch(model)


def explain(model: nn.Module, pixels: torch.Tensor, target: Optional[int], conv_gamma: float,
            linear_gamma: float) -> Tuple[torch.Tensor, int]:
    """Pixel relevance ``[H, W]`` (summed over channels) for one gamma pair; the class explained."""
    comp = LayerMapComposite([
        (nn.Conv2d, Gamma(conv_gamma, relevance=False)),
        (nn.Linear, Gamma(linear_gamma, relevance=False)),
    ])
    with comp.context(model):
        x = pixels.clone().requires_grad_(True)
        logits = model(pixel_values=x).logits
        cls = int(logits[0].argmax()) if target is None else target
        logits[0, cls].backward()
    relevance = (x.detach() * x.grad)[0].sum(0)
    return relevance, cls


def grid_search(model: nn.Module, pixels: torch.Tensor, target: Optional[int],
                conv_gammas: Sequence[float], linear_gammas: Sequence[float],
                verbose: bool = True) -> List[torch.Tensor]:
    heatmaps = []
    for cg, lg in itertools.product(conv_gammas, linear_gammas):
        rel, cls = explain(model, pixels, target, cg, lg)
        if not torch.isfinite(rel).all():
            raise RuntimeError(f"non-finite relevance for conv gamma {cg}, linear gamma {lg}")
        if verbose:
            print(f"conv gamma {cg:<6g} linear gamma {lg:<6g} class {cls}  sum R = {rel.sum().item():+.4g}")
        m = rel.abs().max()
        heatmaps.append(rel / m if m > 0 else rel)
    return heatmaps


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="local ViTForImageClassification checkpoint (default: tiny random ViT)")
    ap.add_argument("--image", default=None, help="image file (default: random pixels)")
    ap.add_argument("--target", type=int, default=None, help="class to explain (default: the prediction)")
    ap.add_argument("--conv-gammas", type=float, nargs="+", default=list(DEFAULT_CONV_GAMMAS))
    ap.add_argument("--linear-gammas", type=float, nargs="+", default=list(DEFAULT_LINEAR_GAMMAS))
    ap.add_argument("--no-patch", action="store_true", help="gamma rules only (no AttnLRP patch)")
    ap.add_argument("--scale", type=int, default=4, help="pixels per heatmap pixel in the image")
    ap.add_argument("--out", default="vit_gamma_search.png")
    args = ap.parse_args(argv)

    model = load_model(args.model)
    pixels = load_image(args.image, model)
    handle = attnlrp_patch(model, not args.no_patch)
    try:
        heatmaps = grid_search(model, pixels, args.target, args.conv_gammas, args.linear_gammas)
    finally:
        if handle is not None:
            handle.remove()
    grid = (len(args.conv_gammas), len(args.linear_gammas))
    imgify(heatmaps, vmin=-1.0, vmax=1.0, grid=grid, scale=args.scale).save(args.out)
    print(f"wrote {args.out} (rows: conv gamma {args.conv_gammas}; columns: linear gamma {args.linear_gammas})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
