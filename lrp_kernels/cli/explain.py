"""``lrp-kernels explain``: relevance heatmap of a causal LM's prediction for a prompt."""
from __future__ import annotations

import argparse
import os
import sys

from ..ops._common import DEFAULT_EPSILON
from . import CLIError, int_at_least, positive_float
from ._models import model_errors, usable_device

SHIPPED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "assets", "recall-llama")
OUTPUT_EXTS = (".html", ".htm", ".pdf", ".png", ".json")
DTYPES = ("float32", "bfloat16", "float16")

EPILOG = """\
examples:
  lrp-kernels explain "k7 23 ; k3 19 ; k12 5 ; ? k3" --out heatmap.html
  echo "k1 5 ; k4 8 ; ? k1" | lrp-kernels explain - --out heatmap.json
  lrp-kernels explain --file prompt.txt --model path/or/hub-id --generate 5 --out answer.html
  lrp-kernels explain "k2 7 ; k9 3 ; ? k2" --target 7 --contrast 3

A hub id loads from the local Hugging Face cache when the hub is not reachable (or
HF_HUB_OFFLINE=1); a model type without AttnLRP rules is an error unless --no-strict.
Exit code 2 and one line on stderr for any mistake in the arguments or the model folder.

The default model is the tiny key-value recall Llama shipped with lrp_kernels
(prompts like "k7 23 ; k3 19 ; ? k3", answer "19": the value of the queried key).
With --generate N and --out NAME.html, one interactive viewer of the whole answer is written
(click or hover an answer token to colour the context by its relevance) and NAME.json beside it
(the relevance matrix: every earlier token for every generated token, one forward pass). With
--generate N and .json, .png or .pdf, step i is written to NAME-i.EXT.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "explain", help="explain a causal LM's next-token prediction as a token heatmap",
        description="Explain what a causal language model predicts for a prompt with AttnLRP: "
                    "the relevance of every prompt token (red: for, blue: against the target), "
                    "printed as a top-k list and optionally written as a heatmap.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the prompt text, or '-' to read it from stdin")
    p.add_argument("--file", help="read the prompt from this file (UTF-8) instead")
    p.add_argument("--model", default=None,
                   help="local model folder or Hugging Face hub id (default: the shipped "
                        "recall-llama model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path or id (default: --model)")
    tg = p.add_argument_group("what to explain (default: the most likely next token)")
    tg.add_argument("--target", help="a token string to explain, or id:N for token id N")
    tg.add_argument("--continuation", help="a text after the prompt; explains the sum of its "
                                           "tokens' logits")
    tg.add_argument("--contrast", help="a foil token (string or id:N): explain logit(target) - logit(foil)")
    tg.add_argument("--generate", type=int_at_least(1), metavar="N",
                    help="generate N tokens greedily and explain each")
    p.add_argument("--out", help="write the heatmap: .html, .pdf (needs xelatex/pdflatex), "
                                 ".png (needs matplotlib) or .json; with --generate, .html is "
                                 "one interactive viewer of the whole answer (plus NAME.json)")
    p.add_argument("--rules", default="attnlrp", choices=("attnlrp", "cp-lrp", "gradient"),
                   help="attnlrp (default), cp-lrp (no relevance through the attention softmax) or plain gradient x input")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "cpp", "triton"),
                   help="kernel backend (default: auto)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype (default: float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if "
                                                  "available, else cpu)")
    p.add_argument("--max-length", type=int_at_least(1), default=None, metavar="N",
                   help="refuse prompts longer than this many tokens (default: model context)")
    p.add_argument("--epsilon", type=positive_float, default=DEFAULT_EPSILON,
                   help=f"LRP stabiliser, a finite number > 0 (default: {DEFAULT_EPSILON:g})")
    p.add_argument("--strict", dest="strict", action="store_true", default=True,
                   help="refuse a model with parts that have no AttnLRP rule (default)")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="patch what has a rule and keep plain gradients elsewhere (a warning "
                        "names those parts; the explanation is then only partly AttnLRP)")
    p.add_argument("--top", type=int_at_least(0), default=5, metavar="K",
                   help="how many top tokens to print (default: 5)")
    p.add_argument("--pdf-backend", default="xelatex", choices=("xelatex", "pdflatex"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _read_prompt(args) -> str:
    if args.file and args.prompt:
        raise CLIError("give the prompt either as an argument or with --file, not both")
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except OSError as err:
            raise CLIError(f"cannot read --file {args.file!r}: {err.strerror or err}") from None
        except UnicodeDecodeError:
            raise CLIError(f"--file {args.file!r} is not UTF-8 text") from None
    elif args.prompt == "-":
        text = sys.stdin.read()
    elif args.prompt is not None:
        text = args.prompt
    else:
        raise CLIError("no prompt: give it as an argument, '-' for stdin, or --file PATH")
    text = text.rstrip("\n")
    if not text.strip():
        raise CLIError("the prompt is empty")
    return text


def _check_out(path: str, pdf_backend: str) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext not in OUTPUT_EXTS:
        raise CLIError(f"--out must end in .html, .pdf, .png or .json, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"cannot write --out {path!r}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"cannot write --out {path!r}: it is a folder")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CLIError(f"cannot write --out {path!r}: permission denied")
    if ext == ".pdf":
        import shutil
        if shutil.which(pdf_backend) is None:
            raise CLIError(f"--out .pdf needs {pdf_backend}, which is not installed; install a TeX "
                           "distribution, or write an HTML (.html) or PNG (.png) heatmap instead")
    if ext == ".png":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("--out .png needs matplotlib (pip install matplotlib); "
                           "use .html or .json instead") from None


def _parse_token(value, option: str):
    """A token string, or ``id:N`` for a token id (digits alone are a token string: "19")."""
    if value is None or not value.startswith("id:"):
        return value
    try:
        return int(value[3:])
    except ValueError:
        raise CLIError(f"{option} {value!r}: expected id:N with N a token id") from None


def load(model_id: str, tokenizer_id: str, dtype: str, device: str, progress: bool):
    """Model and tokenizer; one-line CLIError for a missing path, a folder that is not a causal
    LM, an unreachable hub or an unloadable model."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ._models import first_line, load_config, resolve

    # our own messages only: no weight-loading bars, no tokenizer length warnings (we check)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    # every reason the folder is unusable, before the weights
    _, model_path, model_local = load_config(model_id, "--model")
    tok_option = "--tokenizer" if tokenizer_id != model_id else "--model"
    tok_path, tok_local = (model_path, model_local) if tokenizer_id == model_id \
        else resolve(tokenizer_id, "--tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(tok_path, local_files_only=tok_local)
    except (OSError, ValueError, TypeError) as err:
        hint = "" if tok_option == "--tokenizer" else "; give one with --tokenizer"
        raise CLIError(f"cannot load the tokenizer of {tokenizer_id!r}: {first_line(err)}{hint}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                     local_files_only=model_local)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load model {model_id!r}: {first_line(err)}") from None
    model.to(device).eval()
    return model, tok


def run(args) -> int:

    from ..explanations.api import ExplainError, explain

    prompt = _read_prompt(args)
    if args.out:
        _check_out(args.out, args.pdf_backend)
    if args.continuation is not None and not args.continuation.strip():
        raise CLIError("--continuation is empty")
    if args.continuation is not None and args.target is not None:
        raise CLIError("give either --target or --continuation, not both")
    if args.generate and (args.target or args.continuation is not None or args.contrast):
        raise CLIError("--generate picks its own targets; do not combine it with --target, "
                       "--continuation or --contrast")
    viewer = bool(args.generate and args.out
                  and os.path.splitext(args.out)[1].lower() in (".html", ".htm"))
    device = usable_device(args.device)
    model_id = args.model or SHIPPED_MODEL
    model, tok = load(model_id, args.tokenizer or model_id, args.dtype, device,
                      not args.no_progress)

    from ..explanations.api import unknown_pieces
    for what, text in (("the prompt", prompt), ("--continuation", args.continuation)):
        unknown = unknown_pieces(tok, text) if text is not None else []
        if unknown:
            raise CLIError(f"the model's tokenizer does not know "
                           f"{', '.join(map(repr, unknown[:5]))} in {what} (it would become "
                           f"{tok.unk_token!r})")
    bar = None
    progress = None
    if args.generate and not args.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=args.generate, desc="explaining generated tokens", file=sys.stderr)

        def progress(done, total):
            bar.update(done - bar.n)
    try:
        with model_errors(args.backend, model_id):
            if viewer:  # the relevance matrix: one forward, one input-only backward per token
                from ..explanations.matrix import explain_matrix
                result = explain_matrix(model, tok, prompt, generate=args.generate, rules=args.rules,
                                        epsilon=args.epsilon, backend=args.backend,
                                        max_length=args.max_length, strict=args.strict,
                                        progress=progress)
            else:
                result = explain(
                    model, tok, prompt, _parse_token(args.target, '--target'),
                    continuation=args.continuation, contrast=_parse_token(args.contrast, '--contrast'),
                    generate=args.generate, rules=args.rules, epsilon=args.epsilon,
                    backend=args.backend, max_length=args.max_length, strict=args.strict,
                    progress=progress)
    except ExplainError as err:
        raise CLIError(str(err)) from None
    finally:
        if bar is not None:
            bar.close()

    if viewer:
        _print_matrix(result, tok, args.top)
        _write_viewer(result, args.out)
        return 0
    exps = result if isinstance(result, list) else [result]
    for i, exp in enumerate(exps):
        head = f"[{i}] " if len(exps) > 1 else ""
        t = exp.target
        what = repr(t.text) + (f" vs {t.foil_text!r}" if t.foil_text is not None else "")
        print(f"{head}target {what}: logit {t.logit:.4g}, probability {t.probability:.4g}")
        for idx, token, r in exp.top(args.top, absolute=True):
            print(f"    {idx:>5}  {token!r:<20} {r:+.4g}")
    if args.out:
        from ..explanations.heatmap import HeatmapError
        root, ext = os.path.splitext(args.out)
        try:
            for i, exp in enumerate(exps):
                path = args.out if len(exps) == 1 else f"{root}-{i}{ext}"
                if ext.lower() == ".pdf":
                    exp.to_pdf(path, backend=args.pdf_backend)
                else:
                    exp.save(path)
                print(f"wrote {path}")
        except HeatmapError as err:
            raise CLIError(str(err).splitlines()[0]) from None
        except OSError as err:
            raise CLIError(f"cannot write --out {args.out!r}: {err.strerror or err}") from None
    return 0


def _print_matrix(matrix, tok, top: int) -> None:
    """What ``explain --generate`` prints per generated token, from the relevance matrix."""
    p = matrix.prompt_length
    for k in range(matrix.continuation_length):
        tid = matrix.token_ids[p + k]
        text = tok.decode([tid], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        print(f"[{k}] target {text!r}: logit {float(matrix.target_logits[k]):.4g}, "
              f"probability {float(matrix.target_probabilities[k]):.4g}")
        row = matrix.relevance[k, :p + k]
        for idx in row.abs().argsort(descending=True)[:top].tolist():
            print(f"    {idx:>5}  {matrix.tokens[idx]!r:<20} {float(row[idx]):+.4g}")


def _write_viewer(matrix, path: str) -> None:
    """The interactive viewer at ``path`` and the relevance matrix as JSON beside it."""
    from ..explanations.viewer import write_viewer
    json_path = os.path.splitext(path)[0] + ".json"
    try:
        write_viewer(matrix, path)
        print(f"wrote {path}")
        matrix.to_json(json_path)
        print(f"wrote {json_path}")
    except ValueError as err:  # a NaN in the relevance
        raise CLIError(str(err).splitlines()[0]) from None
    except OSError as err:
        raise CLIError(f"cannot write {err.filename or path!r}: {err.strerror or err}") from None
