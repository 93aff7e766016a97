"""``explain_image``: which pixels (and caption tokens) made a vision model say this?

One forward and one backward under :func:`lrp_kernels.patch` (AttnLRP by default)::

    exp = lrp_kernels.explain_image(clip, processor, "dog.jpg", ["a dog", "a cat", "a car"])
    exp.target, exp.probabilities          # 'a dog', [0.93, 0.05, 0.02]
    exp.top_tokens(3)                      # [(index, token, relevance), ...] of the explained caption
    exp.to_png("heatmap.png")              # overlay on the image | plain heatmap, one PNG

What is explained:

* **an image-text model** (``CLIPModel``, ``SiglipModel``) with ``captions``: the similarity
  logit ``logits_per_image[0, c]`` of one caption ``c`` (default: the most likely; ``target=``
  its index or its text). Pixels and the caption's tokens get relevance in the same backward
  (the uniform rule on the similarity splits it half / half between image and text; the
  normalisation of the embeddings is a constant scale, see :mod:`lrp_kernels.hf.families.clip`).
  ``probabilities`` are CLIP's softmax over the captions, or SigLIP's per-caption sigmoid;
* **a classifier** (``ViTForImageClassification``, ``Dinov2ForImageClassification``, ...): one
  class logit (default: the top class; ``target=`` an index or a label name);
* **an embedding model** (``Dinov2Model``, ``CLIPVisionModel(WithProjection)``,
  ``SiglipVisionModel``, ``ViTModel``): the L2 norm of the pooled embedding (``image_embeds``,
  else ``pooler_output``, else the first token). The norm is ``e . (e / |e|)`` with ``e / |e|``
  a constant, so each embedding unit gets ``e_k^2 / |e|``: conservative, whatever the sign.

Images: a path, a ``PIL.Image`` (modes RGB, RGBA, L, LA, P, PA, 1: converted to RGB, alpha
dropped, as transformers' processors do) with a ``processor`` (a transformers processor, or an
image processor; transformers 5 serves CLIP / SigLIP / ViT / DINOv2 ones without torchvision),
or a float tensor of ``pixel_values`` already preprocessed (``[C, H, W]`` or ``[1, C, H, W]`` at
the model's image size). Anything else (no such file, not an image, an unsupported mode such as
16-bit or float images, a wrong tensor shape, NaN) is an :class:`ImageError` naming it.

Pixel relevance is summed over the colour channels, at the model's input resolution; the
overlay uses the image as the model saw it (its pixel values with the processor's
normalisation undone).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .api import ExplainError, LRP_RULES, _keep_parameters, _patch_context, json_text
from .heatmap import clean_tokens
from .imaging import diverging_colors, tile_grid

if TYPE_CHECKING:  # Pillow is imported where an image is read
    import PIL.Image

__all__ = ["explain_image", "ImageExplanation", "ImageError", "IMAGE_MODES"]

#: PIL modes converted to RGB without guessing a scale (others, e.g. "I;16", "F", "CMYK", refused)
IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "1")
DUAL_TYPES = ("clip", "siglip")


class ImageError(ExplainError):
    """The image cannot be used: unreadable, not an image, an unsupported mode, a wrong shape."""


@dataclass
class ImageExplanation:
    """Pixel relevance (``[H, W]``, summed over channels; + for, - against the target) and, for an
    image-text model, the explained caption's token relevance."""
    relevance: torch.Tensor
    image: np.ndarray                      # [H, W, 3] uint8: the image as the model saw it
    target: str                            # caption, class label, or "embedding norm"
    score: float                           # the explained value (logit or norm)
    rules: str = "attnlrp"
    captions: List[str] = field(default_factory=list)
    logits: List[float] = field(default_factory=list)          # per caption (or per class)
    probabilities: List[float] = field(default_factory=list)   # per caption (or per class)
    tokens: List[str] = field(default_factory=list)            # the explained caption's tokens
    token_relevance: Optional[torch.Tensor] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def top_tokens(self, k: int = 5, absolute: bool = False) -> List[tuple]:
        """The ``k`` most relevant tokens of the explained caption: ``(index, token, relevance)``."""
        if self.token_relevance is None:
            return []
        key = self.token_relevance.abs() if absolute else self.token_relevance
        idx = torch.argsort(key, descending=True)[:k].tolist()
        return [(i, self.tokens[i], float(self.token_relevance[i])) for i in idx]

    def heatmap(self, scale: int = 1) -> np.ndarray:
        """uint8 RGB ``[H, W, 3]``: blue (against) - white - red (for), symmetric around 0."""
        rel = self.relevance.double().numpy()
        m = float(np.abs(rel).max()) or 1.0
        return _enlarge(diverging_colors(rel, -m, m), scale)

    def overlay(self, alpha: float = 0.6, scale: int = 1) -> np.ndarray:
        """The heatmap blended over a grey copy of the image (``alpha``: weight of the heatmap,
        scaled by each pixel's share of the largest ``|relevance|``, so irrelevant pixels show the image)."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        rel = self.relevance.double().numpy()
        weight = alpha * np.abs(rel) / (float(np.abs(rel).max()) or 1.0)
        grey = self.image.astype(np.float64).mean(-1, keepdims=True).repeat(3, -1)
        heat = self.heatmap().astype(np.float64)
        out = heat * weight[..., None] + grey * (1.0 - weight[..., None])
        return _enlarge(np.round(out).clip(0, 255).astype(np.uint8), scale)

    def to_png(self, path: str, scale: Optional[int] = None) -> str:
        """One PNG: the overlay and the plain heatmap side by side (``scale``: pixel size; default
        enlarges small model inputs to about 224 pixels)."""
        from PIL import Image
        if scale is None:
            scale = max(1, 224 // max(self.relevance.shape))
        panels = np.stack([self.overlay(scale=scale), self.heatmap(scale=scale)])
        Image.fromarray(tile_grid(panels, 1, 2, pad=4, fill=255)).save(path, format="PNG")
        return path

    def to_dict(self) -> Dict[str, Any]:
        d = {"target": self.target, "score": self.score, "rules": self.rules, "captions": self.captions,
             "logits": self.logits, "probabilities": self.probabilities, "tokens": self.tokens,
             "token_relevance": None if self.token_relevance is None else self.token_relevance.tolist(),
             "relevance": self.relevance.tolist()}
        d.update(self.meta)
        return d

    def to_json(self, path: Optional[str] = None) -> str:
        return json_text(self.to_dict(), path)


def _enlarge(rgb: np.ndarray, scale: int) -> np.ndarray:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return rgb.repeat(scale, 0).repeat(scale, 1) if scale > 1 else rgb


# ----------------------------------------------------------------------------- inputs

def _vision_config(model):
    config = model.config
    return getattr(config, "vision_config", None) or config


def _image_size(model) -> tuple:
    size = getattr(_vision_config(model), "image_size", None)
    if isinstance(size, (list, tuple)):
        return tuple(int(s) for s in size)
    return (int(size), int(size)) if size else (None, None)


def load_image(image) -> "PIL.Image.Image":
    """A PIL image in RGB from a path or a PIL image; :class:`ImageError` for anything unusable."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.exists(path):
            raise ImageError(f"image {path!r}: no such file")
        if os.path.isdir(path):
            raise ImageError(f"image {path!r} is a folder, not an image file")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except UnidentifiedImageError:
            raise ImageError(f"image {path!r} is not an image (PIL cannot identify its format)") from None
        except OSError as err:
            raise ImageError(f"cannot read image {path!r}: {err.strerror or err}") from None
    if not isinstance(image, Image.Image):
        raise ImageError(f"image must be a file path, a PIL image or a pixel_values tensor, got "
                         f"{type(image).__name__}")
    if image.mode not in IMAGE_MODES:
        raise ImageError(f"image mode {image.mode!r} is not supported (expected one of "
                         f"{', '.join(IMAGE_MODES)}; convert it to RGB first)")
    if min(image.size) < 1:
        raise ImageError(f"image has no pixels (size {image.size})")
    return image.convert("RGB")


def _image_processor(processor):
    return getattr(processor, "image_processor", None) or processor


def _pixel_values(model, processor, image) -> torch.Tensor:
    """``[1, C, H, W]`` float pixel values at the model's image size."""
    channels = getattr(_vision_config(model), "num_channels", 3)
    height, width = _image_size(model)
    if isinstance(image, torch.Tensor):
        pixels = image
        if pixels.dim() == 3:
            pixels = pixels[None]
        if not pixels.is_floating_point():
            raise ImageError(f"a pixel_values tensor must be floating point (already preprocessed), "
                             f"got dtype {pixels.dtype}")
    else:
        pil = load_image(image)
        if processor is None:
            raise ImageError("a path or a PIL image needs processor= (the model's image processor) to "
                             "become pixel values; or pass a preprocessed pixel_values tensor")
        pixels = _image_processor(processor)(images=pil, return_tensors="pt")["pixel_values"]
    expected = (1, channels, height, width)
    if pixels.dim() != 4 or pixels.shape[:2] != expected[:2] or (
            height is not None and tuple(pixels.shape[2:]) != (height, width)):
        raise ImageError(f"pixel_values have shape {tuple(pixels.shape)}; this model takes one image of "
                         f"{channels} x {height} x {width} ([C, H, W] or [1, C, H, W])")
    if not torch.isfinite(pixels).all():
        raise ImageError("pixel_values contain NaN or infinity")
    return pixels


def _seen_image(pixels: torch.Tensor, processor) -> np.ndarray:
    """uint8 ``[H, W, 3]``: the pixel values with the processor's normalisation undone (min-max
    scaled when it is unknown)."""
    x = pixels[0].detach().double().cpu()
    proc = _image_processor(processor) if processor is not None else None
    mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    if mean is not None and std is not None and getattr(proc, "do_normalize", True):
        x = x * torch.tensor(std, dtype=x.dtype)[:, None, None] + torch.tensor(mean, dtype=x.dtype)[:, None, None]
        x = x.clamp(0, 1)
    else:
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / ((hi - lo) or 1.0)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return np.round(x[:3].permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _captions(captions) -> List[str]:
    if isinstance(captions, str):
        captions = [captions]
    if captions is None or isinstance(captions, (bytes, dict)):
        raise ExplainError("captions must be a caption string or a non-empty list of strings")
    captions = list(captions)
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise ExplainError(f"captions must be non-empty strings, got {captions!r}")
    return captions


def _tokenizer(processor, tokenizer):
    tok = tokenizer or getattr(processor, "tokenizer", None)
    if tok is None:
        raise ExplainError("captions need a tokenizer: pass a processor with one (e.g. CLIPProcessor) or "
                           "tokenizer=")
    return tok


def _caption_tokens(tok, ids: List[int]) -> List[str]:
    """Readable tokens: CLIP's end-of-word marker ``</w>`` dropped, other markers as in text heatmaps."""
    raw = [t[:-4] if t.endswith("</w>") else t for t in tok.convert_ids_to_tokens(ids)]
    return clean_tokens(raw)


def _pick(target, names: Sequence[str], what: str) -> int:
    """An index into ``names`` from an index or a name."""
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise ExplainError(f"target must be an index or a {what} string, got {type(target).__name__}")
    if isinstance(target, int):
        if not 0 <= target < len(names):
            raise ExplainError(f"target index {target} is out of range: {len(names)} {what}s")
        return target
    if target not in names:
        raise ExplainError(f"target {target!r} is not one of the {what}s {list(names)}")
    return list(names).index(target)


# ----------------------------------------------------------------------------- main entry

def explain_image(model, processor, image, captions: Optional[Union[str, Sequence[str]]] = None, *,
                  target: Optional[Union[int, str]] = None, tokenizer=None, rules: str = "attnlrp",
                  epsilon: Optional[float] = None, backend: Optional[str] = None,
                  strict: bool = True) -> ImageExplanation:
    """Explain one image: against ``captions`` (CLIP / SigLIP), or a vision model's class logit
    or embedding norm (module docstring). ``processor``: a transformers processor or image
    processor, or None for a preprocessed pixel tensor; ``tokenizer``: for captions when the
    processor has none. ``rules``, ``epsilon``, ``backend``, ``strict`` go to
    :func:`lrp_kernels.patch` (a model the caller patched is used as it is). Bad arguments
    raise :class:`~lrp_kernels.explanations.api.ExplainError` (images: :class:`ImageError`)
    naming them; the parameters' ``.grad`` and ``requires_grad`` are left as they were.
    """
    if rules not in LRP_RULES:
        raise ExplainError(f"rules must be one of {LRP_RULES}, got {rules!r}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    # CLIPModel / SiglipModel (not their classifiers, which share the model type)
    dual = model_type in DUAL_TYPES and hasattr(model, "text_model") and hasattr(model, "vision_model")
    if captions is not None and not dual:
        raise ExplainError(f"captions need an image-text model (CLIPModel, SiglipModel); this is a "
                           f"{type(model).__name__} ({model_type!r})")
    if dual and captions is None:
        raise ExplainError(f"a {model_type!r} image-text model explains an image against captions: pass captions=")
    pixels = _pixel_values(model, processor, image)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    with _keep_parameters(model):
        if dual:
            caps = _captions(captions)
            return _explain_dual(model, processor, _tokenizer(processor, tokenizer), pixels, caps, target,
                                 rules, epsilon, backend, strict, device, dtype)
        return _explain_vision(model, processor, pixels, target, rules, epsilon, backend, strict, device, dtype)


def _checked(relevance: torch.Tensor, score: float) -> torch.Tensor:
    """The pixel relevance, never silently NaN or all zero."""
    if not torch.isfinite(relevance).all():
        raise ExplainError("the pixel relevance is not finite (NaN/Inf); try float32 or a larger epsilon")
    if score != 0 and not relevance.any():
        warnings.warn("every pixel relevance is exactly 0 although the explained value is not: it does "
                      "not depend on the pixels through this model's gradient", stacklevel=3)
    return relevance


def _explain_dual(model, processor, tok, pixels, caps, target, rules, epsilon, backend, strict, device, dtype):
    siglip = model.config.model_type == "siglip"
    limit = model.config.text_config.max_position_embeddings
    enc = tok(caps, padding="max_length" if siglip else True, truncation=True, max_length=limit,
              return_tensors="pt")
    ids = enc["input_ids"].to(device)
    text = {"input_ids": ids}
    if "attention_mask" in enc and "attention_mask" in getattr(tok, "model_input_names", ["attention_mask"]):
        text["attention_mask"] = enc["attention_mask"].to(device)
    layer = model.text_model.embeddings.token_embedding
    leaf = {}

    def as_leaf(module, args, out):  # the token embeddings become a leaf: their relevance is e * grad
        leaf["embeds"] = out.detach().requires_grad_(True)
        return leaf["embeds"]
    x = pixels.to(device=device, dtype=dtype).requires_grad_(True)
    with _patch_context(model, rules, epsilon, backend, strict), torch.enable_grad():
        hook = layer.register_forward_hook(as_leaf)
        try:
            logits = model(pixel_values=x, **text).logits_per_image[0]
        finally:
            hook.remove()
        index = int(logits.argmax()) if target is None else _pick(target, caps, "caption")
        gx, ge = torch.autograd.grad(logits[index], [x, leaf["embeds"]])
    values = logits.detach().float().cpu()
    probs = torch.sigmoid(values) if siglip else torch.softmax(values, -1)
    real = text.get("attention_mask", torch.ones_like(ids))[index].bool().cpu()
    token_rel = (leaf["embeds"].detach() * ge).float().sum(-1)[index].cpu()
    row = ids[index].cpu()
    if siglip:  # SigLIP pools the last position: its padding is part of the caption
        real = torch.ones_like(real)
    return ImageExplanation(
        relevance=_checked((x.detach() * gx).float().sum(1)[0].cpu(), float(values[index])),
        image=_seen_image(pixels, processor), target=caps[index], score=float(values[index]), rules=rules, captions=caps,
        logits=values.tolist(), probabilities=probs.tolist(),
        tokens=_caption_tokens(tok, row[real].tolist()), token_relevance=token_rel[real],
        meta={"objective": "image-text similarity logit", "target_index": index,
              "probability": "sigmoid" if siglip else "softmax over captions"})


def _explain_vision(model, processor, pixels, target, rules, epsilon, backend, strict, device, dtype):
    x = pixels.to(device=device, dtype=dtype).requires_grad_(True)
    with _patch_context(model, rules, epsilon, backend, strict), torch.enable_grad():
        out = model(pixel_values=x)
        logits = getattr(out, "logits", None)
        if logits is not None:
            row = logits[0]
            labels = getattr(model.config, "id2label", None) or {}
            names = [str(labels.get(i, i)) for i in range(row.shape[-1])]
            index = int(row.argmax()) if target is None else _pick(target, names, "class label")
            objective, what = row[index], names[index]
            values = row.detach().float().cpu()
            probs = torch.softmax(values, -1).tolist()
            meta = {"objective": "class logit", "target_index": index}
        else:
            if target is not None:
                raise ExplainError("target= picks a caption or a class; this embedding model explains the norm "
                                   "of its embedding")
            emb = next((t for t in (getattr(out, "image_embeds", None), getattr(out, "pooler_output", None))
                        if t is not None), None)
            source = "image_embeds" if getattr(out, "image_embeds", None) is not None else "pooler_output"
            if emb is None:
                emb, source = out.last_hidden_state[:, 0], "first token"
            emb = emb[0].float()
            objective = (emb * (emb / emb.norm()).detach()).sum()  # |e|, with e / |e| a constant
            what, values, probs = "embedding norm", None, []
            meta = {"objective": f"L2 norm of the embedding ({source})"}
        if not torch.isfinite(objective):
            raise ExplainError("the model produced a non-finite value for the target; check its weights and dtype")
        gx, = torch.autograd.grad(objective, [x])
    return ImageExplanation(
        relevance=_checked((x.detach() * gx).float().sum(1)[0].cpu(), float(objective.detach())),
        image=_seen_image(pixels, processor), target=what, score=float(objective.detach()), rules=rules,
        logits=[] if values is None else values.tolist(), probabilities=probs, meta=meta)
