"""Seed 004 (Zennit's "Writing Custom Rules" page) as tests: its code, run on
lrp_kernels.compat.zennit, against our main API.

The page ships in the ``zennit==0.5.1`` sdist (``docs/source/how-to/write-custom-rules.rst``,
the same text as seed 004); its Python blocks are read from there at test time
(:func:`helpers.environments.peer_source`; nothing of Zennit is committed) and run with only
their imports changed (``zennit`` becomes ``lrp_kernels.compat.zennit``). None of them needs
torchvision. Each block builds a module and an input, registers a custom hook, computes ``grad``
and removes the hook; that ``grad`` is compared with the same rule computed independently on the
same module and input: with :mod:`lrp_kernels.hooks` (Pass, Epsilon, BasicHook + ParamMod of our
main API) where our API has the rule, else with the float64 formula of the block's rule.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List

import pytest
import torch

from helpers.environments import peer_source
from lrp_kernels import hooks as ours

PAGE = "docs/source/how-to/write-custom-rules.rst"

# the blocks run in float32: two implementations of one rule agree up to float32 rounding,
# amplified by LRP-0's division by outputs near zero (hence relative to the largest value)
RTOL = 1e-4


def _blocks() -> List[str]:
    try:
        text = (peer_source("zennit", "0.5.1") / PAGE).read_text()
    except RuntimeError as err:  # no registry: nothing to read the blocks from
        pytest.skip(f"the zennit==0.5.1 sdist is not available: {err}")
    blocks = []
    for match in re.finditer(r"^\.\. code-block:: python\n\n((?:(?:    .*)?\n)+)", text, re.MULTILINE):
        lines = [line[4:] for line in match.group(1).splitlines()]
        blocks.append("\n".join(lines).strip() + "\n")
    return blocks


def _with_our_imports(block: str) -> str:
    return re.sub(r"^(\s*(?:from|import)\s+)zennit\b", r"\1lrp_kernels.compat.zennit", block, flags=re.MULTILINE)


def _relevance_of(rule: ours.Hook, module: torch.nn.Module, input: torch.Tensor) -> torch.Tensor:
    """The main API's relevance: ``rule`` on ``module``, all-ones output relevance (as the blocks)."""
    x = input.detach().clone().requires_grad_()
    with rule.register(module):
        output = module(x)
        grad, = torch.autograd.grad(output, x, torch.ones_like(output))
    return grad


def _float64(module: torch.nn.Linear, input: torch.Tensor):
    return input.detach().double(), module.weight.detach().double()


def _ref_pass(ns):
    return _relevance_of(ours.Pass(), ns["module"], ns["input"])


def _ref_grad_times_input(ns):
    x, w = _float64(ns["module"], ns["input"])
    return x * (torch.ones(x.shape[0], w.shape[0], dtype=w.dtype) @ w)


def _ref_grad_times_scaled_negative(ns):
    x, w = _float64(ns["module"], ns["input"])
    scale = ns["scaled_negative_hook"].scale
    return (torch.ones(x.shape[0], w.shape[0], dtype=w.dtype) @ w) * (x.clamp(min=0) + scale * x.clamp(max=0))


def _ref_lrp_zero(ns):
    return _relevance_of(ours.Epsilon(epsilon=0.0), ns["module"], ns["input"])


def _ref_epsilon(ns):
    return _relevance_of(ours.Epsilon(epsilon=1e-6), ns["module"], ns["input"])


def _ref_positive_weight_no_bias(ns):
    # both ZPlus blocks: weights clipped to their positive part, bias zeroed, inputs unchanged
    positive = ours.ParamMod(lambda p, name: p.clamp(min=0), zero_params="bias")
    return _relevance_of(ours.BasicHook(param_modifiers=[positive], stabilizer=1e-6), ns["module"], ns["input"])


# which reference judges a block: the name its code defines -> the independent computation
REFERENCES: Dict[str, Callable] = {
    "class Ignore(": _ref_pass,
    "class GradTimesInput(": _ref_grad_times_input,
    "class GradTimesScaledNegativeInput(": _ref_grad_times_scaled_negative,
    "lrp_zero_hook = ": _ref_lrp_zero,
    "epsilon_hook = ": _ref_epsilon,
    "class ZPlusReLU(": _ref_positive_weight_no_bias,
    "lrp_zplus_hook = ": _ref_positive_weight_no_bias,
}


def _reference_for(block: str) -> Callable:
    found = [ref for key, ref in REFERENCES.items() if key in block]
    assert len(found) == 1, f"no unique reference for this block of {PAGE}:\n{block}"
    return found[0]


def test_every_block_has_a_reference():
    blocks = _blocks()
    assert blocks, f"no Python blocks found in {PAGE}"
    for block in blocks:
        _reference_for(block)
    assert len(blocks) == len(REFERENCES), f"{len(blocks)} blocks, {len(REFERENCES)} references"


@pytest.mark.parametrize("index", range(len(REFERENCES)))
def test_block_gives_our_relevance(index):
    block = _blocks()[index]
    code = _with_our_imports(block)
    assert "zennit." not in code.replace("lrp_kernels.compat.zennit", ""), code
    torch.manual_seed(index)
    namespace: dict = {"__name__": f"seed004_block{index}"}
    exec(compile(code, f"<{PAGE} block {index}>", "exec"), namespace)
    grad, module = namespace["grad"], namespace["module"]
    assert not module._forward_hooks and not module._forward_pre_hooks, "the block's handles.remove() left hooks"
    expected = _reference_for(block)(namespace).to(grad.dtype)
    assert torch.isfinite(grad).all()
    scale = expected.abs().max().item()
    torch.testing.assert_close(grad, expected, rtol=RTOL, atol=RTOL * scale)
