#!/usr/bin/env python
"""Explain one prompt with AttnLRP and write a heatmap (HTML, PNG, PDF or JSON).

    python python/explain_prompt.py                       # the shipped recall model, demo prompt
    python python/explain_prompt.py "k1 4 ; k9 30 ; ? k9" --out heatmap.html
    python python/explain_prompt.py "The capital of France is" --model path/to/llama --generate 3

The same as ``lrp-kernels explain``, written out as the few lines of Python a user needs.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lrp_kernels
from lrp_kernels.cli.explain import SHIPPED_MODEL


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prompt", nargs="?", default="k7 23 ; k3 19 ; k12 5 ; k0 31 ; ? k3")
    ap.add_argument("--model", default=SHIPPED_MODEL, help="local folder or hub id")
    ap.add_argument("--target", default=None, help="token to explain (default: the prediction)")
    ap.add_argument("--contrast", default=None, help="foil token: explain target minus foil")
    ap.add_argument("--generate", type=int, default=None, help="generate and explain N tokens")
    ap.add_argument("--out", default="heatmap.html", help=".html, .png, .pdf or .json")
    args = ap.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    result = lrp_kernels.explain(model, tokenizer, args.prompt, args.target,
                                 contrast=args.contrast, generate=args.generate)
    explanations = result if isinstance(result, list) else [result]
    root, ext = os.path.splitext(args.out)
    for i, exp in enumerate(explanations):
        print(f"target {exp.target.text!r} (p={exp.target.probability:.3f}); most relevant tokens:")
        for idx, token, rel in exp.top(5):
            print(f"  {idx:>3} {token!r:<10} {rel:+.4f}")
        path = args.out if len(explanations) == 1 else f"{root}-{i}{ext}"
        exp.save(path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
