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

``--memory-model`` measures instead what the budget stands for: the bytes autograd saves per
padded token during a patched forward (random Llamas, two shapes, two batch shapes; SDPA
attention), and fits ``layers x (a x hidden + b x intermediate)`` to them.
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


def saved_bytes_per_token(hidden: int, intermediate: int, layers: int, batch: int, width: int
                          ) -> float:
    """Bytes autograd saves per padded token for one patched forward of a random fp32 Llama
    (the activations an explanation keeps until its backward; parameters not counted)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      vocab_size=1000, max_position_embeddings=max(width, 64))
    model = LlamaForCausalLM(cfg).eval()
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t
    ids = torch.randint(0, 1000, (batch, width))
    with lrp_kernels.patch(model):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(inputs_embeds=emb, use_cache=False, logits_to_keep=1)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params) / (batch * width)


def memory_model() -> None:
    """The per-token memory model of the guide: saved bytes on two Llama shapes and two batch
    shapes, and the fit ``layers x (a x hidden + b x intermediate)`` elements per token."""
    shapes = [(512, 1376, 4), (1024, 2816, 2)]
    per_layer = []
    print(f"{'hidden':>6} {'inter':>6} {'layers':>6} {'batch x width':>13} {'saved B/token':>14}")
    for hidden, inter, layers in shapes:
        for batch, width in [(4, 128), (8, 256)]:
            b = saved_bytes_per_token(hidden, inter, layers, batch, width)
            print(f"{hidden:>6} {inter:>6} {layers:>6} {f'{batch} x {width}':>13} {b:>14.0f}")
            print(json.dumps({"bench": "batch_memory", "hidden": hidden, "intermediate": inter,
                              "layers": layers, "batch": batch, "width": width,
                              "saved_bytes_per_token": round(b, 1)}))
        per_layer.append(b / layers / 4)   # fp32 elements per layer and token
    (h1, i1, _), (h2, i2, _) = shapes
    b_coef = (per_layer[1] - per_layer[0] * h2 / h1) / (i2 - i1 * h2 / h1)
    a_coef = (per_layer[0] - b_coef * i1) / h1
    print(f"fit: saved elements per padded token = layers x ({a_coef:.2f} x hidden + "
          f"{b_coef:.2f} x intermediate)")


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
    ap.add_argument("--memory-model", action="store_true",
                    help="instead: bytes autograd saves per padded token on two random Llamas")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_model:
        memory_model()
        return 0
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
