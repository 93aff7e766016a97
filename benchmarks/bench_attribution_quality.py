#!/usr/bin/env python
"""Attribution quality on the shipped recall model: how often does each method point at the
span that holds the answer?

For held-out prompts ``k7 23 ; k3 19 ; ... ? k3`` the answer ``19`` depends only on the
queried pair ``k3 19``. A *hit* (python/train_recall_model.py: ``answer_span_hit``) is a
prompt where the context token with the largest relevance lies in that pair; the stricter
*span precision* is the share of the pair's tokens among the most relevant context tokens (as
many as the pair has). Methods: AttnLRP
and CP-LRP (lrp_kernels.hf.patching), plain gradient x input, and a random attribution (chance level:
2 of the ``3 * n_pairs`` context tokens). Prints a table, then one JSON line per case.

    python benchmarks/bench_attribution_quality.py [--prompts 200] [--pairs 8] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, ROOT)
import train_recall_model as task  # noqa: E402

from lrp_kernels.cli.explain import SHIPPED_MODEL  # noqa: E402
from lrp_kernels.explanations.api import explain  # noqa: E402

METHODS = ("attnlrp", "cp-lrp", "gradient", "random")


def hit_rate(model, tok, exs, method: str, batch: int, seed: int) -> tuple[float, float, float, float]:
    """(hit rate, span precision, answer accuracy, seconds)."""
    if method != "random":  # warm-up: one-time imports / registrations are not timed
        explain(model, tok, exs[0]["prompt"], rules=method)
    hits, prec, correct, t0 = 0, 0.0, 0, time.perf_counter()
    rng = torch.Generator().manual_seed(seed)
    for i in range(0, len(exs), batch):
        part = exs[i:i + batch]
        if method == "random":
            for e in part:
                rel = torch.rand(1 + len(e["prompt"].split()), generator=rng)
                hits += task.answer_span_hit(rel, e)
                prec += task.span_precision(rel, e)
            continue
        for x, e in zip(explain(model, tok, [e["prompt"] for e in part], rules=method), part):
            hits += task.answer_span_hit(x.relevance, e)
            prec += task.span_precision(x.relevance, e)
            correct += x.target.text == e["answer"]
    n = len(exs)
    return (hits / n, prec / n, (correct / n if method != "random" else float("nan")),
            time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=SHIPPED_MODEL)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=0, help="pairs per prompt (0: random 2..max)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    task.use_format_of(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    rng = random.Random(args.seed)
    exs = [task.make_prompt(rng, args.pairs or rng.randint(2, task.MAX_PAIRS))
           for _ in range(args.prompts)]
    chance = sum(task.chance_hit_rate(e) for e in exs) / len(exs)

    rows = []
    for method in args.methods.split(","):
        rate, prec, acc, secs = hit_rate(model, tok, exs, method, args.batch, args.seed)
        rows.append({"bench": "attribution_quality", "method": method, "prompts": len(exs),
                     "pairs": args.pairs or f"2..{task.MAX_PAIRS}", "hit_rate": round(rate, 4), "span_precision": round(prec, 4),
                     "chance": round(chance, 4), "model_accuracy": None if acc != acc else round(acc, 4),
                     "seconds": round(secs, 2), "device": args.device})
    print(f"{'method':<10} {'hit rate':>9} {'span prec':>9} {'chance':>7} {'accuracy':>9} {'seconds':>8}")
    for r in rows:
        acc = "-" if r["model_accuracy"] is None else f"{r['model_accuracy']:.3f}"
        print(f"{r['method']:<10} {r['hit_rate']:>9.3f} {r['span_precision']:>9.3f} {r['chance']:>7.3f} {acc:>9} {r['seconds']:>8.2f}")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
