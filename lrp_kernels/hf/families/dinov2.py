"""DINOv2 (``Dinov2Model``, ``Dinov2ForImageClassification``): a ViT with layer scale.

Layer scale ``x * lambda1`` multiplies by a parameter, a constant: linear, no rule. The CLS
token, the mask token (pre-training only) and the position embeddings (interpolated to the
image size by a fixed resampling) are constants too. LayerNorm (std detached), GELU (identity),
the patch-embedding ``Conv2d`` (epsilon, generic); the SwiGLU feed-forward of the giant model
(``use_swiglu_ffn``) is a gated MLP (uniform rule on ``silu(gate) * up``). The classifier's input
``[CLS, mean of the patch tokens]`` is linear with constant coefficients. Drop path is the
identity in eval mode.
"""
from . import Family
from ..installers import install_gated_mlp

FAMILY = Family(
    name="dinov2",
    model_types=("dinov2",),
    module_rules={"Dinov2SwiGLUFFN": install_gated_mlp},
    parameter_holders=("Dinov2Embeddings", "Dinov2LayerScale"),
)
