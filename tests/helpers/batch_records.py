"""Datasets for the batch-pipeline tests: recall prompts of the shipped model with 1..8 pairs
(5..26 tokens, so buckets hold mixed lengths), a few with a target, a contrast or a
continuation, written as JSONL."""
from __future__ import annotations

import json
import random
from typing import List




def recall_prompt(rng: random.Random, pairs: int) -> tuple:
    """``(prompt, answer)`` in the shipped model's format: ``k4 17 ; k9 42 ; ? k9`` -> ``42``."""
    keys = rng.sample(range(16), pairs)
    values = [rng.randrange(100) for _ in keys]
    q = rng.randrange(pairs)
    text = " ; ".join(f"k{k} {v}" for k, v in zip(keys, values)) + f" ; ? k{keys[q]}"
    return text, str(values[q])


def mixed_records(n: int, seed: int = 0, extras: bool = True) -> List[dict]:
    """``n`` records with ids ``r0..``; with ``extras`` every 5th has a target, every 7th a
    contrast (a value that is not the answer), every 11th a continuation (its answer)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt, answer = recall_prompt(rng, rng.randint(1, 8))
        rec = {"id": f"r{i}", "prompt": prompt}
        if extras and i % 11 == 3:
            rec["continuation"] = " " + answer
        elif extras and i % 5 == 1:
            rec["target"] = answer
        if extras and i % 7 == 2 and "continuation" not in rec:
            rec["contrast"] = str((int(answer) + 1) % 100)
        out.append(rec)
    return out


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)
