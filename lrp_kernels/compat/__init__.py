"""Compatibility layers: the public names, signatures, defaults and conventions of the libraries
our users come from, built on lrp_kernels' own rules and kernels.

- :mod:`lrp_kernels.compat.lxt` — LXT's explicit API (``functional``, ``modules``, ``rules``,
  ``core.Composite``, ``special``).
- :mod:`lrp_kernels.compat.zennit` — Zennit's API (``core``, ``rules``, ``composites``,
  ``canonizers``, ``attribution``, ``image``, ``cmap``, ``types``).
- :mod:`lrp_kernels.compat.captum` — AttnLRP as a Captum attribution (``AttnLRP``,
  ``LLMAttnLRP``) for Captum's LLM wrappers and plots (optional extra ``[captum]``).

Switching is an import change (``import lrp_kernels.compat.zennit as zennit``). Where our main API
deliberately differs from a peer, the compat layer follows the peer; docs/migration.md says where
and why. The peers' own test suites judge these layers (tests/compat/).
"""
