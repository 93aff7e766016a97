#!/usr/bin/env python
"""Explain a dataset and read the results back: the batch pipeline on the shipped model.

Writes held-out recall prompts (``k4 17 ; k9 42 ; k2 8 ; ? k9`` -> ``42``) as JSONL with the
expected answer in ``meta``, explains them all with ``explain_dataset`` (length buckets, one
patch, durable appends), runs it a second time to show that nothing is redone, and scores the
output: how often the model is right, and how often the most relevant prompt token is the
answer's value in the context (the one token the answer depends on).

    python python/explain_dataset.py [--prompts 64] [--folder dataset-explained]
"""
import argparse
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrp_kernels.explanations.batch import explain_dataset
from lrp_kernels.tools.recall_prompts import SHIPPED_MODEL, held_out_prompts


def answer_of(prompt: str) -> dict:
    """The value stored under the queried key (``k4 17 ; k9 42 ; ? k9`` -> ``42``) and its word
    index in the prompt (the shipped tokenizer has one token per word, after ``<bos>``)."""
    words = prompt.split()
    at = words.index(words[words.index("?") + 1]) + 1
    return {"answer": words[at], "value_word": at}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64, help="held-out prompts (default: 64)")
    ap.add_argument("--folder", default="dataset-explained", help="where the JSONL files go")
    args = ap.parse_args(argv)

    tok = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL, dtype=torch.float32).eval()
    os.makedirs(args.folder, exist_ok=True)
    data, out = (os.path.join(args.folder, name) for name in ("prompts.jsonl", "relevance.jsonl"))
    with open(data, "w", encoding="utf-8") as f:
        for i, prompt in enumerate(held_out_prompts(args.prompts, min_pairs=1)):
            f.write(json.dumps({"id": f"p{i}", "prompt": prompt,
                                "meta": answer_of(prompt)}) + "\n")

    first = explain_dataset(model, tok, data, out, progress=False)
    again = explain_dataset(model, tok, data, out, progress=False)   # resumes: nothing left
    print(f"explained {first.written} prompts in {first.batches} batches "
          f"({first.examples_per_second:.0f} prompts/s); second run: {again.written} explained, "
          f"{again.already_done} already in {out}")

    with open(out, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    right = pointed = 0
    for row in rows:
        answer = row["meta"]["answer"]
        right += row["target"]["text"] == answer
        value = row["meta"]["value_word"] + 1                        # + 1: <bos>
        assert row["tokens"][value].strip() == answer
        context = row["relevance"][:row["tokens"].index(" ?")]       # the pairs, not the query
        pointed += max(range(len(context)), key=context.__getitem__) == value
    print(f"model correct on {right}/{len(rows)}; most relevant context token is the answer's "
          f"value on {pointed}/{len(rows)}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
