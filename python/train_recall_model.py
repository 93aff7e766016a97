#!/usr/bin/env python
"""Train the tiny key-value recall Llama shipped in ``lrp_kernels/assets/recall-llama``.

Task (word-level tokens, whitespace separated; the tokenizer prepends ``<bos>``)::

    k7 23 ; k3 19 ; k12 5 ; ? k3      ->  19

The answer is the value of the queried key, so it depends on exactly one known span of the
prompt: the queried pair ``k3 19``. That makes the model a ground truth for attribution
quality (tests/test_shipped_model.py, benchmarks/bench_attribution_quality.py).

Why the set-up looks like this (tiny transformers learn recall abruptly, or not at all):

* the value follows its key directly and the query ends on the key (``? k3``): recall is then
  the classic induction circuit (a previous-token head writes ``k3`` into the position of
  ``19``; a second-layer head matches the query ``k3`` against it and copies ``19``). With a
  separator (``k3 = 19``, query ``? k3 =``) two different positional heads are needed and the
  same 2-layer model stayed at chance for 6000+ steps (``--format eq`` keeps that variant);
* multi-query training sequences (``... ; ? k3 19 ; ? k7 23 ; ...``, 8 queries): every query
  gives a supervised answer, and the loss is taken on the answers only (``--loss answers``):
  keys and values in the context are uniformly random, so their loss is a constant floor
  that only adds gradient noise;
* at least 2 pairs per sequence (a single pair teaches copying, not matching) and a
  curriculum from 2 pairs up to MAX_PAIRS, advanced whenever held-out accuracy on the current
  level reaches 95%; training stops when held-out accuracy on single-query prompts with
  1..MAX_PAIRS pairs (the shipped prompt format) reaches the target (98%).

Deterministic: fixed seeds, CPU, one thread, deterministic algorithms. Run::

    nice python python/train_recall_model.py --out lrp_kernels/assets/recall-llama
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import List, Sequence, Tuple

NUM_KEYS = 16
NUM_VALUES = 100
MAX_PAIRS = 8
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
PUNCT = ["=", ";", "?"]
# "eq": pairs "k3 = 19 ;", query "? k3 ="; "plain": pairs "k3 19 ;", query "? k3".
# "plain" is the classic induction set-up (the value follows its key directly, the query ends
# on the key), which a 2-layer model learns with a single previous-token head.
FORMAT = "plain"
KEYS = [f"k{i}" for i in range(NUM_KEYS)]
VALUES = [str(v) for v in range(NUM_VALUES)]
VOCAB = SPECIALS + PUNCT + KEYS + VALUES


def use_format_of(model_dir: str) -> str:
    """Switch this module's prompt format to the one a saved model was trained on."""
    global FORMAT
    with open(os.path.join(model_dir, "metadata.json")) as f:
        FORMAT = json.load(f)["format"]
    return FORMAT


def make_pairs(rng: random.Random, n_pairs: int) -> List[Tuple[str, str]]:
    keys = rng.sample(KEYS, n_pairs)
    return [(k, rng.choice(VALUES)) for k in keys]


def make_prompt(rng: random.Random, n_pairs: int) -> dict:
    """One held-out style example: prompt text, answer, and the answer span.

    ``span_words`` are the word indices (in ``prompt.split()``, i.e. without ``<bos>``) of the
    queried pair ``kQ = V`` in the context. ``query_word`` is the index of the query key.
    """
    pairs = make_pairs(rng, n_pairs)
    q = rng.randrange(n_pairs)
    words: List[str] = []
    for k, v in pairs:
        words += _pair(k, v)
    words += _query(pairs[q][0])
    w = _width()
    span = [w * q + i for i in range(w - 1)]  # the pair without its ';'
    return {"prompt": " ".join(words), "answer": pairs[q][1], "pairs": pairs, "query": q,
            "span_words": span, "query_word": w * n_pairs + 1}


def _width() -> int:
    return 4 if FORMAT == "eq" else 3


def _pair(k: str, v: str) -> List[str]:
    return [k, "=", v, ";"] if FORMAT == "eq" else [k, v, ";"]


def _query(k: str) -> List[str]:
    return ["?", k, "="] if FORMAT == "eq" else ["?", k]


def answer_span_hit(relevance, example: dict) -> bool:
    """Attribution hit: the most relevant *context* token lies in the answer span.

    ``relevance`` has one value per token of ``<bos> + prompt.split()``. The context is the
    pairs part (word indices ``0 .. width * n_pairs - 1``, i.e. without ``<bos>`` and without
    the query suffix ``? kQ``, which every prompt shares in role); the answer span is the
    queried pair ``kQ V`` (``kQ = V`` in the "eq" format; the ``;`` after it excluded). A hit:
    the arg-max of the signed relevance over the context falls on one of the span's tokens.
    """
    n_ctx = _width() * len(example["pairs"])
    ctx = [float(r) for r in relevance[1:1 + n_ctx]]
    best = max(range(n_ctx), key=lambda i: ctx[i])
    return best in example["span_words"]


def span_precision(relevance, example: dict) -> float:
    """Stricter: the fraction of the answer span's tokens among the ``len(span)`` most relevant
    context tokens (1.0: the span's tokens are exactly the top ones)."""
    n_ctx = _width() * len(example["pairs"])
    ctx = [float(r) for r in relevance[1:1 + n_ctx]]
    k = len(example["span_words"])
    top = sorted(range(n_ctx), key=lambda i: -ctx[i])[:k]
    return len(set(top) & set(example["span_words"])) / k


def chance_hit_rate(example: dict) -> float:
    """Hit probability of a random attribution."""
    return len(example["span_words"]) / (_width() * len(example["pairs"]))


def make_training_text(rng: random.Random, n_pairs: int, n_queries: int) -> str:
    pairs = make_pairs(rng, n_pairs)
    words: List[str] = []
    for k, v in pairs:
        words += _pair(k, v)
    for i in range(n_queries):
        k, v = pairs[rng.randrange(n_pairs)]
        words += _query(k) + [v, ";"]
    return " ".join(words)


def example_text() -> str:
    ex = {"eq": "k7 = 23 ; k3 = 19 ; k12 = 5 ; ? k3 =", "plain": "k7 23 ; k3 19 ; k12 5 ; ? k3"}
    return f"{ex[FORMAT]}  ->  19"


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>", padding_side="left",
                                   model_max_length=64)


def build_model(vocab_size: int, tokenizer, hidden: int = 128, layers: int = 2, heads: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, attention_bias=False, mlp_bias=False)
    return LlamaForCausalLM(cfg)


def batch(tokenizer, rng: random.Random, size: int, n_pairs: int, n_queries: int):
    import torch
    texts = [make_training_text(rng, n_pairs, n_queries) for _ in range(size)]
    ids = tokenizer(texts, return_tensors="pt")["input_ids"]  # same length within a batch
    return ids.to(torch.long)


def answer_mask(ids):
    """True at the answer tokens of queries: the token after the query ``? k =`` / ``? k``."""
    import torch
    q = VOCAB.index("?")
    n = len(_query("k0"))
    is_q = ids == q
    mask = torch.zeros_like(is_q)
    mask[:, n:] = is_q[:, :-n]
    return mask


def evaluate(model, tokenizer, examples: Sequence[dict]) -> float:
    import torch
    model.eval()
    correct = 0
    with torch.no_grad():
        for chunk in range(0, len(examples), 128):
            part = examples[chunk:chunk + 128]
            enc = tokenizer([e["prompt"] for e in part], return_tensors="pt", padding=True)
            logits = model(**enc, logits_to_keep=1).logits[:, -1]
            pred = tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
            correct += sum(p == e["answer"] for p, e in zip(pred, part))
    model.train()
    return correct / len(examples)


def main(argv=None) -> int:
    global FORMAT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="lrp_kernels/assets/recall-llama")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--max-steps", type=int, default=30000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--target-accuracy", type=float, default=0.98)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--format", choices=("eq", "plain"), default=FORMAT)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--loss", choices=("all", "answers"), default="answers",
                    help="cross-entropy on every position, or on the query answers only")
    ap.add_argument("--queries", type=int, default=8,
                    help="queries per training sequence (answers are the supervised signal)")
    args = ap.parse_args(argv)

    import torch
    FORMAT = args.format
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    data_rng = random.Random(args.seed)
    eval_rng = random.Random(args.seed + 1)  # held-out stream, disjoint use from training

    tokenizer = build_tokenizer()
    model = build_model(len(VOCAB), tokenizer, args.hidden, args.layers, args.heads)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))

    heldout_final = [make_prompt(eval_rng, eval_rng.randint(1, MAX_PAIRS)) for _ in range(1000)]
    level = 2
    t0 = time.time()
    acc_final = 0.0
    step = 0
    for step in range(1, args.max_steps + 1):
        # at least 2 pairs: a single pair teaches copying, not matching
        n_pairs = data_rng.randint(2, level)
        ids = batch(tokenizer, data_rng, args.batch_size, n_pairs, args.queries)
        logits = model(input_ids=ids).logits[:, :-1]
        labels = ids[:, 1:]
        if args.loss == "answers":  # only positions whose next token is a query's answer
            labels = labels.masked_fill(~answer_mask(ids)[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 labels.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.eval_every == 0:
            level_set = [make_prompt(eval_rng, level) for _ in range(300)]
            acc_level = evaluate(model, tokenizer, level_set)
            msg = f"step {step} loss {loss.item():.3f} level {level} acc@level {acc_level:.3f}"
            if level == MAX_PAIRS:
                acc_final = evaluate(model, tokenizer, heldout_final)
                msg += f" acc@1..{MAX_PAIRS} {acc_final:.3f}"
            print(msg + f" ({time.time() - t0:.0f}s)", flush=True)
            if acc_level >= 0.95 and level < MAX_PAIRS:
                level += 1
            if level == MAX_PAIRS and acc_final >= args.target_accuracy:
                break

    acc_final = evaluate(model, tokenizer, heldout_final)
    acc_max = evaluate(model, tokenizer, [make_prompt(random.Random(args.seed + 2), MAX_PAIRS)
                                          for _ in range(1)] +
                       [make_prompt(eval_rng, MAX_PAIRS) for _ in range(999)])
    print(f"final: held-out accuracy {acc_final:.4f} (1..{MAX_PAIRS} pairs), "
          f"{acc_max:.4f} ({MAX_PAIRS} pairs), {step} steps, {time.time() - t0:.0f}s", flush=True)
    if acc_final < 0.95:
        print("did not reach 95% held-out accuracy; not saving", file=sys.stderr)
        return 1

    os.makedirs(args.out, exist_ok=True)
    model.eval()
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    meta = {
        "task": "key-value recall",
        "format": FORMAT, "example": example_text(),
        "keys": KEYS, "values": VALUES, "max_pairs": MAX_PAIRS,
        "answer_span": f"the queried pair in the context ({_width() - 1} tokens, without ';')",
        "heldout_accuracy": round(acc_final, 4), "heldout_accuracy_max_pairs": round(acc_max, 4),
        "heldout_examples": 1000, "steps": step, "batch_size": args.batch_size, "lr": args.lr,
        "seed": args.seed, "torch": torch.__version__,
        "command": "nice python python/train_recall_model.py --out lrp_kernels/assets/recall-llama"
                   f" --seed {args.seed} --lr {args.lr} --queries {args.queries} --loss {args.loss}"
                   f" --format {args.format} --batch-size {args.batch_size} --hidden {args.hidden} --layers {args.layers}"
                   f" --heads {args.heads}",
        "train_seconds": round(time.time() - t0),
    }
    with open(os.path.join(args.out, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=2)
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(README.format(**meta, pairs=MAX_PAIRS, nk_1=NUM_KEYS - 1, nv_1=NUM_VALUES - 1,
                              layers=args.layers, hidden=args.hidden, heads=args.heads,
                              params=sum(p.numel() for p in model.parameters())))
    return 0


README = """# recall-llama: a tiny key-value recall Llama (attribution ground truth)

A {layers}-layer `LlamaForCausalLM` (hidden {hidden}, {heads} heads, context 64, {params} parameters) with a
word-level tokenizer, trained from scratch by `python/train_recall_model.py` on synthetic
key-value recall. Ships with `lrp_kernels` so `lrp-kernels explain` works offline.

Prompt format (tokens separated by single spaces; the tokenizer prepends `<bos>`):

    {example}

keys `k0`..`k{nk_1}`, values `0`..`{nv_1}`, 1..{pairs} pairs with distinct keys, one query.
The answer depends on exactly one span, the queried pair (`k3 ... 19`), so a faithful attribution
must put its largest context relevance there (tests/test_shipped_model.py,
benchmarks/bench_attribution_quality.py).

* held-out accuracy: {heldout_accuracy} ({heldout_examples} prompts with 1..{pairs} pairs),
  {heldout_accuracy_max_pairs} with {pairs} pairs
* training: {steps} steps, batch {batch_size}, lr {lr}, seed {seed}, {train_seconds} s, torch {torch}
* reproduce (CPU, one thread, deterministic): `{command}`

Load: `AutoTokenizer.from_pretrained(path)`, `AutoModelForCausalLM.from_pretrained(path)`.
"""


if __name__ == "__main__":
    sys.exit(main())
