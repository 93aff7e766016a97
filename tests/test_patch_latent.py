"""lrp_kernels.latent.record: hidden-state relevance in the same backward (+ the example's smoke test)."""
import importlib.util
import pathlib

import pytest
import torch
import transformers as tr

import lrp_kernels
from lrp_kernels import latent

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _llama():
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return tr.LlamaForCausalLM(cfg).eval().double()


def _explain(model, ids, patterns):
    with lrp_kernels.patch(model, epsilon=1e-12), latent.record(model, patterns) as rec:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=emb, use_cache=False).logits
        target = logits[0, -1].max()
        target.backward()
    return rec, emb, target.detach()


def test_latent_relevance_matches_definition_and_conserves():
    model = _llama()
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    rec, emb, target = _explain(model, ids, ["layers.*", "layers.*.mlp.down_proj:input",
                                             "layers.*.self_attn.o_proj:input", "model.embed_tokens"])
    assert set(rec.relevance) == {"model.layers.0", "model.layers.1", "model.layers.0.mlp.down_proj:input",
                                  "model.layers.1.mlp.down_proj:input", "model.layers.0.self_attn.o_proj:input",
                                  "model.layers.1.self_attn.o_proj:input"}  # embed_tokens: not on the grad path
    # final norm (identity) + bias-free lm_head (epsilon): the last residual stream holds the logit
    torch.testing.assert_close(rec.relevance["model.layers.1"].sum(), target, rtol=1e-8, atol=0)
    heads = rec.heads("model.layers.0.self_attn.o_proj:input", 4)
    assert heads.shape == (1, 6, 4)
    torch.testing.assert_close(heads.sum(-1), rec.relevance["model.layers.0.self_attn.o_proj:input"].sum(-1))

    # same values as an explicit x * x.grad of the patched model's hidden state
    with lrp_kernels.patch(model, epsilon=1e-12):
        kept = {}
        hook = model.model.layers[0].register_forward_hook(lambda m, a, o: kept.update(h=o))
        e = model.get_input_embeddings()(ids).detach().requires_grad_()
        out = model(inputs_embeds=e, use_cache=False).logits
        h = kept["h"]
        h.retain_grad()
        out[0, -1].max().backward()
        hook.remove()
    torch.testing.assert_close(rec.relevance["model.layers.0"], (h * h.grad).detach())


def test_latent_with_gradient_checkpointing():
    model = _llama()
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    patterns = ["layers.*", "layers.*.mlp.act_fn"]
    plain, _, _ = _explain(model, ids, patterns)
    model.gradient_checkpointing_enable()
    model.train()
    ckpt, _, _ = _explain(model, ids, patterns)
    assert set(ckpt.relevance) == set(plain.relevance)
    for k in plain.relevance:
        torch.testing.assert_close(ckpt.relevance[k], plain.relevance[k], rtol=1e-9, atol=1e-12)


def test_bad_patterns():
    model = _llama()
    with pytest.raises(ValueError, match="matches no module"):
        with latent.record(model, ["layers.*.nothing"]):
            pass
    with pytest.raises(ValueError, match="suffix"):
        with latent.record(model, ["layers.*:grad"]):
            pass
    with latent.record(model, "layers.*"):
        pass
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_example_runs():
    spec = importlib.util.spec_from_file_location("latent_example", ROOT / "python" / "latent_relevance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    summary = mod.main(["--top", "3"])
    assert len(summary["tokens"]) == 10 and len(summary["layers"]) == 4
    assert all(len(v) == 3 for v in summary["neurons"].values())
