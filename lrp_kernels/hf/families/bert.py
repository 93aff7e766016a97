"""BERT: LayerNorm (std detached), GELU (identity), pooler tanh (identity), absolute position and
token-type embeddings (additive constants); bidirectional attention with padding masks."""
from . import Family

FAMILY = Family(name="bert", model_types=("bert",))
