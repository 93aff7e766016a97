"""Regressions of the reliability issue on the rule layer: in-place successors, argument
checks that name the argument, forced backends refused in the forward (not in the backward)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrp_kernels
import lrp_kernels.functional as lf
from lrp_kernels.backends import BackendUnavailableError, dispatch
from lrp_kernels.explicit.rules import EpsilonRule
from helpers.models import build, make_inputs


def test_composite_epsilon_rule_followed_by_an_inplace_relu():
    """The epsilon rule keeps its own factor of z, so ReLU(inplace=True) after it is harmless."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5, bias=False), nn.ReLU(inplace=True), nn.Linear(5, 2, bias=False)).double()
    plain = nn.Sequential(net[0], nn.ReLU(), net[2])
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for model in (plain, net):
        with lrp_kernels.Composite({nn.Linear: EpsilonRule}) as composite:
            explained = composite.register(model)
            y = explained(x)
            y.backward(y)
        grads.append(x.grad)
        x.grad = None
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=0)


def test_inplace_ops_on_patched_outputs_work_as_without_the_patch():
    model, kind = build("llama")
    inputs = make_inputs(model, kind)
    with lrp_kernels.patch(model):
        emb = inputs["inputs_embeds"].clone().requires_grad_()
        logits = model(**{**inputs, "inputs_embeds": emb}).logits
        logits /= 0.7  # in place on the lm_head output
        logits[:, -1].max(-1).values.sum().backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


@pytest.mark.parametrize("dim", ["x", 1.0, None, True])
def test_softmax_dim_must_be_an_int(dim):
    with pytest.raises(TypeError, match="dim must be an int"):
        lf.softmax(torch.randn(2, 3), dim=dim)


@pytest.mark.skipif(not dispatch.backend_status("triton")[0], reason="triton unavailable")
def test_forced_backend_that_cannot_take_the_inputs_fails_in_the_forward():
    a = torch.randn(2, 3, 4, requires_grad=True)
    b = torch.randn(4, 5, requires_grad=True)  # broadcast batch dims: not for the fused kernel
    with pytest.raises(BackendUnavailableError, match="broadcast"):
        lf.matmul(a, b, backend="triton")
    lf.matmul(a, b).sum().backward()  # auto: the torch backend serves it


@pytest.mark.parametrize("epsilon", [float("nan"), float("inf"), -1.0, True, "1e-6"])
def test_drop_ins_refuse_bad_epsilons(epsilon):
    x, w = torch.randn(2, 4, requires_grad=True), torch.randn(3, 4)
    with pytest.raises(ValueError, match="epsilon"):
        lf.linear_epsilon(x, w, None, epsilon)


def test_inplace_successor_of_a_linear_like_module_in_a_patched_model():
    """Falcon (no family, strict=False): ``mlp_output += attention_output`` on the output of a
    FalconLinear (an nn.Linear subclass with its own forward: the generic epsilon rule)."""
    import warnings

    import transformers as tr

    torch.manual_seed(0)
    model = tr.FalconForCausalLM(tr.FalconConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                 num_attention_heads=2, parallel_attn=True,
                                                 new_decoder_architecture=False)).eval()
    ids = torch.randint(0, 50, (1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no family": named parts keep their plain gradient
        handle = lrp_kernels.patch(model, strict=False)
    with handle:
        emb = model.get_input_embeddings()(ids).requires_grad_()
        model(inputs_embeds=emb).logits[0, -1].max().backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
