"""The ``attnlrp`` object of LXT's model modules, on :func:`lrp_kernels.patch`."""
from __future__ import annotations

from typing import List, Optional

from torch import nn

from .....hf.patching import PatchHandle, patch


class AttnLRP:
    """``attnlrp.register(model)`` patches ``model`` with AttnLRP in the relevance view;
    ``attnlrp.remove()`` restores every model it patched.

    Args:
        rules: ``"attnlrp"`` (LXT's ``attnlrp``) or ``"cp-lrp"`` (LXT's ``cp_lrp``).
    """

    def __init__(self, rules: str = "attnlrp") -> None:
        self.rules = rules
        self.handles: List[PatchHandle] = []

    def register(self, model: nn.Module, dummy_inputs: Optional[dict] = None, verbose: bool = False,
                 **options) -> nn.Module:
        """Patch ``model`` (a transformers model of a supported family) and return it.
        ``options`` go to :func:`lrp_kernels.patch` (``epsilon``, ``backend``, ``strict``, ...)."""
        if dummy_inputs is not None:
            raise ValueError("dummy_inputs: Hugging Face models are patched, not traced; call register(model)")
        handle = patch(model, rules=self.rules, view="relevance", **options)
        self.handles.append(handle)
        if verbose:
            print(f"{type(model).__name__}: {self.rules} (relevance view)")
        return model

    def remove(self) -> None:
        """Restore every model this object patched."""
        while self.handles:
            self.handles.pop().remove()
