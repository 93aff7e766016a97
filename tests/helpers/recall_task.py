"""The recall task's generator, python/train_recall_model.py, as ``task`` (vocabulary, tokenizer,
prompts, model builder), and tiny random Llamas of it for the tests that need a model of the
task but not a trained one (no hub, no downloads)::

    from helpers.recall_task import task, tiny_llama_fixtures

    tok, model = tiny_llama_fixtures(hidden=32, layers=1, heads=2)  # module-scoped fixtures
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

PYTHON_DIR = str(Path(__file__).resolve().parents[2] / "python")
if PYTHON_DIR not in sys.path:
    sys.path.insert(0, PYTHON_DIR)
import train_recall_model as task  # noqa: E402


def tiny_llama(tok, std: float = 0.2, **sizes):
    """A random Llama of the task in eval mode (torch seed 0), every weight redrawn from
    N(0, std): random but not tiny, so attention patterns are non-trivial. ``sizes``: the
    builder's ``hidden`` / ``layers`` / ``heads``."""
    torch.manual_seed(0)
    model = task.build_model(len(task.VOCAB), tok, **sizes).eval()
    for p in model.parameters():
        p.data.normal_(0, std)
    return model


def tiny_llama_fixtures(**sizes):
    """Module-scoped fixtures ``tok`` (the task's tokenizer) and ``model`` (``tiny_llama``):
    bind them under those names in a test module, ``tok, model = tiny_llama_fixtures()``."""
    @pytest.fixture(scope="module")
    def tok():
        return task.build_tokenizer()

    @pytest.fixture(scope="module")
    def model(tok):
        return tiny_llama(tok, **sizes)
    return tok, model


def save_tiny_llama(path, tok=None):
    """A random Llama of the task (torch seed 0, the builder's own initialisation) and its
    tokenizer saved to ``path``, as ``from_pretrained`` reads them; returns ``path``."""
    tok = task.build_tokenizer() if tok is None else tok
    torch.manual_seed(0)
    task.build_model(len(task.VOCAB), tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path
