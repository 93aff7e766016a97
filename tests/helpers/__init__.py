"""Shared test helpers (no tests here). ``tests/conftest.py`` puts ``tests/`` on ``sys.path``,
so test modules import them as ``from helpers import oracle`` or ``from helpers.models import build``.

* :mod:`helpers.oracle`: the independent float64 evaluation of SPEC.md (never calls lrp_kernels);
* :mod:`helpers.models`: tiny Hugging Face models of every patched family and a plain-torch
  reference of the AttnLRP rules;
* :mod:`helpers.reference_llama`: an explicit relevance-view Llama forward.
"""
