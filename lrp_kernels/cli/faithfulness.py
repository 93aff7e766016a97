"""``lrp-kernels faithfulness``: perturbation curves and ABPC of attribution methods on a set of
prompts (the protocol: :mod:`lrp_kernels.tools.faithfulness`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Tuple

from . import CLIError, add_model_options, int_at_least, read_text_lines
from ._models import model_errors, usable_device

EPILOG = """\
examples:
  lrp-kernels faithfulness                              # 200 held-out prompts of the shipped model
  lrp-kernels faithfulness --removal replace --plot curves.png
  lrp-kernels faithfulness --prompts data.jsonl --model path/to/model --methods attnlrp,random

Prompts file: a .jsonl file with one object per line, {"prompt": "...", "target": "..."}
("target" optional: a token string, or an integer token id; default: the most likely next
token), or any other file with one prompt per non-empty line. Without --prompts the shipped
recall model's held-out task is used (--n prompts drawn with --seed).

Output: a table, then one JSON line per method (abpc = area(LeRF) - area(MoRF) of the
normalised curves, mean over prompts; higher is more faithful); --plot writes a PNG.
Exit code 2 and one line on stderr for any mistake in the arguments or the prompts file.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    from ..tools.faithfulness import METHODS, REMOVALS, SCORES
    p = sub.add_parser(
        "faithfulness", help="perturbation curves (MoRF / LeRF) and ABPC per attribution method",
        description="Remove input tokens most-relevant-first and least-relevant-first, track the "
                    "target's score after each step, and report the area between the two "
                    "normalised curves (ABPC) for each method.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", metavar="FILE",
                   help="prompts file (.jsonl or one prompt per line; default: the shipped "
                        "model's held-out recall prompts)")
    p.add_argument("--n", type=int_at_least(1), default=None, metavar="N",
                   help="use the first N prompts of the file, or draw N held-out prompts "
                        "(default: all of the file, 200 held-out)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the held-out prompts and of the random attribution "
                        "(default: the held-out seed 20261127 and 0)")
    add_model_options(p, rules=False, backend_help="kernel backend of the LRP methods (default: auto)",
                      device_help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, among {', '.join(METHODS)} (default: all)")
    p.add_argument("--removal", default="zero", choices=REMOVALS,
                   help="zero: set a removed token's embedding to 0 (default); replace: set it "
                        "to --baseline-token's embedding")
    p.add_argument("--baseline-token", default=None,
                   help="the replacing token for --removal replace (string or id:N; default: "
                        "the tokenizer's unknown token, else its padding token)")
    p.add_argument("--steps", type=int_at_least(1), default=None, metavar="S",
                   help="removal steps per curve (default: one token per step)")
    p.add_argument("--score", default="logit", choices=SCORES,
                   help="track the target's logit (default) or its probability")
    p.add_argument("--plot", metavar="PNG", help="write the mean curves as a PNG (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _parse_target(value, where: str):
    if value is None or isinstance(value, str) and not value.startswith("id:"):
        return value
    if isinstance(value, str):
        try:
            return int(value[3:])
        except ValueError:
            raise CLIError(f"{where}: target {value!r}: expected id:N with N a token id") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise CLIError(f"{where}: target must be a token string or an integer id, got {value!r}")


def read_prompts(path: str) -> Tuple[List[str], List[Optional[object]]]:
    """Prompts and targets from a .jsonl file (``{"prompt": ..., "target": ...}`` per line) or a
    text file (one prompt per non-empty line); CLIError naming the line for anything else."""
    lines = read_text_lines(path, "--prompts")
    prompts, targets = [], []
    jsonl = path.lower().endswith((".jsonl", ".ndjson"))
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--prompts {path!r} line {number}"
        if not jsonl:
            prompts.append(line)
            targets.append(None)
            continue
        try:
            item = json.loads(line)
        except ValueError as err:
            raise CLIError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise CLIError(f"{where}: expected an object with a \"prompt\" string")
        if not item["prompt"].strip():
            raise CLIError(f"{where}: the prompt is empty")
        prompts.append(item["prompt"])
        targets.append(_parse_target(item.get("target"), where))
    if not prompts:
        raise CLIError(f"--prompts {path!r} has no prompts (it is empty)")
    return prompts, targets


def _check_plot(path: str) -> None:
    if not path.lower().endswith(".png"):
        raise CLIError(f"--plot must end in .png, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"cannot write --plot {path!r}: folder {folder!r} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError("--plot needs matplotlib (pip install matplotlib)") from None


def run(args) -> int:

    from ..explanations.api import ExplainError
    from ..tools.faithfulness import FaithfulnessError, _check_methods, perturbation_curves
    from ..tools.recall_prompts import HELD_OUT_SEED, SHIPPED_MODEL, held_out_prompts
    from .explain import load

    try:
        methods = _check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    except FaithfulnessError as err:
        raise CLIError(f"--methods: {err}") from None
    if args.baseline_token is not None and args.removal != "replace":
        raise CLIError("--baseline-token is only used with --removal replace")
    if args.plot:
        _check_plot(args.plot)
    model_id = args.model or SHIPPED_MODEL
    if args.prompts:
        prompts, targets = read_prompts(args.prompts)
        if args.n is not None:
            prompts, targets = prompts[:args.n], targets[:args.n]
    else:
        if args.model and os.path.abspath(os.path.expanduser(args.model)) != SHIPPED_MODEL:
            raise CLIError("give --prompts FILE: the default prompts are the shipped recall "
                           "model's task, which another --model does not know")
        prompts = held_out_prompts(args.n or 200, HELD_OUT_SEED if args.seed is None else args.seed)
        targets = [None] * len(prompts)
    device = usable_device(args.device)
    model, tok = load(model_id, args.tokenizer or model_id, args.dtype, device, not args.no_progress)

    bar = None
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(prompts), desc="perturbation curves", unit="prompt", file=sys.stderr)

        def progress(done, total):
            bar.update(done - bar.n)
    try:
        with model_errors(args.backend, model_id, None):
            result = perturbation_curves(
                model, tok, prompts, methods, targets=targets if any(t is not None for t in targets) else None,
                removal=args.removal, baseline_token=_parse_target(args.baseline_token, "--baseline-token"),
                steps=args.steps, score=args.score, seed=0 if args.seed is None else args.seed,
                backend=args.backend, progress=progress)
    except FaithfulnessError as err:
        raise CLIError(str(err)) from None
    except ExplainError as err:
        raise CLIError(f"--prompts: {err}" if args.prompts else str(err)) from None
    finally:
        if bar is not None:
            bar.close()
    print(result.table())
    for row in result.summary():
        print(json.dumps(row))
    if args.plot:
        try:
            result.plot(args.plot)
        except OSError as err:
            raise CLIError(f"cannot write --plot {args.plot!r}: {err.strerror or err}") from None
        print(f"wrote {args.plot}")
    return 0
