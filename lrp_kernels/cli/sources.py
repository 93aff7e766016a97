"""``lrp-kernels sources``: which document supports which sentence of an answer (RAG source
attribution, :mod:`lrp_kernels.explanations.sources`)."""
from __future__ import annotations

import argparse
import json
import os

from ..ops._common import DEFAULT_EPSILON
from . import CLIError, add_model_options, int_at_least, positive_float, read_text_lines
from ._models import model_errors, usable_device

DEFAULT_GENERATE = 32

EPILOG = f"""\
documents (JSONL, one JSON object per line; "id" optional, default: the line number):
  {{"id": "k4", "text": "k4 17"}}
  {{"id": "paris", "text": "Paris is the capital of France. It lies on the Seine."}}

examples:
  lrp-kernels sources docs.jsonl --question "? k9" --answer 42 --out answer.html
  lrp-kernels sources docs.jsonl --question "What is the capital of France?" \\
      --model path/to/llm --generate 40 --level sentence --out answer.html

The prompt is built from a template (--template): "qa" writes "Document [1]: TEXT" blocks
separated by blank lines, then "Question: QUESTION" and "Answer:"; "key-value" is the shipped
recall model's format ("k4 17 ; k9 42 ; ? k9"); "auto" (default) is key-value for the shipped
model and qa otherwise. Without --answer, up to --generate tokens (default {DEFAULT_GENERATE})
are generated greedily (stopping at the end-of-sequence token). The answer is split into
sentences after . ! ? and at blank lines; per sentence the --top sources are printed with their
share of the sentence's relevance. --out NAME.html also writes NAME.json (sources and the
relevance matrix) and NAME.csv (one row per sentence and source).
Exit code 2 and one line on stderr for a mistake in the arguments or the documents file.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sources", help="attribute each answer sentence to the documents it comes from",
        description="Answer a question over documents (or take the answer) and attribute each "
                    "answer sentence to its sources with AttnLRP: the relevance of every "
                    "document (or paragraph, sentence, word) for the sentence, printed as the "
                    "top sources with their share, and written as an interactive viewer.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("documents", metavar="DOCS.jsonl",
                   help='documents, one JSON object {"id": ..., "text": ...} per line')
    p.add_argument("--question", required=True, help="the question asked about the documents")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--answer", help="the answer to attribute (default: generate one)")
    what.add_argument("--generate", type=int_at_least(1), metavar="K",
                      help=f"generate up to K tokens greedily (default: {DEFAULT_GENERATE})")
    p.add_argument("--template", default="auto", choices=("auto", "qa", "key-value"),
                   help="how documents and question become the prompt (default: auto)")
    p.add_argument("--level", default="document",
                   choices=("document", "paragraph", "sentence", "word"),
                   help="source granularity (default: document)")
    p.add_argument("--top", type=int_at_least(1), default=3, metavar="N",
                   help="sources printed per answer sentence (default: 3)")
    p.add_argument("--out", metavar="NAME.html",
                   help="write the interactive viewer, and NAME.json and NAME.csv beside it")
    add_model_options(p)
    p.add_argument("--max-length", type=int_at_least(1), default=None, metavar="N",
                   help="refuse prompts longer than this many tokens (default: model context)")
    p.add_argument("--epsilon", type=positive_float, default=DEFAULT_EPSILON,
                   help=f"LRP stabiliser, a finite number > 0 (default: {DEFAULT_EPSILON:g})")
    p.add_argument("--no-strict", dest="strict", action="store_false", default=True,
                   help="patch what has a rule and keep plain gradients elsewhere")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def read_documents(path: str) -> list:
    """``[{"id": str, "text": str}]`` from a JSONL file; one-line :class:`CLIError` naming
    the line for anything else (bad JSON, no text, empty text, duplicate ids)."""
    lines = read_text_lines(path, "documents file")
    docs, first_line = [], {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CLIError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise CLIError(f'{where}: expected a JSON object {{"id": ..., "text": ...}}, got '
                           f"{type(record).__name__}")
        if "text" not in record:
            raise CLIError(f'{where}: no "text"')
        text = record["text"]
        if not isinstance(text, str):
            raise CLIError(f'{where}: "text" must be a string, got {type(text).__name__}')
        if not text.strip():
            raise CLIError(f'{where}: "text" is empty')
        key = record.get("id", str(number))
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise CLIError(f'{where}: "id" must be a string or an integer, got '
                           f"{type(key).__name__}")
        key = str(key)
        if key in first_line:
            raise CLIError(f"{where}: duplicate id {key!r} (first on line {first_line[key]})")
        first_line[key] = number
        docs.append({"id": key, "text": text})
    if not docs:
        raise CLIError(f"documents file {path!r} has no documents (no non-empty line)")
    return docs


def _check_out(path: str) -> None:
    if os.path.splitext(path)[1].lower() not in (".html", ".htm"):
        raise CLIError(f"--out must end in .html (the viewer; .json and .csv are written "
                       f"beside it), got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"cannot write --out {path!r}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"cannot write --out {path!r}: it is a folder")


def run(args) -> int:

    from ..explanations.api import ExplainError, unknown_pieces
    from ..explanations.sources import SourcesError, attribute_sources, build_prompt
    from .explain import SHIPPED_MODEL, load

    if not args.question.strip():
        raise CLIError("--question is empty")
    if args.answer is not None and not args.answer.strip():
        raise CLIError("--answer is empty")
    if args.out:
        _check_out(args.out)
    docs = read_documents(args.documents)
    model_id = args.model or SHIPPED_MODEL
    template = args.template
    if template == "auto":
        template = "key-value" if os.path.abspath(model_id) == os.path.abspath(SHIPPED_MODEL) \
            else "qa"
    try:
        sp = build_prompt(docs, args.question, template=template)
    except SourcesError as err:
        raise CLIError(str(err)) from None
    device = usable_device(args.device)
    model, tok = load(model_id, args.tokenizer or model_id, args.dtype, device,
                      not args.no_progress)
    answer = None
    if args.answer is not None:  # the answer follows "Answer:" / the query after a space
        answer = args.answer if args.answer[:1].isspace() else " " + args.answer
    for what, text in (("the prompt", sp.prompt), ("--answer", answer)):
        unknown = unknown_pieces(tok, text) if text is not None else []
        if unknown:
            hint = "; try --template key-value" if template == "qa" and \
                os.path.abspath(model_id) == os.path.abspath(SHIPPED_MODEL) else ""
            raise CLIError(f"the model's tokenizer does not know "
                           f"{', '.join(map(repr, unknown[:5]))} in {what} (it would become "
                           f"{tok.unk_token!r}){hint}")
    generate = None if answer is not None else (args.generate or DEFAULT_GENERATE)
    bar = None
    if not args.no_progress:
        import sys

        from tqdm.auto import tqdm
        bar = tqdm(desc="explaining answer tokens", file=sys.stderr)

    def progress(done, total):
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)
    from ..explanations.matrix import explain_matrix
    try:
        with model_errors(args.backend, model_id):
            matrix = explain_matrix(model, tok, sp.prompt, continuation=answer, generate=generate,
                                    rules=args.rules, epsilon=args.epsilon, backend=args.backend,
                                    max_length=args.max_length, strict=args.strict,
                                    progress=progress)
    except ExplainError as err:
        raise CLIError(str(err)) from None
    finally:
        if bar is not None:
            bar.close()
    report = attribute_sources(matrix, sp, level=args.level, top=args.top)
    print(f"answer: {report.answer.strip()!r}")
    print(report.format())
    if args.out:
        root = os.path.splitext(args.out)[0]
        from ..explanations.viewer import write_viewer
        try:
            write_viewer(report, args.out)
            print(f"wrote {args.out}")
            with open(root + ".json", "w", encoding="utf-8") as f:
                json.dump(dict(report.to_dict(), matrix=matrix.to_dict()), f, ensure_ascii=False)
                f.write("\n")
            print(f"wrote {root}.json")
            report.to_csv(root + ".csv")
            print(f"wrote {root}.csv")
        except ValueError as err:  # a NaN in the relevance
            raise CLIError(str(err).splitlines()[0]) from None
        except OSError as err:
            raise CLIError(f"cannot write {err.filename or args.out!r}: "
                           f"{err.strerror or err}") from None
    return 0
