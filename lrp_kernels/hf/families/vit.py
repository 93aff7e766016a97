"""ViT: the patch embedding ``Conv2d`` gets the epsilon rule (generic, on the module's own
backward); the CLS token and position embeddings are additive constants; LayerNorm (std
detached), GELU (identity). Relevance is read at ``pixel_values``."""
from . import Family

FAMILY = Family(name="vit", model_types=("vit",), parameter_holders=("ViTEmbeddings",))
