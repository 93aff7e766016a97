"""Latent relevance with lrp_kernels: which layers, MLP neurons and attention heads carry the
relevance of a prediction, from one forward and one backward pass.

    python python/latent_relevance.py                     # tiny random Llama (no download)
    python python/latent_relevance.py --model PATH_OR_ID  # a local / cached causal LM

Prints, for the explained next-token logit: input-token relevance, the relevance of the residual
stream after each decoder layer, the top MLP neurons and the top attention heads.
"""
from __future__ import annotations

import argparse

import torch

import lrp_kernels
from lrp_kernels import latent


def tiny_llama():
    import transformers as tr
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return tr.LlamaForCausalLM(cfg).eval(), None


def load(name: str | None):
    if name is None:
        return tiny_llama()
    import transformers as tr
    model = tr.AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.float32).eval()
    return model, tr.AutoTokenizer.from_pretrained(name)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local path / cached id of a causal LM (default: tiny random Llama)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--top", type=int, default=5, help="how many neurons / heads to list")
    args = parser.parse_args(argv)

    model, tok = load(args.model)
    if tok is not None:
        ids = tok(args.prompt, return_tensors="pt").input_ids
        words = tok.convert_ids_to_tokens(ids[0])
    else:
        ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
        words = [f"tok{int(i)}" for i in ids[0]]
    heads = model.config.num_attention_heads
    patterns = ["layers.*", "layers.*.mlp.down_proj:input", "layers.*.self_attn.o_proj:input"]

    with lrp_kernels.patch(model), latent.record(model, patterns) as rec:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=emb, use_cache=False).logits
        target = logits[0, -1].argmax()
        logits[0, -1, target].backward()
        tokens = (emb * emb.grad).float().sum(-1)[0]

    print(f"explained logit {logits[0, -1, target].item():.4f} (token id {int(target)})")
    print("input tokens:", "  ".join(f"{w}:{r:+.3f}" for w, r in zip(words, tokens.tolist())))
    layers = sorted((k for k in rec.relevance if k.split(".")[-1].isdigit()), key=lambda k: int(k.split(".")[-1]))
    summary = {"tokens": tokens.tolist(), "layers": {}, "neurons": {}, "heads": {}}
    for name in layers:
        total = rec.relevance[name].sum().item()
        summary["layers"][name] = total
        neurons = rec.relevance[f"{name}.mlp.down_proj:input"][0, -1]
        per_head = rec.heads(f"{name}.self_attn.o_proj:input", heads)[0].sum(0)
        top_n = neurons.abs().topk(min(args.top, neurons.numel())).indices.tolist()
        top_h = per_head.abs().topk(min(args.top, heads)).indices.tolist()
        summary["neurons"][name] = {i: neurons[i].item() for i in top_n}
        summary["heads"][name] = {i: per_head[i].item() for i in top_h}
        print(f"{name}: residual relevance {total:+.4f} | top neurons (last token) "
              + ", ".join(f"{i}:{neurons[i]:+.3f}" for i in top_n)
              + " | heads " + ", ".join(f"{i}:{per_head[i]:+.3f}" for i in top_h))
    return summary


if __name__ == "__main__":
    main()
