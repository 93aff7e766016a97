"""The patched Hugging Face Llama (gradient view) gives the same input relevance as an explicit
relevance-view reconstruction of the same network (tests/helpers/reference_llama.py), float64."""
import pytest
import torch
import transformers as tr

import lrp_kernels
from helpers.reference_llama import llama_relevance_forward


def _model(heads=4, kv_heads=2):
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=100, max_position_embeddings=64)
    return tr.LlamaForCausalLM(cfg).eval().double()


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_patched_llama_equals_explicit_relevance_view(kv_heads):
    model = _model(kv_heads=kv_heads)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    emb = model.get_input_embeddings()(ids).detach()

    # explicit relevance view: start the backward with R = the explained logit
    x = emb.clone().requires_grad_()
    logits = llama_relevance_forward(model, x)
    with torch.no_grad():
        hf_logits = model(inputs_embeds=emb, use_cache=False).logits
    torch.testing.assert_close(logits, hf_logits, rtol=1e-5, atol=1e-6)  # same network (HF norms in fp32)
    cls = logits[:, -1].argmax(-1)
    seed = torch.zeros_like(logits)
    seed[torch.arange(2), -1, cls] = logits[torch.arange(2), -1, cls].detach()
    logits.backward(seed)
    explicit = x.grad

    # patched model, gradient view: relevance = x * x.grad
    with lrp_kernels.patch(model, epsilon=1e-10):
        y = emb.clone().requires_grad_()
        out = model(inputs_embeds=y, use_cache=False).logits
        out[torch.arange(2), -1, cls].sum().backward()
        patched = y * y.grad

    assert torch.isfinite(patched).all()
    err = ((patched - explicit).norm() / explicit.norm()).item()
    assert err < 1e-7, f"relative error {err:.2e}"
    # per-token relevance as users read it
    torch.testing.assert_close(patched.sum(-1), explicit.sum(-1), rtol=1e-6, atol=1e-9 * explicit.abs().max().item())
