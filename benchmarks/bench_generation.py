"""The relevance matrix of a continuation in one pass against K independent explanations.

``explain_matrix(model, tok, prompt, continuation=...)`` (one forward over the whole sequence,
one input-only backward per continuation token on the retained graph) against ``K`` calls of
``explain(model, tok, prefix_k, target=token_k)`` (each its own patch, forward and backward),
both measured in this run after one untimed warm-up call of each (the dispatcher measures
its backend choices on first use), interleaved, best of ``--reps``. Model: ``llama-tiny`` of
:mod:`lrp_kernels.tools.profile` (random Llama, hidden 256, 4 layers, vocabulary 1024) with a
word-level tokenizer of its vocabulary; sequences of ``--seq`` tokens in all (prompt +
continuation), ``K`` in ``--k``. Issue goal: >= 3x for K = 16 at 1024 tokens on CPU.

Each case also reports the largest difference between the matrix rows and the independent
explanations, relative to the largest relevance (they must agree: same rule, same prefix).
Prints a table, then one JSON line per case.

    PYTHONPATH=. python benchmarks/bench_generation.py [--quick] [--seq 1024] [--k 4,16]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

GOAL = 3.0


def word_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer of ``vocab_size`` tokens (4 special, then w0, w1, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 4)]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def case(model, tok, n: int, k: int, reps: int, seed: int) -> dict:
    from lrp_kernels import explain, explain_matrix

    g = torch.Generator().manual_seed(seed)
    words = [f"w{int(i)}" for i in torch.randint(0, len(tok) - 4, (n - 1,), generator=g)]
    prompt, cont = " ".join(words[:n - 1 - k]), " " + " ".join(words[n - 1 - k:])

    def one_pass():
        return explain_matrix(model, tok, prompt, continuation=cont)

    def independent():
        return [explain(model, tok, " ".join(words[:n - 1 - k + j]), target=words[n - 1 - k + j])
                for j in range(k)]

    # warm-up, untimed: the dispatcher's measured backend choices (once per shape class)
    one_pass()
    explain(model, tok, prompt, target=words[n - 1 - k])
    t_matrix, t_indep = [], []
    for _ in range(reps):  # interleaved: both see the same machine load
        t, m = timed(one_pass)
        t_matrix.append(t)
        t, exps = timed(independent)
        t_indep.append(t)
    scale = float(m.relevance.abs().max())
    diff = max(float((m.row(j)[:len(e.relevance)] - e.relevance).abs().max())
               for j, e in enumerate(exps)) / scale
    return {"bench": "generation_matrix", "model": "llama-tiny", "tokens": n, "k": k,
            "prompt_tokens": m.prompt_length, "matrix_s": min(t_matrix),
            "independent_s": min(t_indep), "speedup": min(t_indep) / min(t_matrix),
            "max_rel_diff": diff, "reps": reps, "threads": torch.get_num_threads(),
            "load_avg": os.getloadavg()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 tokens, K = 4")
    ap.add_argument("--seq", default="1024", help="comma-separated sequence lengths (tokens)")
    ap.add_argument("--k", default="4,16", help="comma-separated numbers of explained tokens")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    from lrp_kernels.tools.profile import build_model

    seqs = [256] if args.quick else [int(s) for s in args.seq.split(",")]
    ks = [4] if args.quick else [int(s) for s in args.k.split(",")]
    model = build_model("llama-tiny", max_len=max(seqs))
    tok = word_tokenizer(model.config.vocab_size)
    rows = [case(model, tok, n, k, args.reps, seed=n + k) for n in seqs for k in ks]
    print(f"llama-tiny (hidden 256, 4 layers), cpu, float32, {torch.get_num_threads()} threads; "
          f"goal: >= {GOAL}x for K = 16 at 1024 tokens")
    print(f"{'tokens':>7} {'K':>4} {'matrix s':>9} {'K x explain s':>14} {'speedup':>8} "
          f"{'max rel diff':>13} {'load':>5}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['k']:>4} {r['matrix_s']:>9.2f} {r['independent_s']:>14.2f} "
              f"{r['speedup']:>7.2f}x {r['max_rel_diff']:>13.1e} {r['load_avg']:>5.1f}")
    for r in rows:
        if r["k"] == 16 and r["tokens"] >= 1024:
            r["meets_goal"] = r["speedup"] >= GOAL
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
