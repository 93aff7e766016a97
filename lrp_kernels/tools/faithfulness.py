"""``lrp_kernels.tools.faithfulness``: perturbation curves and the area between them (ABPC).

Does removing the tokens an attribution calls most relevant destroy the prediction faster than
removing the ones it calls least relevant? For each prompt and method::

    result = perturbation_curves(model, tokenizer, prompts)   # AttnLRP, CP-LRP, grad x input, random
    print(result.table())                                     # ABPC per method (higher: more faithful)
    result.plot("curves.png")

The protocol (one prompt; the flipping experiments of the AttnLRP paper, scored by the area
between perturbation curves of Blücher et al.):

1. **Target and relevance.** The target is what :func:`lrp_kernels.explain` explains for the
   unperturbed prompt: the most likely next token, or the prompt's given target. Each method
   gives one signed relevance per token: ``"attnlrp"`` and ``"cp-lrp"`` through
   :func:`~lrp_kernels.explain`, ``"gradxinput"`` the unpatched model's gradient x input
   (``explain(rules="gradient")``), ``"random"`` uniform noise from one ``torch.Generator``
   seeded with ``seed`` and drawn prompt after prompt (reproducible).
2. **Removable tokens.** Every token that is not a special token of the tokenizer (``<bos>``
   and friends stay: removing the attention sink measures the damage done to the model, not to
   the evidence). ``N`` of them.
3. **Orders.** Most relevant first (MoRF): removable positions sorted by relevance, largest
   (most positive) first; least relevant first (LeRF): smallest first. Ties keep the positions'
   order (stable sort).
4. **Steps.** With ``S = min(steps, N)`` steps (``steps=None``: ``S = N``, one token per step),
   step ``j`` has removed the first ``k_j = floor(j N / S)`` tokens of the order,
   ``j = 0 .. S``: ``k_0 = 0``, ``k_S = N``, every removable token removed exactly once.
5. **Removal** keeps the sequence length and positions and changes the token's input embedding:
   ``removal="zero"`` sets it to the zero vector; ``removal="replace"`` sets it to the embedding
   of ``baseline_token`` (default: the tokenizer's unknown token, else its padding token).
6. **Score** ``y_j``: the target's logit at the last position (``score="logit"``, default: the
   quantity the relevance explains) or its softmax probability (``score="probability"``), from a
   plain forward without gradient. All steps of all methods of one prompt run as one batch of
   embeddings (split so that no forward holds more than ``forward_tokens`` tokens).
7. **Normalisation** per prompt: ``n_j = (y_j - y_S) / |y_0 - y_S|``. The first and the last
   point are the same for both orders and every method (nothing / every removable token
   removed), so every normalised curve ends at 0 and starts at 1 (or at -1 on a prompt where
   removing everything *raises* the score, counted as ``inverted``), whatever the logit's
   offset and scale. Dividing by the absolute value keeps the meaning of the area: a prompt's
   normalised ABPC is its ABPC in score units times the positive weight ``1 / |y_0 - y_S|``. A
   prompt whose ``|y_0 - y_S| <= 1e-6 max(1, |y_0|)`` (removing everything does not
   change the score) has no such curve; it is left out of every method's averages with a
   warning and its index listed in ``FaithfulnessResult.skipped``.
8. **Areas** by the trapezoidal rule over the removed fraction ``x_j = k_j / N``:
   ``A = sum_j (x_{j+1} - x_j) (n_j + n_{j+1}) / 2``, and
   ``ABPC = A(LeRF) - A(MoRF)``: positive when removing the tokens called relevant hurts more
   than removing the ones called irrelevant; about 0 for a random attribution. A method's ABPC
   is the mean over prompts (with its standard error); ``abpc_raw`` is the same area difference
   of the unnormalised scores (in logits or probabilities).

Mean curves for plots are each prompt's normalised curve interpolated linearly onto 101 evenly
spaced fractions and averaged.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..explanations.api import _forward, explain, resolve_token

__all__ = ["perturbation_curves", "FaithfulnessResult", "PromptCurves", "FaithfulnessError",
           "METHODS", "REMOVALS", "SCORES", "area", "removal_counts"]

METHODS = ("attnlrp", "cp-lrp", "gradxinput", "random")
# method name -> explain(rules=...); random has none
_RULES = {"attnlrp": "attnlrp", "cp-lrp": "cp-lrp", "gradxinput": "gradient"}
_ALIASES = {"gradient": "gradxinput", "gxi": "gradxinput", "gradient_x_input": "gradxinput",
            "gradient-x-input": "gradxinput"}
REMOVALS = ("zero", "replace")
SCORES = ("logit", "probability")
GRID = 101  # fractions of the mean curves
_FLAT = 1e-6  # relative size of y_0 - y_S below which a prompt has no normalised curve


class FaithfulnessError(ValueError):
    """Bad input to :func:`perturbation_curves` (unknown method, steps < 1, no prompts, ...)."""


def removal_counts(n_removable: int, steps: Optional[int]) -> List[int]:
    """Tokens removed after each step: ``floor(j N / S)`` for ``j = 0 .. S``, ``S = min(steps, N)``
    (``steps=None``: one token per step)."""
    s = n_removable if steps is None else min(steps, n_removable)
    return [(j * n_removable) // s for j in range(s + 1)]


def area(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoidal area under ``values`` over ``fractions``."""
    return float(sum((fractions[j + 1] - fractions[j]) * (values[j] + values[j + 1]) / 2
                     for j in range(len(values) - 1)))


@dataclass
class PromptCurves:
    """One prompt's MoRF and LeRF curves for one method (positions index ``token_ids``)."""
    prompt: str
    token_ids: List[int]
    target_id: int
    relevance: List[float]
    removable: List[int]          # positions that may be removed (not special tokens)
    counts: List[int]             # tokens removed after each step: 0 .. N
    morf_order: List[int]         # removable positions, most relevant first
    lerf_order: List[int]         # removable positions, least relevant first
    morf_raw: List[float]         # score after each step, most relevant removed first
    lerf_raw: List[float]         # score after each step, least relevant removed first

    @property
    def fractions(self) -> List[float]:
        n = len(self.removable)
        return [k / n for k in self.counts]

    @property
    def flat(self) -> bool:
        """Removing every removable token leaves the score (almost) unchanged: no normalised curve."""
        y0, ys = self.morf_raw[0], self.morf_raw[-1]
        return abs(y0 - ys) <= _FLAT * max(1.0, abs(y0))

    @property
    def inverted(self) -> bool:
        """Removing every removable token raises the score (the normalised curves start at -1)."""
        return self.morf_raw[-1] > self.morf_raw[0]

    def _normalise(self, raw: List[float]) -> List[float]:
        y0, ys = self.morf_raw[0], self.morf_raw[-1]
        return [(y - ys) / abs(y0 - ys) for y in raw]

    @property
    def morf(self) -> List[float]:
        """Normalised MoRF curve: 1 (or -1 when ``inverted``) .. 0."""
        return self._normalise(self.morf_raw)

    @property
    def lerf(self) -> List[float]:
        """Normalised LeRF curve: 1 (or -1 when ``inverted``) .. 0."""
        return self._normalise(self.lerf_raw)

    @property
    def abpc(self) -> float:
        """``area(LeRF) - area(MoRF)`` of the normalised curves."""
        return area(self.fractions, self.lerf) - area(self.fractions, self.morf)

    @property
    def abpc_raw(self) -> float:
        """``area(LeRF) - area(MoRF)`` of the scores themselves (logits or probabilities)."""
        return area(self.fractions, self.lerf_raw) - area(self.fractions, self.morf_raw)


@dataclass
class FaithfulnessResult:
    """Perturbation curves of every prompt for every method, and their summaries."""
    methods: Tuple[str, ...]
    curves: Dict[str, List[PromptCurves]]   # method -> one entry per prompt, in prompt order
    removal: str
    score: str
    steps: Optional[int]
    seed: int
    baseline_token: Optional[str] = None    # the replacing token (removal="replace")
    skipped: List[int] = field(default_factory=list)  # prompts without a normalised curve

    def _kept(self, method: str) -> List[PromptCurves]:
        if method not in self.curves:
            raise FaithfulnessError(f"method must be one of {self.methods}, got {method!r}")
        skipped = set(self.skipped)
        return [c for i, c in enumerate(self.curves[method]) if i not in skipped]

    def abpc(self, method: str) -> float:
        """Mean ABPC of ``method`` over the prompts (skipped ones left out)."""
        return float(np.mean([c.abpc for c in self._kept(method)]))

    def per_prompt(self, method: str) -> List[float]:
        """ABPC of every kept prompt, in prompt order."""
        return [c.abpc for c in self._kept(method)]

    def difference(self, a: str, b: str) -> Dict[str, float]:
        """Paired comparison over the same prompts: mean of ``ABPC(a) - ABPC(b)``, its standard
        error, and the share of prompts where ``a`` is higher."""
        d = np.array(self.per_prompt(a)) - np.array(self.per_prompt(b))
        return {"mean": float(d.mean()), "stderr": _stderr(d), "wins": float((d > 0).mean())}

    def mean_curve(self, method: str, order: str = "morf") -> Tuple[np.ndarray, np.ndarray]:
        """``(fractions, mean normalised curve)`` on 101 fractions 0 .. 1 (``order``: morf/lerf)."""
        if order not in ("morf", "lerf"):
            raise FaithfulnessError(f"order must be 'morf' or 'lerf', got {order!r}")
        grid = np.linspace(0.0, 1.0, GRID)
        rows = [np.interp(grid, c.fractions, getattr(c, order)) for c in self._kept(method)]
        return grid, np.mean(rows, axis=0)

    def summary(self) -> List[Dict[str, object]]:
        """One dict per method: ``abpc`` (mean), ``abpc_stderr``, ``area_morf``, ``area_lerf``,
        ``abpc_raw``, ``prompts`` (kept), ``skipped`` and the settings."""
        rows = []
        for m in self.methods:
            kept = self._kept(m)
            abpc = np.array([c.abpc for c in kept])
            rows.append({
                "method": m, "abpc": float(abpc.mean()), "abpc_stderr": _stderr(abpc),
                "area_morf": float(np.mean([area(c.fractions, c.morf) for c in kept])),
                "area_lerf": float(np.mean([area(c.fractions, c.lerf) for c in kept])),
                "abpc_raw": float(np.mean([c.abpc_raw for c in kept])),
                "prompts": len(kept), "skipped": len(self.skipped),
                "inverted": sum(c.inverted for c in kept), "removal": self.removal,
                "baseline_token": self.baseline_token, "score": self.score, "steps": self.steps,
                "seed": self.seed})
        return rows

    def table(self) -> str:
        """A plain-text table of :meth:`summary`."""
        unit = "logit" if self.score == "logit" else "prob"
        lines = [f"{'method':<11} {'prompts':>7} {'ABPC':>7} {'+-s.e.':>7} {'A(MoRF)':>8} "
                 f"{'A(LeRF)':>8} {'ABPC(' + unit + ')':>12}"]
        for r in self.summary():
            lines.append(f"{r['method']:<11} {r['prompts']:>7} {r['abpc']:>7.3f} "
                         f"{r['abpc_stderr']:>7.3f} {r['area_morf']:>8.3f} {r['area_lerf']:>8.3f} "
                         f"{r['abpc_raw']:>12.3f}")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Write a PNG: one panel per method, mean MoRF and LeRF curves, the area between them
        shaded. Needs matplotlib. Returns ``path``."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise FaithfulnessError("plot needs matplotlib (pip install matplotlib)") from None
        rows = {r["method"]: r for r in self.summary()}
        fig, axes = plt.subplots(1, len(self.methods), figsize=(3.2 * len(self.methods), 3.2),
                                 sharey=True, squeeze=False)
        for ax, m in zip(axes[0], self.methods):
            x, morf = self.mean_curve(m, "morf")
            _, lerf = self.mean_curve(m, "lerf")
            ax.plot(x, lerf, color="tab:blue", label="LeRF")
            ax.plot(x, morf, color="tab:red", label="MoRF")
            ax.fill_between(x, morf, lerf, color="tab:gray", alpha=0.25)
            ax.set_title(f"{m}: ABPC {rows[m]['abpc']:.3f}", fontsize=10)
            ax.set_xlabel("fraction of tokens removed")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"normalised target {self.score}")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"perturbation curves ({self.removal} removal, "
                     f"{rows[self.methods[0]]['prompts']} prompts)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _stderr(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


# ----------------------------------------------------------------------------- checks

def _check_methods(methods) -> Tuple[str, ...]:
    if isinstance(methods, str):
        methods = (methods,)
    try:
        names = [_ALIASES.get(m, m) if isinstance(m, str) else m for m in methods]
    except TypeError:
        raise FaithfulnessError(f"methods must be a list of names from {METHODS}, "
                                f"got {methods!r}") from None
    if not names:
        raise FaithfulnessError(f"methods is empty; give one or more of {METHODS}")
    for m in names:
        if m not in METHODS:
            raise FaithfulnessError(f"unknown method {m!r}; methods must be among {METHODS} "
                                    f"(or the aliases {tuple(_ALIASES)})")
    if len(set(names)) != len(names):
        raise FaithfulnessError(f"methods lists a method twice: {names}")
    return tuple(names)


def _check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FaithfulnessError(f"{name} must be a positive integer"
                                f"{' or None' if allow_none else ''}, got {value!r}")


def _baseline_id(tokenizer, removal: str, baseline_token) -> Optional[int]:
    if removal == "zero":
        if baseline_token is not None:
            raise FaithfulnessError("baseline_token is only used with removal='replace' "
                                    "(removal='zero' sets the embedding to zero)")
        return None
    if baseline_token is not None:
        # special tokens (<unk>, <pad>, ...) are the usual baselines: take them by name
        if isinstance(baseline_token, str) and baseline_token in getattr(
                tokenizer, "all_special_tokens", ()):
            return int(tokenizer.convert_tokens_to_ids(baseline_token))
        try:
            return resolve_token(tokenizer, baseline_token, "baseline_token")
        except ValueError as err:
            raise FaithfulnessError(str(err).split("; use continuation=")[0]) from None
    for name in ("unk_token_id", "pad_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return int(tid)
    raise FaithfulnessError("removal='replace' needs a baseline_token: this tokenizer has no "
                            "unknown or padding token")


# ----------------------------------------------------------------------------- curves

def _scores(model, base: torch.Tensor, replacement: torch.Tensor, removed: torch.Tensor,
            target: int, score: str, forward_tokens: int) -> torch.Tensor:
    """The target's score for each row of ``removed`` ([rows, L] bool), without gradient."""
    out = []
    per_forward = max(1, forward_tokens // removed.shape[1])
    with torch.no_grad():  # no graph: the parameters of an unpatched model require grad
        for start in range(0, removed.shape[0], per_forward):
            rows = removed[start:start + per_forward]
            embeds = torch.where(rows[..., None], replacement, base)
            mask = torch.ones(rows.shape, dtype=torch.long, device=base.device)
            last = _forward(model, embeds, mask, 1)[:, -1].float()
            out.append(last[:, target] if score == "logit"
                       else torch.softmax(last, dim=-1)[:, target])
    return torch.cat(out).cpu().double()


def _prompt_curves(model, prompt: str, token_ids: List[int], target: int,
                   relevances: Dict[str, torch.Tensor], special: set, *, removal_id,
                   steps, score, forward_tokens) -> Dict[str, PromptCurves]:
    emb_layer = model.get_input_embeddings()
    dev = emb_layer.weight.device
    removable = [i for i, t in enumerate(token_ids) if t not in special]
    n, width = len(removable), len(token_ids)
    counts = removal_counts(n, steps)
    pos = torch.tensor(removable)  # the orders and row masks are built on the CPU
    with torch.no_grad():
        base = emb_layer(torch.tensor([token_ids], device=dev))[0]
        replacement = torch.zeros_like(base[0]) if removal_id is None else \
            emb_layer(torch.tensor([removal_id], device=dev))[0]
    # rows: nothing removed, everything removed (shared by both orders and all methods), then
    # the inner steps of MoRF and LeRF of every method
    inner = torch.tensor(counts[1:-1], dtype=torch.long)
    rows = [torch.zeros(1, width, dtype=torch.bool),
            torch.zeros(1, width, dtype=torch.bool).index_fill_(1, pos, True)]
    orders = {}
    for m, rel in relevances.items():
        r = rel.detach().double().cpu()[removable]
        morf = torch.argsort(-r, stable=True)
        lerf = torch.argsort(r, stable=True)
        orders[m] = (pos[morf].tolist(), pos[lerf].tolist())
        for order in (morf, lerf):
            rank = torch.full((width,), width + 1, dtype=torch.long)
            rank[pos[order]] = torch.arange(n)   # place of each position in the order
            rows.append(rank[None, :] < inner[:, None])
    y = _scores(model, base, replacement, torch.cat(rows).to(dev), target, score, forward_tokens)
    if not torch.isfinite(y).all():
        raise FaithfulnessError(f"the model gave a non-finite target {score} on a perturbed copy "
                                f"of prompt {prompt!r}; check the weights and dtype (float32 is safest)")
    y = y.tolist()
    y0, ys, rest = y[0], y[1], y[2:]
    k = len(counts) - 2
    out = {}
    for i, (m, rel) in enumerate(relevances.items()):
        morf_inner, lerf_inner = rest[2 * i * k:(2 * i + 1) * k], rest[(2 * i + 1) * k:(2 * i + 2) * k]
        out[m] = PromptCurves(prompt=prompt, token_ids=list(token_ids), target_id=target,
                              relevance=rel.tolist(), removable=removable, counts=counts,
                              morf_order=orders[m][0], lerf_order=orders[m][1],
                              morf_raw=[y0] + morf_inner + [ys], lerf_raw=[y0] + lerf_inner + [ys])
    return out


def perturbation_curves(model, tokenizer, prompts: Sequence[str],
                        methods: Sequence[str] = METHODS, *,
                        targets: Optional[Sequence[Optional[Union[int, str]]]] = None,
                        removal: str = "zero", baseline_token: Optional[Union[int, str]] = None,
                        steps: Optional[int] = None, score: str = "logit", seed: int = 0,
                        epsilon: Optional[float] = None, backend: Optional[str] = None,
                        explain_batch: int = 32, forward_tokens: int = 65536,
                        progress: Optional[Callable[[int, int], None]] = None
                        ) -> FaithfulnessResult:
    """MoRF / LeRF perturbation curves and ABPC of each method on each prompt (module docstring:
    the protocol, step by step).

    Args:
        model: a causal LM (Hugging Face, unpatched: the relevance methods patch it for their
            own call only).
        tokenizer: its tokenizer.
        prompts: the prompts (non-empty strings).
        methods: among ``"attnlrp"``, ``"cp-lrp"``, ``"gradxinput"`` (alias ``"gradient"``),
            ``"random"``.
        targets: one target token (string or id) per prompt, ``None`` entries for the most
            likely next token (default for all).
        removal: ``"zero"`` (zero embedding) or ``"replace"`` (``baseline_token``'s embedding).
        baseline_token: the replacing token for ``removal="replace"`` (default: unknown token,
            else padding token).
        steps: removal steps per curve (``None``: one token per step).
        score: ``"logit"`` or ``"probability"`` of the target.
        seed: seed of the random attribution.
        epsilon, backend: passed to :func:`lrp_kernels.explain`.
        explain_batch: prompts per :func:`~lrp_kernels.explain` call (one padded batch).
        forward_tokens: tokens per perturbed forward at most (``forward_tokens // length``
            sequences, at least one): bounds the activation memory on long prompts.
        progress: ``progress(done, total)`` after each prompt.

    Returns:
        A :class:`FaithfulnessResult` (``table()``, ``summary()``, ``plot(path)``, the curves).

    Raises:
        FaithfulnessError: a bad argument, named (also :class:`~lrp_kernels.explanations.api.ExplainError`
            from :func:`~lrp_kernels.explain`, e.g. for an empty prompt or an unknown target).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    try:
        prompts = list(prompts)
    except TypeError:
        raise FaithfulnessError(f"prompts must be a list of strings, got {type(prompts).__name__}") from None
    if not prompts:
        raise FaithfulnessError("prompts is empty: give at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise FaithfulnessError(f"prompts must be non-empty strings; prompt {bad[0]} is "
                                f"{prompts[bad[0]]!r}")
    methods = _check_methods(methods)
    if removal not in REMOVALS:
        raise FaithfulnessError(f"removal must be one of {REMOVALS}, got {removal!r}")
    if score not in SCORES:
        raise FaithfulnessError(f"score must be one of {SCORES}, got {score!r}")
    _check_positive("steps", steps, allow_none=True)
    _check_positive("explain_batch", explain_batch)
    _check_positive("forward_tokens", forward_tokens)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FaithfulnessError(f"seed must be an integer, got {seed!r}")
    if targets is not None:
        targets = list(targets)
        if len(targets) != len(prompts):
            raise FaithfulnessError(f"got {len(targets)} targets for {len(prompts)} prompts")
    removal_id = _baseline_id(tokenizer, removal, baseline_token)

    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    explained = [m for m in methods if m != "random"]
    gen = torch.Generator().manual_seed(seed)
    curves: Dict[str, List[PromptCurves]] = {m: [] for m in methods}
    for start in range(0, len(prompts), explain_batch):
        part = prompts[start:start + explain_batch]
        tpart = None if targets is None else targets[start:start + explain_batch]
        # token ids and target come from explain (the first method's call; gradient x input's
        # when only random is asked for), so every method scores the same target
        exps = {m: explain(model, tokenizer, part, tpart, rules=_RULES[m], epsilon=epsilon,
                           backend=backend) for m in (explained or ["gradxinput"])}
        ref = exps[(explained or ["gradxinput"])[0]]
        for i, e in enumerate(ref):
            for m, other in exps.items():
                if other[i].token_ids != e.token_ids or other[i].target.ids != e.target.ids:
                    raise RuntimeError(f"explain gave {m} another target or tokenization than "
                                       f"the other methods for prompt {start + i}")
            relevances = {m: (torch.rand(len(e.token_ids), generator=gen) if m == "random"
                              else exps[m][i].relevance) for m in methods}
            per_method = _prompt_curves(model, part[i], e.token_ids, e.target.id, relevances,
                                        special, removal_id=removal_id, steps=steps, score=score,
                                        forward_tokens=forward_tokens)
            for m in methods:
                curves[m].append(per_method[m])
            if progress is not None:
                progress(start + i + 1, len(prompts))
    skipped = [i for i, c in enumerate(curves[methods[0]]) if c.flat]
    if len(skipped) == len(prompts):
        raise FaithfulnessError(f"removing every token leaves the target's {score} unchanged "
                                "for every prompt: there is no curve to normalise")
    if skipped:
        warnings.warn(f"{len(skipped)} of {len(prompts)} prompt(s) left out: removing every "
                      f"token leaves the target's {score} unchanged (prompts {skipped[:10]})",
                      stacklevel=2)
    baseline_text = None if removal_id is None else tokenizer.convert_ids_to_tokens(removal_id)
    return FaithfulnessResult(methods=methods, curves=curves, removal=removal, score=score,
                              steps=steps, seed=seed, baseline_token=baseline_text,
                              skipped=skipped)
