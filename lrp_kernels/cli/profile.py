"""``lrp-kernels profile``: time and peak memory of an AttnLRP explanation per sequence length,
with the ratio to a plain forward + input-gradient pass of the same model (same run)."""
from __future__ import annotations

import argparse
import json
import os

from . import CLIError, int_at_least

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "profile", help="time and peak memory of an explanation per sequence length",
        description="Run one AttnLRP explanation (forward + backward of the top next-token logit) "
                    "per sequence length on random token ids and print forward / backward / total "
                    "time and peak memory, with the ratio to a plain forward + input-gradient pass "
                    "(SDPA attention) of the same model in the same run.")
    p.add_argument("--model", default="llama-tiny",
                   help="a local model directory, or a random-weight shape: llama-tiny (hidden 256, "
                        "4 layers), llama-long-bench (hidden 512, 8 layers), llama-3-8b-shape")
    p.add_argument("--seq", default="512,1024", help="comma-separated sequence lengths (default 512,1024)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--batch", type=int_at_least(1), default=1, help="batch size (default 1)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "cpp", "triton"),
                   help="rule backend of the patch (default auto)")
    p.add_argument("--rules", default="attnlrp", choices=("attnlrp", "cp-lrp"))
    p.add_argument("--checkpointing", action="store_true", help="enable gradient checkpointing")
    p.add_argument("--repeats", type=int_at_least(1), default=1,
                   help="runs per mode and length, interleaved; the table shows medians (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON line per length and mode instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _seq_lens(text: str) -> list[int]:
    try:
        lens = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"--seq must be comma-separated positive integers, got {text!r}") from None
    if not lens or any(n <= 0 for n in lens):
        raise CLIError(f"--seq must be comma-separated positive integers, got {text!r}")
    return lens


def run(args) -> int:
    import torch

    from ..tools.profile import NAMED_MODELS, build_model, format_table, profile

    lens = _seq_lens(args.seq)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here")
    if not (device == "cpu" or device.startswith("cuda")):
        raise CLIError(f"--device must be cpu or cuda[:i], got {device!r}")
    if args.model not in NAMED_MODELS:
        if not os.path.isdir(args.model):
            raise CLIError(f"--model must be a local model directory or one of "
                           f"{sorted(NAMED_MODELS)}, got {args.model!r}")
        from ._models import load_config
        load_config(args.model, "--model")  # no config / model_type / causal-LM head: one line
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    try:
        model = build_model(args.model, device=device, dtype=dtype, max_len=max(lens))
    except (OSError, ValueError) as err:
        from ._models import first_line
        raise CLIError(f"could not load --model {args.model!r}: {first_line(err)}") from None
    from ..backends.dispatch import BackendUnavailableError
    from ..hf.patching import UnsupportedModelError
    try:
        rows = profile(model, lens, batch=args.batch, checkpointing=args.checkpointing,
                       backend=args.backend, rules=args.rules, progress=not args.no_progress,
                       repeats=args.repeats)
    except UnsupportedModelError as err:
        from ._models import unsupported_message
        raise CLIError(f"--model {args.model!r}: {unsupported_message(err, flag=None)} "
                       "(profile measures a fully patched model)") from None
    except BackendUnavailableError as err:
        raise CLIError(f"--backend {args.backend}: {err}") from None
    if args.json:
        for r in rows:
            print(json.dumps({"model": args.model, **r}), flush=True)
    else:
        print(f"model {args.model}, {rows[0]['device']}, {rows[0]['dtype']}, batch {args.batch}"
              f"{', gradient checkpointing' if args.checkpointing else ''}")
        print(format_table(rows))
    return 0
