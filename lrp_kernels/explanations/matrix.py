"""The token-to-token relevance matrix of a continuation (a generated or given answer).

Row ``k`` is the explanation of continuation token ``prompt_length + k`` given its prefix: the
relevance of every earlier token (prompt and earlier answer tokens) for that token's logit.
Entries at positions ``>= prompt_length + k`` (the token itself and later ones) are exactly 0:
a causal model's logit at one position cannot depend on them.

:func:`explain_matrix` computes it (see its docstring for the cost); aggregation to words,
sentences and documents and the interactive viewer read this object.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import api as _api
from .api import ExplainError, PromptTooLongError, json_text


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
        return json_text(self.to_dict(), path)


def _greedy(model, prompt_ids: List[int], n: int, eos: Optional[int]) -> List[int]:
    """``n`` tokens by greedy decoding with the model's KV cache (no gradients; stops after
    ``eos``). Generation needs no patch: the patched forward computes the same values."""
    dev = next(model.parameters()).device
    # transformers 5 names the cache argument ``cache``; earlier versions ``past_key_values``
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    out: List[int] = []
    ids = torch.tensor([prompt_ids], device=dev)
    cache = None
    with torch.no_grad():
        for _ in range(n):
            kwargs = {} if cache is None else {cache_arg: cache}
            res = model(input_ids=ids, use_cache=True, **kwargs)
            cache = getattr(res, "cache", None)
            if cache is None:
                cache = getattr(res, "past_key_values", None)
            nxt = int(res.logits[0, -1].float().argmax())
            out.append(nxt)
            if eos is not None and nxt == eos:
                break
            # without a cache (a model that returns none) the whole sequence goes in again
            ids = torch.tensor([[nxt]] if cache is not None else [prompt_ids + out], device=dev)
    return out


def _check_request(continuation, generate, memory_budget, progress) -> None:
    if (continuation is None) == (generate is None):
        raise ExplainError("give exactly one of continuation= (a text to explain token by "
                           "token) or generate= (a number of tokens to generate greedily)")
    if continuation is not None and (not isinstance(continuation, str) or not continuation):
        raise ExplainError(f"continuation must be a non-empty string, got {continuation!r}")
    if generate is not None and (isinstance(generate, bool) or not isinstance(generate, int)
                                 or generate < 1):
        raise ExplainError(f"generate must be a positive number of tokens, got {generate!r}")
    if memory_budget is not None and (isinstance(memory_budget, bool)
                                      or not isinstance(memory_budget, (int, float))
                                      or not memory_budget > 0):
        raise ExplainError(f"memory_budget must be a positive number of bytes or None, "
                           f"got {memory_budget!r}")
    if progress is not None and not callable(progress):
        raise ExplainError(f"progress must be a callable progress(done, total) or None, "
                           f"got {type(progress).__name__}")


def explain_matrix(model, tokenizer, prompt: str, *, continuation: Optional[str] = None,
                   generate: Optional[int] = None, rules: str = "attnlrp",
                   epsilon: Optional[float] = None, backend: Optional[str] = None,
                   max_length: Optional[int] = None, memory_budget: Optional[float] = None,
                   progress: Optional[Callable[[int, int], None]] = None,
                   strict: bool = True) -> RelevanceMatrix:
    """The relevance of every earlier token for every token of a continuation.

    Give exactly one of ``continuation`` (a text appended to ``prompt``, tokenized without
    special tokens, as :func:`~lrp_kernels.explanations.api.explain` does) or ``generate``
    (``n`` tokens decoded greedily with the model's KV cache; stops after the end-of-sequence
    token). Row ``k`` of the result is the explanation of continuation token ``k``'s logit
    given its prefix, equal to ``explain(model, tokenizer, prefix, target=token)``.
    ``rules``, ``epsilon``, ``backend``, ``max_length`` and ``strict`` mean what they mean for
    :func:`~lrp_kernels.explanations.api.explain`.

    Cost: one forward over prompt + continuation (the last token is only predicted) and one
    input-only backward per continuation token on that graph (:func:`_rows`). ``memory_budget``
    (bytes, default 1 GiB) bounds the cotangents of rows backpropagated together where the
    backward is batched (``rules="gradient"``); the patched rules run one row per backward,
    whose memory is that of one explanation. ``progress(done, total)`` is called after each
    row.

    Bad arguments raise :class:`~lrp_kernels.explanations.api.ExplainError` naming the
    argument; a sequence longer than the context raises
    :class:`~lrp_kernels.explanations.api.PromptTooLongError`.
    """
    if not isinstance(prompt, str):
        raise ExplainError("prompt must be a string (explain_matrix explains one prompt), got "
                           f"{type(prompt).__name__}")
    if not prompt:
        raise ExplainError("prompt is an empty string: there is nothing to explain")
    prompts = [prompt]
    _api._check_options(rules, epsilon, max_length, strict)
    _check_request(continuation, generate, memory_budget, progress)
    ids, offsets = _api._encode(tokenizer, prompts)
    _api._check_tokens(tokenizer, ids)
    _api._warn_unknown(tokenizer, prompts + ([continuation] if continuation else []))
    prompt_ids = ids[0]
    limit = _api._context_limit(model, max_length)
    if continuation is not None:
        cont_ids = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if not cont_ids:
            raise ExplainError("continuation is empty after tokenization")
        n_inputs = len(prompt_ids) + len(cont_ids) - 1
    else:
        n_inputs = len(prompt_ids) + generate - 1
    if limit is not None and n_inputs > limit:
        raise PromptTooLongError(
            f"prompt has {len(prompt_ids)} tokens; with the "
            f"{'continuation' if continuation is not None else f'{generate} generated tokens'} "
            f"the model reads {n_inputs}, more than the limit of {limit} (the model's context "
            "or max_length)")
    with _api._keep_parameters(model):
        if continuation is None:
            cont_ids = _greedy(model, prompt_ids, generate,
                               getattr(tokenizer, "eos_token_id", None))
        res = _rows(model, prompt_ids, cont_ids, rules=rules, epsilon=epsilon,
                    backend=backend, strict=strict, memory_budget=memory_budget,
                    progress=progress)
    prompt_tokens = _api._display_tokens(tokenizer, prompt, prompt_ids, offsets[0])
    appended = _api._appended_display(tokenizer, prompt_ids, cont_ids)
    text = prompt + "".join(appended)
    spans = None
    if offsets[0] is not None:
        spans, at = [tuple(o) for o in offsets[0]], len(prompt)
        for piece in appended:  # like a fast tokenizer's offsets: without leading spaces
            spans.append((at + len(piece) - len(piece.lstrip()), at + len(piece)))
            at += len(piece)
    return RelevanceMatrix(
        tokens=prompt_tokens + appended, token_ids=prompt_ids + cont_ids,
        prompt_length=len(prompt_ids), relevance=res.relevance, target_logits=res.logits,
        target_probabilities=res.probabilities, text=text, offsets=spans, rules=rules,
        meta={"source": "continuation" if continuation is not None else "greedy generation",
              "future_relevance": res.future, "batched_backward": res.batched})


DEFAULT_MEMORY_BUDGET = 2 ** 30  # bytes for the cotangents of rows backpropagated together


@dataclass
class _Rows:
    """What :func:`_rows` computes: ``relevance`` ``[K, N]`` (float32, CPU), ``logits`` and
    ``probabilities`` ``[K]``, ``latent`` ``[K, layers + 1, N]`` or None, ``future`` the largest
    relevance that reached a position at or after its row's token before it was set to 0 (0 up
    to rounding for a causal model), ``batched`` whether rows shared backward passes."""
    relevance: torch.Tensor
    logits: torch.Tensor
    probabilities: torch.Tensor
    latent: Optional[torch.Tensor]
    future: float
    batched: bool


def _rows_per_pass(n: int, model, memory_budget: Optional[float]) -> int:
    """How many rows one batched backward may carry: a row's cotangents are about a dozen
    hidden-state-sized tensors plus one attention matrix per head (the unfused backward)."""
    cfg = getattr(model, "config", None)
    hidden = int(getattr(cfg, "hidden_size", 0) or 1024)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 16)
    per_row = 4 * n * (12 * hidden + n * heads)
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    return max(1, int(budget // per_row))


def _rows(model, prompt_ids: List[int], cont_ids: List[int], *, rules: str,
          epsilon: Optional[float], backend: Optional[str], strict: bool,
          memory_budget: Optional[float], progress: Optional[Callable[[int, int], None]],
          latent: bool = False) -> _Rows:
    """Every row of the matrix from one forward over the sequence (the last token is only
    predicted, never an input) and one input-only backward per row, all on the same graph.

    Causal masking makes the logit at position ``p`` of the full forward the logit of the
    prefix ending at ``p``, and the backward of every rule acts on the same causal graph, so
    row ``k`` is the single-target explanation of its token given its prefix. Rows go through
    batched cotangents (``is_grads_batched``, chunked to ``memory_budget``) where the backward
    supports ``vmap`` (plain autograd: ``rules="gradient"``); the patched rules' backwards do
    not, so there each row is one more backward of the retained graph.
    """
    seq = prompt_ids + cont_ids
    n, k_total, p0 = len(seq), len(cont_ids), len(prompt_ids)
    dev = next(model.parameters()).device
    input_ids = torch.tensor([seq[:-1]], device=dev)
    mask = torch.ones_like(input_ids)
    emb_layer = model.get_input_embeddings()
    for p in model.parameters():  # input-only backwards: no weight-gradient edges in the graph
        p.requires_grad_(False)   # (the caller's flags come back with _keep_parameters)
    rel = torch.zeros(k_total, n)
    lat = None
    batched = rules in _api.GRADIENT_RULES
    with _api._patch_context(model, rules, epsilon, backend, strict), \
            _api._backend_context(backend), torch.enable_grad():
        embeds = emb_layer(input_ids).detach().requires_grad_(True)
        hidden: List[torch.Tensor] = []
        if latent:
            out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                        position_ids=torch.arange(n - 1, device=dev)[None],
                        output_hidden_states=True, logits_to_keep=k_total)
            logits = out.logits[:, -k_total:]
            states = list(out.hidden_states)
            hidden = [h for h in states if h.requires_grad and h is not embeds]
            lat = torch.zeros(k_total, len(states), n)
            # hidden state i -> its entry of wrt below (0: the embeddings), None: no gradient
            where = [next((j for j, t in enumerate([embeds] + hidden) if t is h), None)
                     for h in states]
        else:
            logits = _api._forward(model, embeds, mask, k_total)
        logits32 = logits[0].float()                                 # [K, vocab]
        rows = torch.arange(k_total, device=dev)
        cid = torch.tensor(cont_ids, device=dev)
        chosen = logits32[rows, cid]                                 # [K]
        if not torch.isfinite(chosen).all():
            raise ExplainError("the model produced a non-finite logit for a continuation "
                               "token; check the model weights and dtype")
        probs = torch.log_softmax(logits32.detach(), -1)[rows, cid].exp()
        wrt = [embeds] + hidden
        x = [w.detach().float() for w in wrt]
        step = _rows_per_pass(n, model, memory_budget) if batched else 1
        done = 0
        while done < k_total:
            chunk = list(range(done, min(done + step, k_total)))
            last = chunk[-1] == k_total - 1
            grads = None
            if batched:
                seeds = torch.zeros(len(chunk), k_total, device=dev, dtype=chosen.dtype)
                seeds[torch.arange(len(chunk)), torch.tensor(chunk)] = 1
                try:
                    grads = torch.autograd.grad(chosen, wrt, grad_outputs=seeds, retain_graph=True,
                                                is_grads_batched=True, allow_unused=True)
                except RuntimeError:  # an op without a vmap rule: one backward per row
                    batched, step = False, 1
                    continue
            else:
                g1 = torch.autograd.grad(chosen[chunk[0]], wrt, retain_graph=not last,
                                         allow_unused=True)
                grads = [None if g is None else g.unsqueeze(0) for g in g1]
            for j, k in enumerate(chunk):
                vals = [torch.zeros(n - 1, device=dev) if g is None else
                        (xi[0] * g[j, 0].float()).sum(-1) for xi, g in zip(x, grads)]
                rel[k, :n - 1] = vals[0].cpu()
                if lat is not None:
                    for i, j in enumerate(where):
                        if j is not None:
                            lat[k, i, :n - 1] = vals[j].cpu()
            done += len(chunk)
            if progress is not None:  # once per row, also for rows finished together
                for k in chunk:
                    progress(k + 1, k_total)
    # positions at and after each row's token: 0 by causality; kept as a check, then cleared
    future = torch.arange(n)[None, :] >= (p0 + torch.arange(k_total))[:, None]
    leak = float(rel[future].abs().max()) if future.any() else 0.0
    rel[future] = 0
    if lat is not None:
        lat[future[:, None, :].expand_as(lat)] = 0
    if not torch.isfinite(rel).all():
        raise ExplainError("the relevance is not finite (NaN/Inf); try float32 or a larger "
                           "epsilon")
    chosen = chosen.detach()
    zero = [k for k in range(k_total) if float(chosen[k]) != 0 and not rel[k].any()]
    if zero:
        warnings.warn(f"every relevance is exactly 0 for continuation token(s) {zero} although "
                      "the explained logit is not: it does not depend on the input embeddings "
                      "through this model's gradient", stacklevel=3)
    return _Rows(rel, chosen.cpu(), probs.cpu(), lat, leak, batched)


__all__ = ["RelevanceMatrix", "explain_matrix"]
