"""Hand-built :class:`~lrp_kernels.explanations.matrix.RelevanceMatrix` objects for tests of
what reads the matrix (aggregation, sources, the viewer) without a model."""
import torch

from lrp_kernels.explanations.matrix import RelevanceMatrix


def make_matrix(prompt_pieces, answer_pieces, seed=0, bos=True):
    """A matrix whose tokens are the given pieces (plus <bos> with an empty span): text =
    prompt + answer, offsets from the pieces, random relevance, zeros at and after each row's
    position as the contract says."""
    toks = (["<bos>"] if bos else []) + list(prompt_pieces) + list(answer_pieces)
    offsets, at = ([(0, 0)] if bos else []), 0
    for piece in list(prompt_pieces) + list(answer_pieces):
        offsets.append((at, at + len(piece)))
        at += len(piece)
    p = len(prompt_pieces) + (1 if bos else 0)
    k = len(answer_pieces)
    g = torch.Generator().manual_seed(seed)
    rel = torch.randn(k, len(toks), generator=g)
    for r in range(k):
        rel[r, p + r:] = 0
    return RelevanceMatrix(tokens=toks, token_ids=list(range(len(toks))), prompt_length=p,
                           relevance=rel, target_logits=torch.randn(k, generator=g),
                           target_probabilities=torch.rand(k, generator=g),
                           text="".join(prompt_pieces) + "".join(answer_pieces), offsets=offsets)
