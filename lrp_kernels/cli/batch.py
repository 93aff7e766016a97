"""``lrp-kernels batch``: explain every prompt of a JSONL file into a JSONL or Parquet file,
resumably, on one or several processes (:mod:`lrp_kernels.explanations.batch`)."""
from __future__ import annotations

import argparse
import os
import sys

from ..ops._common import DEFAULT_EPSILON
from . import CLIError, add_model_options, int_at_least, positive_float
from ._models import model_errors, usable_device

EPILOG = """\
input lines (JSON objects; only "prompt" is required):
  {"id": "q1", "prompt": "k4 17 ; k9 42 ; ? k9"}
  {"id": "q2", "prompt": "k4 17 ; k9 42 ; ? k9", "target": "42", "contrast": "17"}
  {"id": "q3", "prompt": "k4 17 ; ? k4", "continuation": " 17", "meta": {"label": 1}}
  "target"/"contrast": a token string, or a JSON integer for a token id.

examples:
  lrp-kernels batch prompts.jsonl --out relevance.jsonl
  lrp-kernels batch prompts.jsonl --out relevance.parquet --max-tokens 4096
  accelerate launch --multi_gpu --num_processes 2 -m lrp_kernels.cli batch prompts.jsonl --out relevance.jsonl
  torchrun --nproc_per_node 2 -m lrp_kernels.cli batch prompts.jsonl --out relevance.jsonl

Rerunning the same command skips the ids already in --out (after Ctrl-C, a kill or a crash:
at most the batch in flight is lost) and completes a merge that did not happen.
Exit code 2 and one line on stderr for a mistake in the arguments (with --strict: in the input).
"""


def _shard(text: str):
    """argparse type: ``R/W`` with ``0 <= R < W``."""
    try:
        rank, world = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RANK/WORLD such as 0/4, got {text!r}") from None
    if not 0 <= rank < world:
        raise argparse.ArgumentTypeError(f"need 0 <= RANK < WORLD, got {text!r}")
    return rank, world


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "batch", help="explain every prompt of a JSONL file (resumable, data-parallel)",
        description="Explain every line of a JSONL file with AttnLRP and append one result line "
                    "per prompt (id, tokens, token ids, relevance per token, target with its "
                    "logit and probability) to --out. Prompts are batched by length under a "
                    "token budget; a rerun skips the ids already written.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN.jsonl", help="one JSON object per line")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="output file: .jsonl, or .parquet (needs pyarrow)")
    p.add_argument("--format", choices=("jsonl", "parquet"), default=None,
                   help="output format (default: parquet for a .parquet/.pq path, else jsonl)")
    add_model_options(p, device_help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu; "
                                     "under a launcher each process takes cuda:LOCAL_RANK)")
    p.add_argument("--epsilon", type=positive_float, default=DEFAULT_EPSILON,
                   help=f"LRP stabiliser, a finite number > 0 (default: {DEFAULT_EPSILON:g})")
    p.add_argument("--max-length", type=int_at_least(1), default=None, metavar="N",
                   help="skip (or with --strict refuse) prompts longer than N tokens "
                        "(default: the model's context)")
    p.add_argument("--max-tokens", type=int_at_least(1), default=None, metavar="N",
                   help="memory budget: padded tokens per batch, batch size x longest prompt "
                        "(default: 2048)")
    p.add_argument("--max-batch-size", type=int_at_least(1), default=None, metavar="B",
                   help="at most B prompts per batch (default: 64)")
    p.add_argument("--strict", action="store_true",
                   help="a malformed input line or a prompt that cannot be explained is an "
                        "error (default: skipped, with its line number)")
    p.add_argument("--no-strict-patch", dest="patch_strict", action="store_false",
                   help="patch what has an AttnLRP rule and keep plain gradients elsewhere")
    p.add_argument("--shard", type=_shard, default=None, metavar="R/W",
                   help="only this job's share of W independent jobs (no process group); "
                        "rerun without --shard to merge the parts")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _check_paths(args, fmt: str) -> None:
    if not os.path.isfile(args.input):
        raise CLIError(f"IN {args.input!r}: no such file")
    out = os.path.abspath(args.out)
    if out == os.path.abspath(args.input):
        raise CLIError("--out is the input file; give another path")
    if os.path.isdir(out):
        raise CLIError(f"cannot write --out {args.out!r}: it is a folder")
    folder = os.path.dirname(out)
    if not os.path.isdir(folder):
        raise CLIError(f"cannot write --out {args.out!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise CLIError(f"cannot write --out {args.out!r}: permission denied")
    if fmt == "parquet":
        from ..explanations.batch_store import require_pyarrow
        try:
            require_pyarrow()
        except ImportError as err:
            raise CLIError(f"--out {args.out!r}: {err}") from None


def _device(args) -> str:
    # under torchrun / accelerate each rank takes its own GPU
    return usable_device(args.device, f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")


def _warn_lines(what: str, problems, limit: int = 10) -> None:
    for p in problems[:limit]:
        print(f"lrp-kernels batch: warning: {what} {p}", file=sys.stderr)
    if len(problems) > limit:
        print(f"lrp-kernels batch: warning: ... and {len(problems) - limit} more", file=sys.stderr)


def run(args) -> int:
    from ..explanations import batch as B
    from ..explanations.api import ExplainError
    from ..explanations.batch_store import format_for
    from .explain import SHIPPED_MODEL, load

    fmt = format_for(args.out, args.format)
    _check_paths(args, fmt)
    device = _device(args)
    model_id = args.model or SHIPPED_MODEL
    model, tok = load(model_id, args.tokenizer or model_id, args.dtype, device, not args.quiet)
    try:
        with model_errors(args.backend, model_id, '--no-strict-patch'):
            report = B.explain_dataset(
                model, tok, args.input, args.out, rules=args.rules, epsilon=args.epsilon,
                backend=args.backend, max_length=args.max_length, patch_strict=args.patch_strict,
                max_tokens=args.max_tokens or B.DEFAULT_MAX_TOKENS,
                max_batch_size=args.max_batch_size or B.DEFAULT_MAX_BATCH_SIZE, format=fmt,
                strict=args.strict, progress=not args.quiet, shard=args.shard)
    except B.BatchError as err:
        raise CLIError(f"{args.input}: {err}" if str(err).startswith(("malformed", "cannot explain", "explain refused"))
                       else str(err)) from None
    except ExplainError as err:
        raise CLIError(str(err)) from None
    if report.rank == 0:
        if report.dropped_partial_bytes:
            print(f"lrp-kernels batch: warning: dropped the unfinished last line of an "
                  f"interrupted run ({report.dropped_partial_bytes} bytes)", file=sys.stderr)
        _warn_lines(f"skipped {args.input}", report.malformed)
    who = f"rank {report.rank} of {report.world_size}: " if report.world_size > 1 else ""
    _warn_lines(f"{who}not explained: {args.input}", report.failed)
    rate = f", {report.examples_per_second:.3g} examples/s" if report.written else ""
    skipped = (f", {len(report.malformed)} malformed lines skipped" if report.malformed else "")
    failed = f", {len(report.failed)} refused" if report.failed else ""
    print(f"{who}explained {report.written} prompts in {report.batches} batches "
          f"({report.seconds:.1f} s{rate}); {report.already_done} already in {args.out}"
          f"{skipped}{failed}")
    if report.merged_rows is not None:
        print(f"wrote {args.out} ({report.merged_rows} explanations)")
    elif report.world_size > 1:
        print(f"wrote {args.out}.rank{report.rank}.part.jsonl; rerun without --shard to merge")
    return 0
