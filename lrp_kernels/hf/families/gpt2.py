"""GPT-2: ``Conv1D`` projections (epsilon rule on the transposed weight), LayerNorm (std
detached), GELU (identity), learned position embeddings (additive constants)."""
from . import Family

FAMILY = Family(name="gpt2", model_types=("gpt2",))
