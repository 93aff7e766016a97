"""Gemma 1/2/3 (text): RMSNorm with ``(1 + w)``, GELU-tanh gated MLP, attention logit soft-cap
(identity rule on the tanh, inside the attention function) and the final logit soft-cap
``cap * tanh(logits / cap)`` (identity rule, applied on the lm_head of the patched instance: the
config copy has ``final_logit_softcapping = None`` so transformers does not apply it twice).
"""
from . import Family
from ..installers import install_gated_mlp, softcap_identity


def _final_softcap(handle, model) -> None:
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None)
    head = getattr(model, "lm_head", None)
    if not cap or head is None:
        return
    handle.set_attr(config, "final_logit_softcapping", None)

    def make(orig):
        def forward(x):
            return softcap_identity(handle, orig(x), float(cap))
        return forward
    handle.rebind(head, make)


FAMILY = Family(
    name="gemma",
    model_types=("gemma", "gemma2", "gemma3_text"),
    module_rules={cls: install_gated_mlp for cls in ("GemmaMLP", "Gemma2MLP", "Gemma3MLP")},
    rms_weight_offset=1.0,
    setup=_final_softcap,
)
