"""The token-to-token relevance matrix of a continuation (a generated or given answer).

Row ``k`` is the explanation of continuation token ``prompt_length + k`` given its prefix: the
relevance of every earlier token (prompt and earlier answer tokens) for that token's logit.
Entries at positions ``>= prompt_length + k`` (the token itself and later ones) are exactly 0:
a causal model's logit at one position cannot depend on them.

:func:`explain_matrix` computes it (see its docstring for the cost); aggregation to words,
sentences and documents and the interactive viewer read this object.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch


@dataclass
class RelevanceMatrix:
    """Relevance of every token for every continuation token (sign kept: + for, - against).

    ``tokens`` / ``token_ids``: the whole sequence, prompt then continuation (``N`` tokens).
    ``relevance``: float32 CPU tensor ``[K, N]``, ``K = N - prompt_length``.
    ``target_logits`` / ``target_probabilities``: ``[K]``, the explained logit of each row's
    token and its probability given the prefix. ``text``: the decoded sequence and ``offsets``
    the ``(start, end)`` character span of each token in it (``None`` where the tokenizer
    gives none), for aggregation to words, sentences and documents.
    """
    tokens: List[str]
    token_ids: List[int]
    prompt_length: int
    relevance: torch.Tensor
    target_logits: torch.Tensor
    target_probabilities: torch.Tensor
    text: str = ""
    offsets: Optional[List[Tuple[int, int]]] = None
    rules: str = "attnlrp"
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, k = len(self.token_ids), len(self.token_ids) - self.prompt_length
        if len(self.tokens) != n:
            raise ValueError(f"tokens has {len(self.tokens)} entries, token_ids {n}")
        if not 0 < self.prompt_length <= n:
            raise ValueError(f"prompt_length must be in [1, {n}], got {self.prompt_length}")
        if tuple(self.relevance.shape) != (k, n):
            raise ValueError(f"relevance must have shape ({k}, {n}) = (continuation tokens, "
                             f"tokens), got {tuple(self.relevance.shape)}")
        if self.offsets is not None and len(self.offsets) != n:
            raise ValueError(f"offsets has {len(self.offsets)} entries, expected {n}")

    @property
    def continuation_length(self) -> int:
        """``K``: the number of explained (continuation) tokens."""
        return len(self.token_ids) - self.prompt_length

    def row(self, k: int) -> torch.Tensor:
        """Relevance ``[N]`` for continuation token ``k`` (0-based within the continuation)."""
        return self.relevance[k]

    def to_dict(self) -> Dict[str, Any]:
        d = {"rules": self.rules, "text": self.text, "tokens": self.tokens,
             "token_ids": self.token_ids, "prompt_length": self.prompt_length,
             "offsets": [list(o) for o in self.offsets] if self.offsets is not None else None,
             "relevance": self.relevance.tolist(),
             "target_logits": self.target_logits.tolist(),
             "target_probabilities": self.target_probabilities.tolist()}
        d.update(self.meta)
        return d

    def to_json(self, path: Optional[str] = None) -> str:
        text = json.dumps(self.to_dict())
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text


__all__ = ["RelevanceMatrix"]
