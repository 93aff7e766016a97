#!/usr/bin/env python
"""Examples per second of the batch pipeline vs one-by-one ``explain`` calls, same run.

64 recall prompts of mixed length (1..8 pairs, 5..26 tokens) on the shipped model, three ways:

* ``one_by_one``: ``explain(model, tok, prompt)`` per prompt (the loop a user writes; every
  call patches and restores the model);
* ``one_by_one_patched``: the same inside one ``lrp_kernels.patch`` (no per-call patching: what
  is left is the per-prompt forward and backward);
* ``batch``: ``explain_dataset`` (length buckets under ``--max-tokens``, one patch, JSONL output
  with an fsync per batch, the final reordering included); ``batch_256``: the same under a
  budget of 256 padded tokens (``--small-max-tokens``), so the prompts go through several
  length buckets.

Rounds interleave the three cases (so a change in machine load hits all of them); the median
of ``--repeats`` rounds is reported. Prints a table, then one JSON line per case with the
speed-up over ``one_by_one`` and the 1-minute load average before and after.

    python benchmarks/bench_batch.py [--prompts 64] [--repeats 3] [--threads 1] [--max-tokens 2048]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lrp_kernels  # noqa: E402
from lrp_kernels.cli.explain import SHIPPED_MODEL  # noqa: E402
from lrp_kernels.explanations.api import explain  # noqa: E402
from lrp_kernels.explanations.batch import DEFAULT_MAX_TOKENS, explain_dataset  # noqa: E402


def prompts(n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        keys = rng.sample(range(16), rng.randint(1, 8))
        pairs = " ; ".join(f"k{k} {rng.randrange(100)}" for k in keys)
        out.append(f"{pairs} ; ? k{rng.choice(keys)}")
    return out


def run_one_by_one(model, tok, texts):
    return [explain(model, tok, t) for t in texts]


def run_one_by_one_patched(model, tok, texts):
    with lrp_kernels.patch(model):
        return [explain(model, tok, t) for t in texts]


def run_batch(model, tok, texts, max_tokens):
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "out.jsonl")
        explain_dataset(model, tok, [{"id": i, "prompt": t} for i, t in enumerate(texts)], out,
                        max_tokens=max_tokens, progress=False)
        with open(out) as f:
            return [json.loads(line) for line in f]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine more threads spin)")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    ap.add_argument("--small-max-tokens", type=int, default=256,
                    help="a second batch case with this budget (several buckets)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL, dtype=torch.float32).eval()
    texts = prompts(args.prompts, args.seed)
    lengths = [len(tok(t)["input_ids"]) for t in texts]

    cases = {"one_by_one": lambda: run_one_by_one(model, tok, texts),
             "one_by_one_patched": lambda: run_one_by_one_patched(model, tok, texts),
             "batch": lambda: run_batch(model, tok, texts, args.max_tokens),
             f"batch_{args.small_max_tokens}": lambda: run_batch(model, tok, texts,
                                                                 args.small_max_tokens)}
    load_before = os.getloadavg()[0]
    # warm-up (not timed): imports, the C++ extension, the dispatcher's first choices
    run_one_by_one(model, tok, texts[:2])
    run_batch(model, tok, texts[:4], args.max_tokens)
    seconds = {name: [] for name in cases}
    results = {}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            results[name] = fn()
            seconds[name].append(time.perf_counter() - t0)
    load_after = os.getloadavg()[0]

    # same numbers: the batch rows against one-by-one explanations (float32, padding only)
    worst = max(float((torch.tensor(row["relevance"]) - e.relevance).abs().max()
                      / e.relevance.abs().max())
                for row, e in zip(results["batch"], results["one_by_one"]))
    base = statistics.median(seconds["one_by_one"])
    budgets = {"batch": args.max_tokens, f"batch_{args.small_max_tokens}": args.small_max_tokens}
    rows = []
    for name, ts in seconds.items():
        med = statistics.median(ts)
        rows.append({"bench": "batch", "case": name, "prompts": len(texts),
                     "tokens_min": min(lengths), "tokens_max": max(lengths),
                     "seconds_median": round(med, 4), "seconds_all": [round(t, 4) for t in ts],
                     "examples_per_second": round(len(texts) / med, 2),
                     "speedup_vs_one_by_one": round(base / med, 2), "threads": args.threads,
                     "max_tokens": budgets.get(name), "load_1min_before": round(load_before, 2),
                     "load_1min_after": round(load_after, 2),
                     "max_relative_relevance_difference_batch_vs_one_by_one": worst})
    print(f"{len(texts)} prompts of {min(lengths)}..{max(lengths)} tokens, {args.threads} thread(s), "
          f"median of {args.repeats}; load {load_before:.2f} -> {load_after:.2f}")
    print(f"{'case':<20} {'seconds':>9} {'examples/s':>11} {'speed-up':>9}")
    for r in rows:
        print(f"{r['case']:<20} {r['seconds_median']:>9.3f} {r['examples_per_second']:>11.2f} "
              f"{r['speedup_vs_one_by_one']:>8.2f}x")
    print(f"batch vs one-by-one relevance: max |dR| / max |R| = {worst:.2e}")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
