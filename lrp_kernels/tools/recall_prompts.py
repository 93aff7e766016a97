"""Held-out prompts of the shipped model's key-value recall task, generated from its metadata.

The shipped model (``lrp_kernels/assets/recall-llama``) answers ``k4 17 ; k9 42 ; k2 8 ; ? k9``
with ``42``. Its ``metadata.json`` lists the keys, values, maximum number of pairs and prompt
format it was trained on; this module draws prompts from the same distribution as the training
script's held-out stream (``python/train_recall_model.py``: ``make_prompt``), so commands that
need data (``lrp-kernels faithfulness``) work out of the box. The default seed is not one of the
training seeds (training uses ``seed``, ``seed + 1``, ``seed + 2`` with seed 11).
"""
from __future__ import annotations

import json
import os
import random
from typing import List

SHIPPED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "assets", "recall-llama")
HELD_OUT_SEED = 20261127


def held_out_prompts(n: int, seed: int = HELD_OUT_SEED, model_dir: str = SHIPPED_MODEL,
                     min_pairs: int = 2) -> List[str]:
    """``n`` recall prompts with ``min_pairs`` .. ``max_pairs`` context pairs each.

    Drawn as the training script's ``make_prompt`` draws them (same random calls in the same
    order), so a seed gives the same prompts here and there. ``model_dir`` is a folder whose
    ``metadata.json`` describes the task (the shipped model's by default).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of prompts, got {n!r}")
    path = os.path.join(model_dir, "metadata.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        keys, values, max_pairs = meta["keys"], meta["values"], int(meta["max_pairs"])
        fmt = meta.get("format", "plain")
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"model_dir {model_dir!r} has no recall-task metadata.json with keys, "
                         f"values and max_pairs ({err})") from None
    if not 1 <= min_pairs <= max_pairs:
        raise ValueError(f"min_pairs must be between 1 and {max_pairs}, got {min_pairs!r}")
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        n_pairs = rng.randint(min_pairs, max_pairs)
        pairs = [(k, rng.choice(values)) for k in rng.sample(keys, n_pairs)]
        query = pairs[rng.randrange(n_pairs)][0]
        if fmt == "eq":
            words = [w for k, v in pairs for w in (k, "=", v, ";")] + ["?", query, "="]
        else:
            words = [w for k, v in pairs for w in (k, v, ";")] + ["?", query]
        prompts.append(" ".join(words))
    return prompts
