"""Profile an AttnLRP explanation at long context: time and peak memory per sequence length,
against a plain forward + input-gradient pass of the same model in the same run.

Per length ``n`` (random token ids, batch 1 by default), two modes, each one forward and one
backward of the logit of the most likely next token at the last position (only that
position's logits are computed: ``logits_to_keep=1``; ``repeats``: several runs, interleaved,
medians reported):

* ``plain``: the unpatched model (SDPA attention), parameters frozen, gradient w.r.t. the input
  embeddings — the cheapest "gradient x input" explanation, the baseline;
* ``lrp``: the same inside :func:`lrp_kernels.hf.patching` (AttnLRP rules, fused attention).

Peak memory: CUDA ``max_memory_allocated`` above what was allocated before the phase (the
weights), or on CPU the peak resident set size above the start of the phase (the kernel's own
peak counter on Linux, else sampled every 2 ms by a thread), after returning freed heap pages to
the OS (glibc ``malloc_trim``). Optional gradient checkpointing
(``model.gradient_checkpointing_enable``).

Library use::

    model = build_model("llama-tiny", device="cpu", dtype=torch.float32, max_len=1024)
    for row in profile(model, [512, 1024]):
        print(row)
"""
from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import torch

# named model shapes: random weights from a config, nothing downloaded
NAMED_MODELS = {
    "llama-tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
    "llama-long-bench": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=4, vocab_size=2048),
    # Llama-3-8B's real shape (random bf16 weights)
    "llama-3-8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                             rope_theta=500000.0, rms_norm_eps=1e-5),
}


def build_model(name_or_path: str, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                max_len: int = 8192, seed: int = 0) -> torch.nn.Module:
    """A causal LM in eval mode with SDPA attention: a named random-weight config
    (:data:`NAMED_MODELS`) or ``from_pretrained`` of a local directory (never a hub download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if name_or_path in NAMED_MODELS:
        cfg = LlamaConfig(**NAMED_MODELS[name_or_path], max_position_embeddings=max(max_len, 2048),
                          tie_word_embeddings=False, attn_implementation="sdpa")
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    elif os.path.isdir(name_or_path):
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, local_files_only=True,
                                                     attn_implementation="sdpa").to(device)
    else:
        raise ValueError(f"model must be one of {sorted(NAMED_MODELS)} or a local directory, got {name_or_path!r}")
    return model.eval()


# ---- memory ---------------------------------------------------------------------------------

class _RssPeak:
    """Peak resident set size of this process above its value at ``start``.

    On Linux the kernel keeps the peak itself (``VmHWM`` in ``/proc/self/status``, reset by
    writing ``5`` to ``/proc/self/clear_refs``): exact, and nothing runs beside the measured
    code. Elsewhere a thread samples the RSS every ``interval`` seconds; that thread competes
    for the GIL, which slows Python-heavy code more than the rest (it made a patched forward
    look 0.2 s slower than it is at 2048 tokens), so its times are only indicative."""

    def __init__(self, interval: float = 0.002) -> None:
        try:  # psutil where installed (any OS), else Linux's /proc
            import psutil

            proc = psutil.Process()
            self._rss = lambda: proc.memory_info().rss
        except ImportError:
            page = os.sysconf("SC_PAGE_SIZE")

            def rss() -> int:
                with open("/proc/self/statm") as f:
                    return int(f.read().split()[1]) * page
            self._rss = rss
        self._interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.kernel_peak = _reset_kernel_peak()  # probe once: is VmHWM resettable here?

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self._interval)

    def __enter__(self) -> "_RssPeak":
        self.base = self.peak = self._rss()
        if self.kernel_peak:
            self.kernel_peak = _reset_kernel_peak()
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.peak = max(self.peak, self._rss())
        if self.kernel_peak:
            self.peak = max(self.peak, _kernel_peak())
            return
        self._stop.set()
        self._thread.join()

    @property
    def extra(self) -> int:
        return self.peak - self.base


def _kernel_peak() -> int:
    """``VmHWM`` of this process in bytes (0 where unreadable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_kernel_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel does not offer that."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _kernel_peak() > 0


@contextlib.contextmanager
def _peak_memory(device: torch.device) -> Iterator[dict]:
    """Yields a dict that holds ``peak_bytes`` (above the start) when the block ends."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        _release_freed_memory()
        with _RssPeak() as rss:
            yield out
        out["peak_bytes"] = rss.extra


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc), so the RSS baseline of a phase is honest
    and the peak is not hidden by memory an earlier phase freed but the allocator kept."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS peaks are then only approximate
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- one explanation ------------------------------------------------------------------------

def _explain_once(model, ids: torch.Tensor, device: torch.device, on_phase: Callable[[str], None]) -> dict:
    """Forward + backward of the top logit at the last position; times and peak memory."""
    with _peak_memory(device) as mem:
        t0 = time.perf_counter()
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, use_cache=False, logits_to_keep=1).logits
        target = logits[:, -1].max(-1).values.sum()
        _sync(device)
        t1 = time.perf_counter()
        on_phase("forward")
        target.backward()
        relevance = (emb * emb.grad).sum(-1)
        _sync(device)
        t2 = time.perf_counter()
        on_phase("backward")
    finite = bool(torch.isfinite(relevance).all())
    del emb, logits, target, relevance
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "total_s": t2 - t0,
            "peak_bytes": mem["peak_bytes"], "finite": finite}


@contextlib.contextmanager
def _frozen(model) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _checkpointing(model, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    was_training = model.training
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        disable = model.gradient_checkpointing_disable
    model.train()  # transformers checkpoints only in training mode; Llama has no dropout by default
    try:
        yield
    finally:
        disable()
        model.train(was_training)


def _patched(model, backend: str, rules: str, attention: str = "auto"):
    from ..hf.patching import patch

    return patch(model, rules=rules, backend=backend, attention=attention)


def _mode_attention(mode: str) -> str:
    """``lrp`` -> the patch's default attention, ``lrp-exact`` -> ``"exact"``."""
    return mode.split("-", 1)[1] if "-" in mode else "auto"


def _median_run(runs: Sequence[dict]) -> dict:
    """One row from repeated runs: the median of each time and of the peak (all runs kept)."""
    import statistics

    out = dict(runs[-1])
    for key in ("forward_s", "backward_s", "total_s", "peak_bytes"):
        out[key] = statistics.median(r[key] for r in runs)
    out["peak_bytes"] = int(out["peak_bytes"])
    out["finite"] = all(r["finite"] for r in runs)
    if len(runs) > 1:
        out["repeats"] = len(runs)
        out["total_s_runs"] = [r["total_s"] for r in runs]
        out["peak_bytes_runs"] = [r["peak_bytes"] for r in runs]
    return out


def profile(model, seq_lens: Sequence[int], *, batch: int = 1, checkpointing: bool = False,
            backend: str = "auto", rules: str = "attnlrp", warmup: int = 16, seed: int = 0,
            progress: bool = True, attentions: Sequence[str] = ("auto",), repeats: int = 1) -> list[dict]:
    """Rows (one per length and mode) with forward/backward/total seconds, peak bytes and, for
    the ``lrp`` rows, ``time_ratio`` / ``memory_ratio`` to the ``plain`` row of that length.

    ``attentions``: the patch's ``attention=`` choices to measure, one ``lrp`` row each
    (``"auto"`` -> mode ``lrp``, ``"exact"`` -> ``lrp-exact``, ...). ``repeats``: runs per mode,
    interleaved (the mode order reverses every other round, so no mode always runs first after
    a given other); rows then hold medians, and every run's total and peak."""
    from tqdm.auto import tqdm

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    rows = []
    modes = ("plain",) + tuple("lrp" if a == "auto" else f"lrp-{a}" for a in attentions)
    with _frozen(model), _checkpointing(model, checkpointing):
        if warmup:  # compile kernels, fill caches: not timed
            ids = torch.randint(vocab, (batch, warmup), generator=gen).to(device)
            _explain_once(model, ids, device, lambda _: None)
            for a in attentions:
                with _patched(model, backend, rules, a):
                    _explain_once(model, ids, device, lambda _: None)
        for n in seq_lens:
            ids = torch.randint(vocab, (batch, int(n)), generator=gen).to(device)
            bar = tqdm(total=2 * len(modes) * repeats, desc=f"seq {n}", unit="phase", disable=not progress,
                       leave=False)
            runs: dict[str, list] = {m: [] for m in modes}
            for rep in range(repeats):
                for mode in (modes if rep % 2 == 0 else modes[::-1]):
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    step = lambda phase, m=mode: (bar.set_postfix_str(f"{m} {phase}"), bar.update(1))  # noqa: E731
                    if mode != "plain":
                        with _patched(model, backend, rules, _mode_attention(mode)):
                            runs[mode].append(_explain_once(model, ids, device, step))
                    else:
                        runs[mode].append(_explain_once(model, ids, device, step))
            bar.close()
            by_mode = {m: _median_run(r) for m, r in runs.items()}
            for mode in modes:
                res = by_mode[mode]
                row = {"seq": int(n), "batch": batch, "mode": mode, "device": str(device),
                       "dtype": str(dtype).replace("torch.", ""), "checkpointing": checkpointing, **res}
                if mode != "plain":
                    base = by_mode["plain"]
                    row["time_ratio"] = res["total_s"] / max(base["total_s"], 1e-12)
                    row["memory_ratio"] = res["peak_bytes"] / max(base["peak_bytes"], 1)
                rows.append(row)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width table of :func:`profile` rows."""
    head = f"{'seq':>7} {'mode':<9} {'forward s':>10} {'backward s':>11} {'total s':>9} {'peak MiB':>10} {'x time':>7} {'x mem':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tr = f"{r['time_ratio']:.2f}" if "time_ratio" in r else ""
        mr = f"{r['memory_ratio']:.2f}" if "memory_ratio" in r else ""
        lines.append(f"{r['seq']:>7} {r['mode']:<9} {r['forward_s']:>10.3f} {r['backward_s']:>11.3f} "
                     f"{r['total_s']:>9.3f} {r['peak_bytes'] / 2**20:>10.1f} {tr:>7} {mr:>7}")
    return "\n".join(lines)
