"""Model families: which rule each module of a Hugging Face model gets.

``REGISTRY`` maps a config's ``model_type`` to a :class:`Family`. Most modules are handled by
generic rules (:mod:`lrp_kernels.hf.installers`: linear-like, norms, activations, dropout); a
family adds what only its code knows: the class names of gated MLPs (whose product ``act(g) * u``
lives in the MLP's forward), the RMSNorm weight convention (Gemma's ``1 + w``), modules with
their own rule (MoE experts and routers), modules whose parameters only enter as constants
(ViT's CLS token and position embeddings, DINOv2's layer scale), and set-up steps on the patched
instance (Gemma's final logit soft-cap).

Add a family: write ``lrp_kernels/hf/families/<family>.py`` defining ``FAMILY = Family(...)`` and list it in
``_FAMILY_MODULES`` below.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

Installer = Callable  # (handle, name, module) -> None


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # class name -> installer for modules with a family-specific rule (gated MLPs, MoE, ...)
    module_rules: dict[str, Installer] = field(default_factory=dict)
    # RMSNorm y = (rms_weight_offset + w) * x / rms(x): 0 for Llama-style, 1 for Gemma
    rms_weight_offset: float = 0.0
    # class names that are RMSNorms without "RMSNorm" in their name (T5LayerNorm)
    rms_norm_names: tuple[str, ...] = ()
    # class names whose own parameters enter only as constants: added, multiplied or fed in as
    # inputs (CLS tokens, position embeddings, layer scales, a pooling probe; no rule needed)
    parameter_holders: tuple[str, ...] = ()
    # called once after the generic rules: (handle, model) -> None
    setup: Optional[Callable] = None


_FAMILY_MODULES = ("llama", "gemma", "phi3", "mixtral", "gpt2", "bert", "t5", "vit", "clip", "siglip", "dinov2")

REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add (or replace) a family for its model types."""
    for model_type in family.model_types:
        REGISTRY[model_type] = family
    return family


for _name in _FAMILY_MODULES:
    register_family(importlib.import_module(f"{__name__}.{_name}").FAMILY)


def family_for(model) -> Optional[Family]:
    """The family of a Hugging Face model (by ``config.model_type``), or None."""
    config = getattr(model, "config", None)
    return REGISTRY.get(getattr(config, "model_type", None))


__all__ = ["Family", "REGISTRY", "family_for", "register_family"]
