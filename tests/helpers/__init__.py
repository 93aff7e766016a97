"""Shared test helpers (no tests here). ``tests/conftest.py`` puts ``tests/`` on ``sys.path``,
so test modules import them as ``from helpers import oracle`` or ``from helpers.cases import CASES``.

* :mod:`helpers.oracle`: the independent float64 evaluation of SPEC.md (never calls lrp_kernels);
* :mod:`helpers.cases`: the per-op case table (inputs, plain op, oracle per view) and the checks
  that every op file of ``tests/ops/`` runs on its cases, in every view and backend;
* :mod:`helpers.contract`: :class:`~helpers.contract.OpContract`, those checks as one set of
  tests; each op file subclasses it with its case names (``class TestSoftmax(OpContract)``);
* :mod:`helpers.kernels`: inputs and forced calls of the backend-kernel tests (dyadic inputs,
  the Triton backend);
* :mod:`helpers.cpp`: inputs, tolerances and comparisons of the C++ norm backend tests;
* :mod:`helpers.models`: tiny Hugging Face models of every patched family and a plain-torch
  reference of the AttnLRP rules;
* :mod:`helpers.reference_llama`: an explicit relevance-view Llama forward;
* :mod:`helpers.recall`: the shipped recall task's answer and answer span, read off a prompt;
* :mod:`helpers.recall_task`: the task's generator (python/train_recall_model.py) as ``task``, and
  tiny random Llamas of it (fixtures ``tok`` / ``model``, or saved to a folder).
"""
