"""The LXT seed documents' code, run on lrp_kernels.compat.lxt, against our main API.

Every Python block of seeds 000 (on-the-fly Composite), 001 (drop-ins) and 003 (explicit
quickstart) is read at test time from ``$LRP_SEEDS_DIR`` (else ``<repo>/../shared/seeds``;
nothing of the documents is committed) and run with only its import lines changed:

* ``lxt`` becomes ``lrp_kernels.compat.lxt``;
* hub ids: ``*.from_pretrained`` are bound, on the import line, to offline stand-ins that build
  tiny random models from configs (float32, CPU; 4-bit quantisation dropped) and a byte-level
  BPE tokenizer trained on the seed document itself;
* ``pdf_heatmap`` writes an HTML heatmap where no LaTeX binary is installed.

Context a block assumes from the page around it (``nn``, ``x``, a ``RootMeanSquareNorm``, a
preceding block's variables) is given in a prelude. One block has an indentation error in the
document (the fx example's last lines sit inside the class body) and is dedented. Each result is
compared with the same computation written with our main API (``lrp_kernels.patch`` default
view, ``lrp_kernels.functional`` / ``modules`` / ``rules`` / ``Composite``).

Not run: 003's "General usage pattern" (a sketch: ``Model()``, ``lxt_model`` used before it is
assigned; the TinyLlama block runs the same pattern) and 003's OpenCLIP block (needs
``lxt.explicit.models.openclip``, pretrained ViT-g-14 weights and an image file; covered by the
OpenCLIP issue).
"""
from __future__ import annotations

import functools
import operator
import os
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tr
from torch import nn

import lrp_kernels
from lrp_kernels.explanations import heatmap as _heatmap

REPO = Path(__file__).resolve().parents[2]
SEEDS = Path(os.environ.get("LRP_SEEDS_DIR", REPO.parent / "shared" / "seeds"))

# two implementations of the same rules: equal up to float32 rounding and LXT's stabiliser
# (z + eps where ours is z + eps * sgn(z): a relative 2 eps / |z| at outputs z < 0 near zero,
# up to 6e-5 of the largest relevance in the fx example with eps = 1e-8). Tolerance per element:
# 1e-4 relative, plus 1e-4 of the largest relevance.
RTOL, ATOL = 1e-4, 1e-4


def _seed_text(prefix: str) -> str:
    found = sorted(SEEDS.glob(f"{prefix}_*.txt")) if SEEDS.is_dir() else []
    if not found:
        pytest.skip(f"seed document {prefix}_*.txt not found (looked in {SEEDS}; set LRP_SEEDS_DIR)")
    return found[0].read_text(encoding="utf-8")


def python_blocks(prefix: str) -> list:
    """The ``.. code-block:: python`` blocks of a seed document, dedented, in order."""
    lines, blocks, i = _seed_text(prefix).splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() == ".. code-block:: python":
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                body.append(lines[i])
                i += 1
            blocks.append(textwrap.dedent("\n".join(body)).strip("\n") + "\n")
        else:
            i += 1
    return blocks


_IMPORT = re.compile(r"^(\s*)(from|import)\s+lxt\b(.*)$")


def compat_imports(code: str, stand_ins: dict = ()) -> str:
    """Only import lines change: ``lxt`` -> ``lrp_kernels.compat.lxt``; names in ``stand_ins``
    imported on a line are rebound right after it to the offline stand-ins."""
    out = []
    for line in code.splitlines():
        m = _IMPORT.match(line)
        if not m:
            out.append(line)
            continue
        indent, kw, rest = m.groups()
        if kw == "import" and not rest.startswith("."):
            rest = rest or " as lxt"      # `import lxt` keeps the name lxt
        if kw == "import" and rest.startswith(".") and " as " not in rest:
            line = f"{indent}import lrp_kernels.compat.lxt{rest}; lxt = __import__('lrp_kernels.compat.lxt').compat.lxt"
        else:
            line = f"{indent}{kw} lrp_kernels.compat.lxt{rest}"
        out.append(line)
        for name in stand_ins:
            if re.search(rf"\b{name}\b", rest):
                out.append(f"{indent}{name} = _stand_ins[{name!r}]")
    return "\n".join(out) + "\n"


def run(code: str, ns: dict, name: str) -> dict:
    exec(compile(code, name, "exec"), ns)
    return ns


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape
    assert torch.isfinite(a).all() and a.abs().sum() > 0, "no relevance to compare"
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * float(b.abs().max()))


# ---- seed 000: Composite (module path and traced path) ----------------------------------------

class RootMeanSquareNorm(nn.Module):
    """The page's ``RootMeanSquareNorm`` (a Llama-style RMSNorm)."""

    def __init__(self, hidden: int = 10, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.linspace(0.5, 1.5, hidden)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def _prelude_000() -> dict:
    torch.manual_seed(0)
    return {"nn": nn, "torch": torch, "RootMeanSquareNorm": RootMeanSquareNorm,
            "x": torch.randn(4, 10)}


def _ours_sequential(layer_map, x):
    torch.manual_seed(0)
    torch.randn(4, 10)  # the prelude's draw, so the Linear gets the same weights
    model = nn.Sequential(nn.Linear(10, 10), RootMeanSquareNorm())
    with lrp_kernels.Composite(layer_map) as lrp:
        lrp.register(model)
        x = x.detach().clone().requires_grad_()
        model(x).max().backward()
    return x.grad


def test_000_composite_rules_then_remove(capsys):
    blocks = python_blocks("000")
    ns = run(compat_imports(blocks[0]), _prelude_000(), "<seed 000 block 0>")
    ours = _ours_sequential({nn.Linear: functools.partial(lrp_kernels.rules.EpsilonRule, epsilon=1e-8),
                             RootMeanSquareNorm: lrp_kernels.rules.IdentityRule}, ns["x"])
    close(ns["relevance"], ours)
    assert "EpsilonRule" in capsys.readouterr().out  # the block prints the wrapped model
    linear = ns["model"][0].module
    run(compat_imports(blocks[2]), ns, "<seed 000 block 2>")   # lrp.remove()
    assert ns["model"][0] is linear and type(ns["model"][1]) is RootMeanSquareNorm


def test_000_composite_modules():
    blocks = python_blocks("000")
    ns = _prelude_000()
    run(compat_imports("import lxt\nfrom lxt.core import Composite\n" + blocks[1]), ns, "<seed 000 block 1>")
    model = nn.Sequential(nn.Linear(10, 10), RootMeanSquareNorm())
    torch.manual_seed(0)
    torch.randn(4, 10)
    model[0].reset_parameters()
    ns["lrp"].register(model)
    assert type(model[0]).__name__ == "LinearEpsilon" and type(model[1]).__name__ == "RMSNormIdentity"
    x = ns["x"].clone().requires_grad_()
    model(x).max().backward()
    ours = _ours_sequential({nn.Linear: lrp_kernels.modules.LinearEpsilon,
                             RootMeanSquareNorm: lrp_kernels.modules.RMSNormIdentity}, ns["x"])
    close(x.grad, ours)


def _dedent_after_class(code: str) -> str:
    """The document's fx example indents its last lines into the class body; undo that."""
    lines = code.splitlines()
    cut = next(i for i, line in enumerate(lines) if line.strip() == "return y1 + y2") + 1
    return "\n".join(lines[:cut] + textwrap.dedent("\n".join(lines[cut:])).splitlines()) + "\n"


def test_000_traced_functions():
    code = _dedent_after_class(python_blocks("000")[3])
    ns = {"nn": nn}
    torch.manual_seed(0)
    run(compat_imports("from lxt.core import Composite\n" + code), ns, "<seed 000 block 3>")
    traced, x = ns["model"], ns["x"]
    y = traced(x=x)
    y.backward(y)
    # ours: the same model and weights (the block's first draw), our Composite with LXT's epsilons
    torch.manual_seed(0)
    model = ns["SimpleModel"]()
    lrp = lrp_kernels.Composite({nn.Linear: functools.partial(lrp_kernels.rules.EpsilonRule, epsilon=1e-8),
                                 operator.add: functools.partial(lrp_kernels.functional.add2, epsilon=1e-8),
                                 F.softmax: lrp_kernels.functional.softmax})
    x2 = x.detach().clone().requires_grad_()
    ours = lrp.register(model, dummy_inputs={"x": x2})
    y2 = ours(x=x2)
    y2.backward(y2)
    close(x.grad, x2.grad)


# ---- seed 001: drop-in functions and modules ---------------------------------------------------

def _run_both(code: str, main_api_import: str, name: str) -> tuple:
    """The block with the compat import, and the same block with our main API's import."""
    def prelude():
        torch.manual_seed(0)
        return {"x": torch.randn(4, 10, requires_grad=True), "W": torch.randn(20, 10), "b": torch.randn(20)}
    compat = run(compat_imports(code), prelude(), name)
    lines = [main_api_import if _IMPORT.match(line) else line for line in code.splitlines()]
    ours = run("\n".join(lines) + "\n", prelude(), name + " (main API)")
    return compat, ours


def test_001_functional():
    compat, ours = _run_both(python_blocks("001")[0], "import lrp_kernels.functional as lf", "<seed 001 block 0>")
    close(compat["relevance"], ours["relevance"])


def test_001_modules():
    compat, ours = _run_both(python_blocks("001")[1], "import lrp_kernels.modules as lm", "<seed 001 block 1>")
    assert type(compat["layer"]).__module__ == "lrp_kernels.compat.lxt.explicit.modules"
    close(compat["relevance"], ours["relevance"])


# ---- seed 003: Hugging Face models, attnlrp.register, heatmaps ------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer trained on the seed document itself (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_seed_text("003")], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tr.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)


def _tiny(model_cls, config_cls, vocab: int, **extra):
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=vocab, **TINY, **extra)).eval()
    for p in model.parameters():  # random but not tiny: attention patterns are non-trivial
        p.data.normal_(0, 0.2)
    return model


class _Hub:
    """``from_pretrained`` stand-in: a tiny model of the class's family, float32 on the CPU
    (``torch_dtype``, ``device_map`` and ``quantization_config`` are dropped)."""

    def __init__(self, model_cls, config_cls, vocab: int, **extra) -> None:
        self.build = lambda: _tiny(model_cls, config_cls, vocab, **extra)
        self.built = []

    def from_pretrained(self, name, **kwargs):
        self.built.append(self.build())
        return self.built[-1]


def _html_instead(words, relevances, cmap="bwr", path="heatmap.pdf", delete_aux_files=True, backend="xelatex"):
    from lrp_kernels.compat.lxt.utils import pdf_heatmap
    if shutil.which(backend):
        return pdf_heatmap(words, relevances, cmap, path, delete_aux_files, backend)
    _heatmap.html_heatmap(words, relevances)  # checks lengths and values as pdf_heatmap would
    Path(path).with_suffix(".html").write_text(_heatmap.html_heatmap(words, relevances), encoding="utf-8")


def _ours_relevance(model, input_ids, head=None) -> torch.Tensor:
    """Our main API: patch (gradient view), seed 1 at the chosen output, ``x * x.grad``."""
    with lrp_kernels.patch(model):
        emb = model.get_input_embeddings()(input_ids).requires_grad_()
        out = model(inputs_embeds=emb, use_cache=False).logits
        if head is not None:
            out = head(out)
        out[0, -1, :].max().backward()
        relevance = (emb * emb.grad).float().sum(-1)[0]
    return relevance / relevance.abs().max()


def _namespace(tokenizer, hub_llama=None, hub_mixtral=None) -> dict:
    stand_ins = {"AutoTokenizer": type("AutoTokenizer", (), {"from_pretrained": staticmethod(lambda *a, **k: tokenizer)}),
                 "pdf_heatmap": _html_instead}
    if hub_llama is not None:
        stand_ins["LlamaForCausalLM"] = hub_llama
    if hub_mixtral is not None:
        stand_ins["MixtralForCausalLM"] = hub_mixtral
    return {"_stand_ins": stand_ins, "torch": torch}


def _patch_transformers_import(code: str) -> str:
    # `from transformers import AutoTokenizer` is an import line too: the tokenizer stand-in
    return re.sub(r"^(\s*)from transformers import (.*)$",
                  lambda m: m.group(0) + "".join(f"\n{m.group(1)}{n} = _stand_ins[{n!r}]"
                                                 for n in ("AutoTokenizer",) if n in m.group(2)),
                  code, flags=re.M)


def _prepare(code: str, ns: dict) -> str:
    return _patch_transformers_import(compat_imports(code, ns["_stand_ins"]))


def _tinyllama_block() -> str:
    return next(b for b in python_blocks("003") if "TinyLlama/TinyLlama" in b)


def _tail(block: str, first: str) -> str:
    """The lines of ``block`` from the first one starting with ``first``."""
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    return "\n".join(lines[start:]) + "\n"


def test_003_tinyllama_and_heatmaps(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = _Hub(tr.LlamaForCausalLM, tr.LlamaConfig, len(tokenizer))
    ns = _namespace(tokenizer, hub_llama=hub)
    run(_prepare(_tinyllama_block(), ns), ns, "<seed 003 TinyLlama>")
    assert len(hub.built) == 1 and ns["attnlrp"].handles
    close(ns["relevance"], _ours_relevance(hub.build(), ns["input_ids"]))
    assert (tmp_path / "heatmap.html").exists() or (tmp_path / "heatmap.pdf").exists()

    # "Render heatmaps": clean_words and pdf_heatmap on the TinyLlama run's variables
    render = next(b for b in python_blocks("003") if "clean_words" in b)
    (tmp_path / "heatmap.html").unlink(missing_ok=True)
    run(_prepare(render, ns), ns, "<seed 003 heatmap>")
    assert "".join(ns["words"]).strip()
    assert (tmp_path / "heatmap.html").exists() or (tmp_path / "heatmap.pdf").exists()

    # softmax with temperature on the logits: fresh embeddings (what "# ..." stands for)
    block = next(b for b in python_blocks("003") if "temperature=2" in b)
    ns["input_embeds"] = ns["model"].get_input_embeddings()(ns["input_ids"])
    run(_prepare(block, ns), ns, "<seed 003 softmax>")
    relevance = ns["input_embeds"].grad.float().sum(-1)[0]
    ours = _ours_relevance(hub.build(), ns["input_ids"],
                           head=lambda logits: lrp_kernels.grad.softmax(logits, -1, temperature=2))
    ns["attnlrp"].remove()
    close(relevance / relevance.abs().max(), ours)


# what the "like TinyLLaMA" blocks take from the TinyLlama block: its imports
CONTEXT_IMPORTS = "import torch\nfrom lxt.utils import pdf_heatmap, clean_tokens\n"


def test_003_llama_with_gradient_checkpointing(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = _Hub(tr.LlamaForCausalLM, tr.LlamaConfig, len(tokenizer))
    ns = _namespace(tokenizer, hub_llama=hub)
    ns["tokenizer"] = tokenizer  # the page's context: the TinyLlama block made it
    block = next(b for b in python_blocks("003") if "Llama-2-7b" in b)
    # "like TinyLLaMA": the block loads the model, the TinyLlama block's code does the rest
    code = block + _tail(_tinyllama_block(), "# apply AttnLRP rules")
    run(_prepare(CONTEXT_IMPORTS + code, ns), ns, "<seed 003 Llama 2/3>")
    ns["attnlrp"].remove()
    assert ns["model"].is_gradient_checkpointing
    close(ns["relevance"], _ours_relevance(hub.build(), ns["input_ids"]))


def test_003_mixtral(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = _Hub(tr.MixtralForCausalLM, tr.MixtralConfig, len(tokenizer), num_local_experts=4, num_experts_per_tok=2)
    ns = _namespace(tokenizer, hub_mixtral=hub)
    ns["tokenizer"] = tokenizer
    block = next(b for b in python_blocks("003") if "Mixtral-8x7B" in b)
    code = block + _tail(_tinyllama_block(), "prompt = ")   # the block's "# ...": the TinyLlama steps
    run(_prepare(CONTEXT_IMPORTS + code, ns), ns, "<seed 003 Mixtral>")
    ns["attnlrp"].remove()
    close(ns["relevance"], _ours_relevance(hub.build(), ns["input_ids"]))


def test_seed_blocks_are_all_accounted_for():
    """Every Python block of the three documents is run above or named in the module docstring."""
    counts = {p: len(python_blocks(p)) for p in ("000", "001", "003")}
    run_here = {"000": 4, "001": 2, "003": 5}   # 003: TinyLlama, heatmaps, softmax, Llama 2/3, Mixtral
    not_run = {"003": 2}                         # general usage sketch, OpenCLIP
    assert counts == {p: run_here[p] + not_run.get(p, 0) for p in counts}, counts
