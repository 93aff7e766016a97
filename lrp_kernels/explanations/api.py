"""``lrp_kernels.explanations.api``: explain what a causal language model predicts, token by token.

One forward and one backward per call (with ``generate=n``: one forward over the prompt and
the generated tokens, then one input-only backward per generated token)::

    exp = lrp_kernels.explain(model, tokenizer, "k7 23 ; k3 19 ; ? k3")
    exp.target.text, exp.top(3)          # '19', [(index, token, relevance), ...]
    exp.to_html("heatmap.html")

How relevance is obtained (gradient view of docs/math.md): the model is patched with
:func:`lrp_kernels.patch` (AttnLRP rules, reversibly, only for the call; a model the caller has
already patched is used as it is), the input embeddings are made leaves, the explained quantity
(a logit, a sum of logits, or a logit difference) is backpropagated with gradient 1, and the
relevance of token ``i`` is ``(inputs_embeds[i] * d quantity / d inputs_embeds[i]).sum()``.
With ``rules="gradient"`` the model is not patched: plain gradient x input, the usual baseline
(refused on a patched model, whose gradient *is* the LRP relevance).

The model is left as it was: only the input gradient is computed (``torch.autograd.grad``), so
parameters' ``.grad`` and ``requires_grad`` are what the caller had before the call.

What is explained:

* default: the most likely next token;
* ``target=``: a token id or a token string (must be one token of the tokenizer);
* ``contrast=``: a foil token; explains ``logit(target) - logit(foil)`` ("why A rather than B");
  a foil equal to the target (the difference is identically 0) is an error;
* ``continuation=``: a text appended to the prompt; explains the **sum of the logits** of its
  tokens under teacher forcing. Logits, not log-probabilities: a logit is the output of the
  last linear layer, which is what LRP's relevance conservation is defined for (the relevance
  sums to the explained value), and the backward is linear in the seed, so the continuation's
  relevance is exactly the sum of its tokens' single-token explanations. Log-probabilities
  would add the log-softmax, whose gradient subtracts a probability-weighted mix of *all*
  logits, i.e. an implicit contrast against every other token;
* ``generate=n``: greedy generation of ``n`` tokens (with the model's KV cache), each explained
  given the prompt and the tokens generated before it (a list of Explanations); all of them
  come from one forward over the whole sequence, as rows of
  :func:`~lrp_kernels.explanations.matrix.explain_matrix`;
* a list of prompts: left-padded, one forward and one backward for the whole batch; padding
  receives zero relevance and is dropped from the returned Explanations.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from ..ops._common import DEFAULT_EPSILON
from . import heatmap as _hm

__all__ = ["explain", "Explanation", "Target", "ExplainError", "PromptTooLongError"]

TokenLike = Union[int, str]
GRADIENT_RULES = ("gradient", "gxi", "gradient_x_input")  # plain gradient x input, no patch
LRP_RULES = ("attnlrp", "cp-lrp")


def json_text(data: Dict[str, Any], path: Optional[str] = None) -> str:
    """``data`` as one JSON line (what every result's ``to_json`` returns), also written to
    ``path`` when given."""
    text = json.dumps(data)
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return text


class ExplainError(ValueError):
    """Bad input to :func:`explain` (unknown target token, empty prompt, ...)."""


class PromptTooLongError(ExplainError):
    """The prompt (plus continuation) does not fit the model's context or ``max_length``."""


@dataclass
class Target:
    """What was explained: token id(s), text, logit (or logit sum / difference), probability.

    For a continuation ``ids`` holds all its tokens, ``logit`` the sum of their logits and
    ``probability`` the product of their probabilities. With a contrast, ``logit`` is the
    explained difference ``logit(target) - logit(foil)`` and ``foil_*`` describe the foil.
    """
    ids: List[int]
    text: str
    logit: float
    probability: float
    foil_id: Optional[int] = None
    foil_text: Optional[str] = None

    @property
    def id(self) -> int:
        return self.ids[0]


@dataclass
class Explanation:
    """Relevance of every prompt token for one target (sign kept: + for, - against)."""
    tokens: List[str]
    token_ids: List[int]
    relevance: torch.Tensor
    target: Target
    rules: str = "attnlrp"
    prompt: Optional[str] = None
    latent: Optional[torch.Tensor] = None  # [layers + 1, tokens]: hidden-state relevance
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    def top(self, k: int = 5, absolute: bool = False) -> List[tuple]:
        """The ``k`` most relevant tokens as ``(index, token, relevance)``, largest first."""
        key = self.relevance.abs() if absolute else self.relevance
        idx = torch.argsort(key, descending=True)[:k].tolist()
        return [(i, self.tokens[i], float(self.relevance[i])) for i in idx]

    def _label(self) -> str:
        label = repr(self.target.text)
        if self.target.foil_text is not None:
            label += f" vs {self.target.foil_text!r}"
        return label + f" (p={self.target.probability:.3g})"

    def to_html(self, path: Optional[str] = None, *, scale: Optional[float] = None) -> str:
        """Self-contained HTML heatmap; written to ``path`` when given. Returns the HTML."""
        doc = _hm.html_heatmap(self.tokens, self.relevance, target=self._label(), scale=scale,
                               title=f"{self.rules} relevance for {self._label()}")
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(doc)
        return doc

    def to_pdf(self, path: str, *, backend: str = "xelatex", scale: Optional[float] = None) -> str:
        return _hm.pdf_heatmap(self.tokens, self.relevance, path, backend=backend,
                               target=self._label(), scale=scale)

    def to_png(self, path: str, *, scale: Optional[float] = None) -> str:
        return _hm.png_heatmap(self.tokens, self.relevance, path, target=self._label(), scale=scale)

    def to_dict(self) -> Dict[str, Any]:
        t = self.target
        d = {"prompt": self.prompt, "rules": self.rules, "tokens": self.tokens,
             "token_ids": self.token_ids, "relevance": self.relevance.tolist(),
             "target": {"ids": t.ids, "text": t.text, "logit": t.logit,
                        "probability": t.probability, "foil_id": t.foil_id,
                        "foil_text": t.foil_text}}
        if self.latent is not None:
            d["latent"] = self.latent.tolist()
        d.update(self.meta)
        return d

    def to_json(self, path: Optional[str] = None) -> str:
        return json_text(self.to_dict(), path)

    def save(self, path: str, **kw) -> str:
        """Write by extension: .html, .pdf, .png or .json."""
        ext = os.path.splitext(path)[1].lower()
        writers = {".html": self.to_html, ".htm": self.to_html, ".pdf": self.to_pdf,
                   ".png": self.to_png, ".json": self.to_json}
        if ext not in writers:
            raise ExplainError(f"output path must end in .html, .pdf, .png or .json, got {path!r}")
        writers[ext](path, **kw)
        return path


# ----------------------------------------------------------------------------- helpers

def _active_patch(model):
    """The caller's active :class:`~lrp_kernels.hf.patching.PatchHandle` on ``model``, or None."""
    from ..hf.patching import _MARK
    handle = vars(model).get(_MARK)
    return handle if handle is not None and getattr(handle, "active", False) else None


def _patch_context(model, rules: str, epsilon: Optional[float], backend: Optional[str],
                   strict: bool):
    """The patch for the duration of one call: none for plain gradient x input, the caller's
    own patch when the model is already patched (never a second one), else a fresh one."""
    handle = _active_patch(model)
    if rules in GRADIENT_RULES:
        if handle is not None:
            raise ExplainError(
                f"rules={rules!r} asks for the plain gradient, but the model is patched by "
                f"lrp_kernels.patch (rules={handle.rules!r}), so its gradient is {handle.rules} "
                f"relevance; call remove() on the patch handle first, or pass "
                f"rules={handle.rules!r}")
        return contextlib.nullcontext()
    if handle is not None:
        wanted = [("rules", rules, handle.rules)]
        if epsilon is not None:
            wanted.append(("epsilon", float(epsilon), handle.epsilon))
        if backend is not None:
            wanted.append(("backend", backend, handle.backend_name))
        clash = [f"{k}={want!r} (the patch has {k}={have!r})" for k, want, have in wanted
                 if want != have]
        if clash:
            raise ExplainError("the model is already patched with other options: "
                               + ", ".join(clash) + "; call remove() on the patch handle first, "
                               "or leave these arguments out to use the patch as it is")
        return handle.gradient_view()  # explain computes x * G itself, whatever the patch's view
    from ..hf.patching import patch
    return patch(model, rules=rules, epsilon=DEFAULT_EPSILON if epsilon is None else epsilon,
                 backend=backend or "auto", strict=strict)


@contextlib.contextmanager
def _keep_parameters(model):
    """Give every parameter back its ``.grad`` object and ``requires_grad`` flag on exit."""
    saved = [(p, p.grad, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, grad, flag in saved:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            if p.grad is not grad:
                p.grad = grad


def _backend_context(backend: Optional[str]):
    if backend in (None, "auto"):
        return contextlib.nullcontext()
    from ..backends.dispatch import use_backend
    return use_backend(backend)


def _token_text(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def resolve_token(tokenizer, token: TokenLike, what: str = "target") -> int:
    """A token id from an id or a token string; error if it is not exactly one token."""
    vocab_size = len(tokenizer)
    if isinstance(token, bool) or not isinstance(token, (int, str)):
        raise ExplainError(f"{what} must be a token id (int) or a token string, "
                           f"got {type(token).__name__}")
    if isinstance(token, int):
        if not 0 <= token < vocab_size:
            raise ExplainError(f"{what} token id {token} is outside the vocabulary (0..{vocab_size - 1})")
        return token
    unk = getattr(tokenizer, "unk_token_id", None)
    tid = tokenizer.convert_tokens_to_ids(token)
    if isinstance(tid, int) and tid != unk and tid is not None:
        return tid
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and ids[0] != unk:
        return ids[0]
    detail = "an unknown token" if (not ids or unk in ids) else f"{len(ids)} tokens {ids}"
    raise ExplainError(f"{what} {token!r} is not a single token of this tokenizer (it encodes to "
                       f"{detail}); use continuation= for a multi-token target")


def unknown_pieces(tokenizer, text: str) -> List[str]:
    """The parts of ``text`` the tokenizer maps to its unknown token (empty for byte-level
    tokenizers, which have none); explaining ``<unk>`` instead of what was typed is misleading."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
    if unk not in enc["input_ids"]:
        return []
    if not fast:
        return [tokenizer.unk_token]
    return [text[a:b] for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if tid == unk]


def _context_limit(model, max_length: Optional[int]) -> Optional[int]:
    limits = [max_length] if max_length else []
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if ctx:
        limits.append(int(ctx))
    return min(limits) if limits else None


def _display_tokens(tokenizer, text: Optional[str], ids: List[int],
                    offsets: Optional[List[tuple]]) -> List[str]:
    """Readable token strings that concatenate to the prompt (offsets of a fast tokenizer when
    available: each token gets the text it covers plus the whitespace before it)."""
    raw = tokenizer.convert_ids_to_tokens(ids)
    if text is None or offsets is None:
        return _hm.clean_tokens(raw)
    out, prev_end = [], 0
    special = set(getattr(tokenizer, "all_special_ids", []))
    for tid, tok, (start, end) in zip(ids, raw, offsets):
        if tid in special and start == end:
            out.append(tok)
            continue
        out.append(text[prev_end:end] if end >= prev_end else "")
        prev_end = max(prev_end, end)
    if out and prev_end < len(text):  # trailing whitespace belongs to the last token
        out[-1] += text[prev_end:]
    return out


def _appended_display(tokenizer, prefix: List[int], new: List[int]) -> List[str]:
    """Display strings of tokens appended after ``prefix`` (generated or continuation tokens):
    the text each one adds to the decoded sequence, so word-level and byte-level tokenizers
    both show their spaces; raw cleaned pieces where decoding is not incremental."""
    out, seq = [], list(prefix)
    before = _token_text(tokenizer, seq)
    for tid in new:
        seq.append(tid)
        after = _token_text(tokenizer, seq)
        if after.startswith(before):
            out.append(after[len(before):])
        else:
            out.append(_hm.clean_tokens(tokenizer.convert_ids_to_tokens([tid]))[0])
        before = after
    return out


def _forward(model, embeds, mask, keep: int):
    """Logits of the last ``keep`` positions only (hidden states for the rest)."""
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                  use_cache=False)
    try:
        return model(**kwargs, logits_to_keep=keep).logits[:, -keep:]
    except TypeError:  # models without logits_to_keep
        return model(**kwargs).logits[:, -keep:]


# ----------------------------------------------------------------------------- main entry

def _check_prompts(prompt_or_prompts) -> List[str]:
    """The prompts as a list; ExplainError naming ``prompt_or_prompts`` for anything else."""
    what = "prompt_or_prompts must be a string or a non-empty list of strings"
    if isinstance(prompt_or_prompts, str):
        prompts, single = [prompt_or_prompts], True
    elif prompt_or_prompts is None or isinstance(prompt_or_prompts, (bytes, dict)):
        raise ExplainError(f"{what}, got {type(prompt_or_prompts).__name__}")
    else:
        try:
            prompts, single = list(prompt_or_prompts), False
        except TypeError:
            raise ExplainError(f"{what}, got {type(prompt_or_prompts).__name__}") from None
        if not prompts:
            raise ExplainError(f"{what}, got an empty {type(prompt_or_prompts).__name__}")
    for i, p in enumerate(prompts):
        name = "prompt_or_prompts" if single else f"prompt_or_prompts[{i}]"
        if not isinstance(p, str):
            raise ExplainError(f"{what}; {name} is a {type(p).__name__}")
        if not p:
            raise ExplainError(f"{name} is an empty string: there is nothing to explain")
    return prompts


def _check_options(rules, epsilon, max_length, strict) -> None:
    if rules not in LRP_RULES + GRADIENT_RULES:
        raise ExplainError(f"rules must be one of {LRP_RULES + GRADIENT_RULES}, got {rules!r}")
    if epsilon is not None and (isinstance(epsilon, bool) or not isinstance(epsilon, (int, float))
                                or not math.isfinite(epsilon) or epsilon <= 0):
        raise ExplainError(f"epsilon must be a finite number > 0 (0 makes 0/0 = NaN at zero "
                           f"outputs), got {epsilon!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise ExplainError(f"max_length must be a positive number of tokens or None, "
                           f"got {max_length!r}")
    if not isinstance(strict, bool):
        raise ExplainError(f"strict must be True or False, got {strict!r}")


def explain(model, tokenizer, prompt_or_prompts: Union[str, Sequence[str]],
            target: Optional[Union[TokenLike, Sequence[TokenLike]]] = None, *,
            continuation: Optional[str] = None, contrast: Optional[TokenLike] = None,
            generate: Optional[int] = None, rules: str = "attnlrp",
            epsilon: Optional[float] = None, backend: Optional[str] = None,
            max_length: Optional[int] = None, strict: bool = True,
            device: Optional[Union[str, torch.device]] = None, latent: bool = False,
            progress: Optional[Callable[[int, int], None]] = None
            ) -> Union[Explanation, List[Explanation]]:
    """Explain a causal LM's prediction(s) for a prompt or a batch of prompts.

    Returns one :class:`Explanation` for a single prompt, a list for a list of prompts or for
    ``generate=n`` (one per generated token). ``rules``: ``"attnlrp"`` (default, through
    :func:`lrp_kernels.patch`), ``"cp-lrp"`` or ``"gradient"`` (unpatched gradient x input;
    an error on a model that is already patched). ``epsilon`` (a finite number > 0, default
    ``DEFAULT_EPSILON``), ``backend`` (``"auto"`` (default), ``"torch"``, ``"cpp"`` or
    ``"triton"``) and ``strict`` go to :func:`lrp_kernels.patch`; a model the caller has
    already patched is used as it is (left out, ``epsilon`` and ``backend`` are the patch's;
    given and different, an error). ``max_length`` caps the prompt length in tokens (default:
    the model's context); longer prompts raise :class:`PromptTooLongError`. ``device`` moves
    the model there first. ``latent=True`` also returns the relevance of every hidden state
    (embedding output and each layer), summed over the hidden dimension.
    ``progress(done, total)`` is called after each generated token.

    Bad arguments raise :class:`ExplainError` (a ``ValueError``) naming the argument: a prompt
    that is not a string or is empty, a target or contrast that is not one token, a contrast
    equal to the target, a non-finite or non-positive ``epsilon``. The parameters' ``.grad``
    and ``requires_grad`` are left as they were.
    """
    prompts = _check_prompts(prompt_or_prompts)
    _check_options(rules, epsilon, max_length, strict)
    if device is not None:
        model.to(device)
    opts = dict(rules=rules, epsilon=epsilon, backend=backend, max_length=max_length,
                strict=strict, latent=latent)
    if generate is not None:
        if not isinstance(prompt_or_prompts, str):
            raise ExplainError("generate= explains one prompt; got a batch of prompts")
        if target is not None or continuation is not None or contrast is not None:
            raise ExplainError("generate= picks its own targets; do not combine it with "
                               "target=, continuation= or contrast=")
        if not isinstance(generate, int) or generate < 1:
            raise ExplainError(f"generate must be a positive number of tokens, got {generate!r}")
        with _keep_parameters(model):
            return _explain_generation(model, tokenizer, prompt_or_prompts, generate,
                                       progress=progress, **opts)
    single = isinstance(prompt_or_prompts, str)
    if continuation is not None and target is not None:
        raise ExplainError("give either target= or continuation=, not both")
    targets = list(target) if isinstance(target, (list, tuple)) else [target] * len(prompts)
    if len(targets) != len(prompts):
        raise ExplainError(f"got {len(targets)} targets for {len(prompts)} prompts")
    if continuation is not None and (not isinstance(continuation, str) or not continuation):
        raise ExplainError(f"continuation must be a non-empty string, got {continuation!r}")
    with _keep_parameters(model):
        exps = _explain_batch(model, tokenizer, prompts, targets, continuation=continuation,
                              contrast=contrast, **opts)
    return exps[0] if single else exps


def _encode(tokenizer, prompts: List[str]):
    fast = getattr(tokenizer, "is_fast", False)
    encs = [tokenizer(p, return_offsets_mapping=fast) for p in prompts]
    ids = [list(e["input_ids"]) for e in encs]
    offsets = [list(map(tuple, e["offset_mapping"])) if fast else None for e in encs]
    return ids, offsets


def _warn_unknown(tokenizer, texts: Sequence[str]) -> None:
    for text in texts:
        unknown = unknown_pieces(tokenizer, text)
        if unknown:
            warnings.warn(f"the tokenizer does not know {unknown[:5]} (mapped to "
                          f"{tokenizer.unk_token!r}); their relevance is that of the unknown token",
                          stacklevel=4)


def _check_tokens(tokenizer, ids: List[List[int]]) -> None:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, row in enumerate(ids):
        if not row or all(t in special for t in row):
            name = "the prompt" if len(ids) == 1 else f"prompt {i}"
            raise ExplainError(f"{name} has no tokens after tokenization (only special tokens "
                               "such as <bos>): there is nothing to explain")


def _explain_batch(model, tokenizer, prompts, targets, *, continuation, contrast, rules,
                   epsilon, backend, max_length, latent, strict=True,
                   prompt_ids=None) -> List[Explanation]:
    dev = next(model.parameters()).device
    if prompt_ids is None:
        ids, offsets = _encode(tokenizer, prompts)
        _check_tokens(tokenizer, ids)
        _warn_unknown(tokenizer, list(prompts) + ([continuation] if continuation else []))
    else:  # generation: checked once by the caller
        ids, offsets = prompt_ids, [None] * len(prompt_ids)
    cont_ids: List[int] = []
    if continuation is not None:
        cont_ids = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if not cont_ids:
            raise ExplainError("continuation is empty after tokenization")
    limit = _context_limit(model, max_length)
    for i, row in enumerate(ids):
        n = len(row) + max(0, len(cont_ids) - 1)
        if limit is not None and n > limit:
            raise PromptTooLongError(
                f"prompt{'' if len(ids) == 1 else ' ' + str(i)} has {n} tokens"
                f"{' with the continuation' if cont_ids else ''}, more than the limit of "
                f"{limit} (the model's context or max_length)")
    tgt_ids = [None if t is None else resolve_token(tokenizer, t) for t in targets]
    foil_id = None if contrast is None else resolve_token(tokenizer, contrast, "contrast")
    if foil_id is not None and (foil_id in tgt_ids or cont_ids == [foil_id]):
        raise ExplainError(f"contrast {contrast!r} is the target token itself: logit(target) - "
                           "logit(contrast) is 0 and so is every relevance; pick another foil")

    # left-padded batch: all prompts end at the same column, so the last positions line up.
    # The last continuation token is only predicted, never an input.
    full = [row + cont_ids[:-1] for row in ids]
    width = max(len(r) for r in full)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in full], device=dev)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in full], device=dev)

    keep = max(1, len(cont_ids))  # positions that predict the explained tokens
    emb_layer = model.get_input_embeddings()
    with _patch_context(model, rules, epsilon, backend, strict), _backend_context(backend), \
            torch.enable_grad():
        embeds = emb_layer(input_ids).detach().requires_grad_(True)
        hidden = []
        if latent:
            out = model(inputs_embeds=embeds, attention_mask=mask,
                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False,
                        output_hidden_states=True, logits_to_keep=keep)
            logits = out.logits[:, -keep:]
            hidden = list(out.hidden_states)
        else:
            logits = _forward(model, embeds, mask, keep)
        logits32 = logits.float()
        logp = torch.log_softmax(logits32.detach(), dim=-1)
        rows = torch.arange(len(full), device=dev)
        if cont_ids:
            cid = torch.tensor(cont_ids, device=dev)
            pos = torch.arange(keep, device=dev)
            chosen = logits32[:, pos, cid]                  # [batch, L]
            objective = chosen.sum(-1)
            t_logit = objective.detach()
            t_prob = logp[:, pos, cid].sum(-1).exp()
            t_ids = [cont_ids] * len(full)
        else:
            last = logits32[:, -1]
            pick = torch.tensor([int(last[i].argmax()) if t is None else t
                                 for i, t in enumerate(tgt_ids)], device=dev)
            objective = last[rows, pick]
            t_logit = objective.detach()
            t_prob = logp[:, -1][rows, pick].exp()
            t_ids = [[int(p)] for p in pick.tolist()]
            same = [i for i, (t, p) in enumerate(zip(tgt_ids, t_ids)) if t is None and p == [foil_id]]
            if foil_id is not None and same:
                row = same[0]
                raise ExplainError(
                    f"contrast {contrast!r} is the predicted token"
                    f"{'' if len(full) == 1 else f' of prompt {row}'}, which is the default "
                    "target: logit(target) - logit(contrast) is 0 and so is every relevance; "
                    "give target= explicitly")
        if foil_id is not None:
            f_pos = -1 if not cont_ids else -keep
            objective = objective - logits32[:, f_pos, foil_id]
            t_logit = objective.detach()
        if not torch.isfinite(objective).all():
            raise ExplainError("the model produced a non-finite logit for the target; "
                               "check the model weights and dtype")
        # one backward for the whole batch: the rows are independent. Only the input (and
        # hidden-state) gradients are computed: parameters' .grad stay as the caller had them.
        wrt = [embeds] + [h for h in hidden if h.requires_grad]
        grads = torch.autograd.grad(objective.sum(), wrt, allow_unused=True)
        hidden_grad = {id(h): g for h, g in zip(wrt[1:], grads[1:])}

    grad = grads[0] if grads[0] is not None else torch.zeros_like(embeds)
    raw = (embeds.detach().float() * grad.float()).sum(-1)
    # masked (padding) keys get no attention, hence no relevance; the mask below only removes
    # rounding noise, and the raw value is reported so this stays checkable
    pad_rel = (raw * (1 - mask)).abs().sum(-1)
    rel = raw * mask
    if not torch.isfinite(rel).all():
        raise ExplainError("the relevance is not finite (NaN/Inf); try float32 or a larger "
                           "epsilon")
    lat = None
    if latent:
        lat = torch.stack([(h.detach().float() * hidden_grad[id(h)].float()).sum(-1)
                           if hidden_grad.get(id(h)) is not None else torch.zeros_like(rel)
                           for h in hidden], 1) * mask[:, None]
    exps = []
    for i, row in enumerate(ids):
        pad = width - len(full[i])
        toks = _display_tokens(tokenizer, prompts[i] if prompts else None, row, offsets[i])
        text = _token_text(tokenizer, t_ids[i])
        tgt = Target(ids=t_ids[i], text=text, logit=float(t_logit[i]),
                     probability=float(t_prob[i]), foil_id=foil_id,
                     foil_text=None if foil_id is None else _token_text(tokenizer, [foil_id]))
        # with a continuation its tokens (except the last) are inputs too, reported after the
        # prompt tokens
        span = slice(pad, width)
        tok_list = toks + (_appended_display(tokenizer, row, cont_ids[:-1]) if cont_ids else [])
        exps.append(Explanation(
            tokens=tok_list, token_ids=(row + cont_ids[:-1]) if cont_ids else row,
            relevance=rel[i, span].detach().cpu(), target=tgt, rules=rules,
            prompt=prompts[i] if prompts else None,
            latent=None if lat is None else lat[i, :, span].cpu(),
            meta={"objective": "sum of continuation logits" if cont_ids else
                  ("logit difference" if foil_id is not None else "logit"),
                  "padding_relevance": float(pad_rel[i])}))
    zero = [i for i in range(len(ids)) if float(t_logit[i]) != 0 and not rel[i].any()]
    if zero:
        warnings.warn(f"every relevance is exactly 0 for prompt(s) {zero} although the explained "
                      "value is not: it does not depend on the input embeddings through this "
                      "model's gradient", stacklevel=3)
    return exps


def _explain_generation(model, tokenizer, prompt, n, *, rules, epsilon, backend, max_length,
                        latent, strict, progress) -> List[Explanation]:
    ids, offsets = _encode(tokenizer, [prompt])
    _check_tokens(tokenizer, ids)
    _warn_unknown(tokenizer, [prompt])
    row = ids[0]
    limit = _context_limit(model, max_length)
    if limit is not None and len(row) + n - 1 > limit:
        raise PromptTooLongError(f"prompt has {len(row)} tokens; generating {n} more exceeds the "
                                 f"limit of {limit} (the model's context or max_length)")
    from .matrix import _greedy, _rows  # the one-pass relevance matrix (imports this module)
    gen = _greedy(model, row, n, getattr(tokenizer, "eos_token_id", None))
    # one forward over prompt + generation, one input-only backward per generated token
    res = _rows(model, row, gen, rules=rules, epsilon=epsilon, backend=backend, strict=strict,
                memory_budget=None, progress=progress, latent=latent)
    tokens = _display_tokens(tokenizer, prompt, row, offsets[0]) + _appended_display(
        tokenizer, row, gen)
    seq = row + gen
    exps: List[Explanation] = []
    for step, tid in enumerate(gen):
        pos = len(row) + step
        tgt = Target(ids=[tid], text=_token_text(tokenizer, [tid]), logit=float(res.logits[step]),
                     probability=float(res.probabilities[step]))
        exps.append(Explanation(
            tokens=tokens[:pos], token_ids=seq[:pos], relevance=res.relevance[step, :pos].clone(),
            target=tgt, rules=rules, prompt=prompt,
            latent=None if res.latent is None else res.latent[step, :, :pos].clone(),
            meta={"objective": "logit", "padding_relevance": 0.0, "generation_step": step}))
    return exps
