"""LXT's explicit API (``lxt.explicit``): drop-in functions and modules, rules, ``Composite``,
CP-LRP attention, the conservation check, and ``models`` (AttnLRP on Hugging Face models)."""
from . import check, core, functional, modules, rules, special  # noqa: F401

__all__ = ["check", "core", "functional", "modules", "rules", "special"]
