#!/usr/bin/env python
"""Which document does each sentence of an answer come from? RAG source attribution with
AttnLRP on the shipped recall model, written out as the Python a user needs.

    python python/explain_rag.py                          # demo documents, writes rag.html
    python python/explain_rag.py --out /tmp/rag.html

Each key-value pair is a "document" (``k9 42``); the question is a query (``? k9``); the
model answers with the value, so the right source is known. For a real LLM use the ``"qa"``
template (``Document [1]: ...``, ``Question: ...``, ``Answer:``) and ``generate=``:

    report = explain_sources(model, tok, documents, "Who wrote it?", generate=40,
                             level="sentence")

The same from the command line: ``lrp-kernels sources docs.jsonl --question "? k9"``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrp_kernels.cli.explain import SHIPPED_MODEL
from lrp_kernels.explanations.matrix import explain_matrix
from lrp_kernels.explanations.sources import attribute_sources, build_prompt, explain_sources
from lrp_kernels.explanations.viewer import write_viewer

DOCUMENTS = [{"id": "k4", "text": "k4 17"}, {"id": "k9", "text": "k9 42"},
             {"id": "k2", "text": "k2 8"}, {"id": "k13", "text": "k13 65"}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--question", default="? k9", help="the query (default: '? k9')")
    ap.add_argument("--out", default="rag.html", help="the viewer (.json and .csv beside it)")
    args = ap.parse_args(argv)

    tok = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL, dtype=torch.float32).eval()

    # 1. documents + question -> prompt, generate the answer, sources per answer sentence
    report = explain_sources(model, tok, DOCUMENTS, args.question, generate=1,
                             template="key-value")
    print(f"prompt: {report.prompt!r}\nanswer: {report.answer.strip()!r}")
    print(report.format())

    # 2. two answers in one continuation (the model also answers a follow-up query), each
    #    attributed on its own: the relevance matrix has one row per answer token
    sp = build_prompt(DOCUMENTS, "? k9", template="key-value")
    matrix = explain_matrix(model, tok, sp.prompt, continuation=" 42 ; ? k2 8")
    end = len(matrix.text)
    two = attribute_sources(matrix, sp, answer_spans=[(len(sp.prompt) + 1, len(sp.prompt) + 3),
                                                      (end - 1, end)])
    print("\ntwo answers:")
    print(two.format())

    root = os.path.splitext(args.out)[0]
    write_viewer(two, args.out)
    two.to_json(root + ".json")
    two.to_csv(root + ".csv")
    print(f"wrote {args.out}, {root}.json, {root}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
