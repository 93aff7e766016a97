"""The shipped model's key-value recall task, read off a prompt (no model, no task generator).

A prompt is context pairs separated by ``;`` and a query (lrp_kernels/assets/recall-llama/README.md)::

    k7 23 ; k3 19 ; k12 5 ; ? k3          ("plain" format)  ->  19
    k7 = 23 ; k3 = 19 ; k12 = 5 ; ? k3 =  ("eq" format)     ->  19

The answer is the value paired with the queried key; the answer span is that pair's key and
value (word indices in ``prompt.split()``, without ``<bos>``; the ``=`` between them included, the
``;`` after them not).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecallPrompt:
    pairs: list            # [(key, value)] in context order
    query: str             # the queried key
    answer: str            # the value paired with it
    span_words: list       # word indices of the queried pair (key .. value)
    context_words: int     # number of context words (the pairs with their ';')


def parse(prompt: str) -> RecallPrompt:
    words = prompt.split()
    if words.count("?") != 1:
        raise ValueError(f"a recall prompt has one '?' query: {prompt!r}")
    q = words.index("?")
    if q + 1 >= len(words):
        raise ValueError(f"no key after '?': {prompt!r}")
    query = words[q + 1]
    pairs, spans, start = [], [], 0
    for i, w in enumerate(words[:q] + [";"]):
        if w != ";":
            continue
        group = list(range(start, i))
        if group:
            if len(group) < 2:
                raise ValueError(f"a pair needs a key and a value: {' '.join(words[start:i])!r}")
            pairs.append((words[group[0]], words[group[-1]]))
            spans.append(group)
        start = i + 1
    keys = [k for k, _ in pairs]
    if keys.count(query) != 1:
        raise ValueError(f"the queried key {query!r} must occur once in the context, got keys {keys}")
    at = keys.index(query)
    return RecallPrompt(pairs=pairs, query=query, answer=pairs[at][1], span_words=spans[at], context_words=q)


def answer(prompt: str) -> str:
    """The value paired with the queried key."""
    return parse(prompt).answer


def as_example(prompt: str) -> dict:
    """The fields python/train_recall_model.py's span metrics read (``pairs``, ``span_words``),
    derived from the prompt alone."""
    p = parse(prompt)
    return {"prompt": prompt, "answer": p.answer, "pairs": p.pairs, "span_words": p.span_words}
