#!/usr/bin/env python
"""How faithful is each attribution method? Perturbation curves and ABPC on the shipped model.

Removes the input tokens of held-out recall prompts (``k4 17 ; k9 42 ; k2 8 ; ? k9`` -> ``42``)
most-relevant-first and least-relevant-first, tracks the target's logit, and prints the area
between the two normalised curves (ABPC: higher is more faithful) of AttnLRP, CP-LRP, gradient
x input and a random attribution; writes the mean curves as a PNG.

    python python/faithfulness.py [--prompts 200] [--removal zero|replace] [--out curves.png]
"""
import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrp_kernels.tools.faithfulness import perturbation_curves
from lrp_kernels.tools.recall_prompts import SHIPPED_MODEL, held_out_prompts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200, help="held-out prompts (default: 200)")
    ap.add_argument("--removal", default="zero", choices=("zero", "replace"))
    ap.add_argument("--out", default="curves.png", help="PNG of the mean curves")
    args = ap.parse_args(argv)

    tok = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL, dtype=torch.float32).eval()
    prompts = held_out_prompts(args.prompts)

    result = perturbation_curves(model, tok, prompts, removal=args.removal)
    print(result.table())
    d = result.difference("attnlrp", "gradxinput")
    print(f"AttnLRP - gradient x input: {d['mean']:+.3f} +- {d['stderr']:.3f} "
          f"(higher on {d['wins']:.0%} of the prompts)")
    print(f"wrote {result.plot(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
