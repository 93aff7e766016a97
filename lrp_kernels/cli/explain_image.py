"""``lrp-kernels explain-image``: pixel (and caption token) relevance of a local vision model."""
from __future__ import annotations

import argparse
import os

from ..ops._common import DEFAULT_EPSILON
from . import CLIError, int_at_least, positive_float
from ._models import usable_device

EPILOG = """\
examples:
  lrp-kernels explain-image dog.jpg --model ./clip --caption "a dog" --caption "a cat" --out heatmap.png
  lrp-kernels explain-image dog.jpg --model ./siglip --caption "a dog" --caption "a cat" --target "a cat"
  lrp-kernels explain-image dog.jpg --model ./dinov2 --out heatmap.png     # the embedding's norm
  lrp-kernels explain-image dog.jpg --model ./vit-classifier --target 3   # a class logit

With captions (CLIP, SigLIP) the similarity of the image with one caption is explained (default:
the most likely caption), and the caption probabilities and the explained caption's most relevant
tokens are printed. Without captions: a classifier's class logit (default: the top class) or an
embedding model's embedding norm. --out writes one PNG: the heatmap over the image as the model
saw it, and the plain heatmap (red: for, blue: against); .json writes the numbers.
Exit code 2 and one line on stderr for a bad image, option or model folder.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "explain-image", help="explain an image against captions (CLIP, SigLIP) or a vision model's output",
        description="Explain an image with AttnLRP: the relevance of every pixel (and of the explained "
                    "caption's tokens) for an image-text similarity, a class logit or an embedding norm.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="an image file (PNG, JPEG, ...)")
    p.add_argument("--model", required=True, help="local model folder (with its image processor and, for "
                                                  "captions, its tokenizer)")
    p.add_argument("--caption", action="append", default=None, metavar="TEXT",
                   help="a caption to score the image against (repeat for several)")
    p.add_argument("--target", help="what to explain: a caption (its text or index) or a class (label or "
                                    "index); default: the most likely")
    p.add_argument("--out", help="write the heatmap: .png (overlay and heatmap) or .json")
    p.add_argument("--rules", default="attnlrp", choices=("attnlrp", "cp-lrp"),
                   help="attnlrp (default) or cp-lrp (no relevance through the attention softmax)")
    p.add_argument("--epsilon", type=positive_float, default=DEFAULT_EPSILON,
                   help=f"LRP stabiliser, a finite number > 0 (default: {DEFAULT_EPSILON:g})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--top", type=int_at_least(0), default=5, metavar="K",
                   help="how many caption tokens to print (default: 5)")
    p.set_defaults(func=run)
    return p


def _check_out(path: str) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".json"):
        raise CLIError(f"--out must end in .png or .json, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"cannot write --out {path!r}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"cannot write --out {path!r}: it is a folder")


def load(model_id: str, captions: bool):
    """Model, image processor, tokenizer (or None); one-line CLIError for an unusable folder."""
    import transformers

    from ._models import first_line, load_config

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config, path, local = load_config(model_id, "--model", causal_lm=False)
    if captions and config.model_type not in ("clip", "siglip"):
        raise CLIError(f"--caption needs an image-text model (CLIP, SigLIP); --model {model_id!r} is a "
                       f"{config.model_type!r} model (leave out --caption to explain its output)")
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not arch.startswith(type(config).__name__.replace("Config", "")):
        cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(path, local_files_only=local).eval()
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load model {model_id!r}: {first_line(err)}") from None
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError, ImportError) as err:
        raise CLIError(f"--model {model_id!r}: no usable image processor (preprocessor_config.json): "
                       f"{first_line(err)}") from None
    tokenizer = None
    if captions:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=local)
        except (OSError, ValueError, TypeError) as err:
            raise CLIError(f"--model {model_id!r}: no usable tokenizer for the captions: {first_line(err)}") from None
    return model, processor, tokenizer


def _target(text):
    return int(text) if text is not None and text.isdigit() else text


def run(args) -> int:
    from ..explanations.api import ExplainError
    from ..explanations.image import explain_image, load_image

    if args.out:
        _check_out(args.out)
    if args.caption is not None and not all(c.strip() for c in args.caption):
        raise CLIError("--caption is empty")
    try:
        image = load_image(args.image)  # a bad image fails before the model loads
    except ExplainError as err:
        raise CLIError(str(err)) from None
    device = usable_device(args.device)
    model, processor, tokenizer = load(args.model, args.caption is not None)
    model.to(device)
    try:
        exp = explain_image(model, processor, image, args.caption, target=_target(args.target),
                            tokenizer=tokenizer, rules=args.rules, epsilon=args.epsilon)
    except ExplainError as err:
        raise CLIError(str(err)) from None
    except Exception as err:
        from ..hf.patching import UnsupportedModelError
        from ._models import unsupported_message
        if isinstance(err, UnsupportedModelError):
            raise CLIError(f"--model {args.model!r}: {unsupported_message(err, flag=None)}") from None
        raise
    if exp.captions:
        print("captions:")
        for i, (cap, logit, p) in enumerate(zip(exp.captions, exp.logits, exp.probabilities)):
            mark = "  <- explained" if cap == exp.target and i == exp.meta["target_index"] else ""
            print(f"  [{i}] {cap!r:<30} logit {logit:+.4g}  probability {p:.4g}{mark}")
        print(f"top tokens of {exp.target!r}:")
        for idx, token, r in exp.top_tokens(args.top, absolute=True):
            print(f"    {idx:>5}  {token!r:<20} {r:+.4g}")
    else:
        print(f"target {exp.target!r}: {exp.meta['objective']} {exp.score:.4g}")
    print(f"pixel relevance: sum {float(exp.relevance.sum()):+.4g}, max |R| {float(exp.relevance.abs().max()):.4g}")
    if args.out:
        try:
            if args.out.lower().endswith(".json"):
                exp.to_json(args.out)
            else:
                exp.to_png(args.out)
        except OSError as err:
            raise CLIError(f"cannot write --out {args.out!r}: {err.strerror or err}") from None
        print(f"wrote {args.out}")
    return 0
