"""How linear are a transformer's layers (Razzhigaev et al. 2024), and what happens when the most
linear blocks are replaced by affine maps. See METHODS.md section 2."""

from noln.linearity.geometry import anisotropy, twonn_dimension
from noln.linearity.regularizer import cosine_regularizer
from noln.linearity.replace import (
    AffineBlock,
    SkipBlock,
    decoder_layers,
    distill,
    fit_layers,
    greedy_linearize,
    load_linearized,
    save_linearized,
    swapped,
)
from noln.linearity.score import (
    LayerScore,
    LinearityProfile,
    StreamingMoments,
    linearity_profile,
    linearity_scores,
    score_pairs,
)

__all__ = ["AffineBlock", "LayerScore", "LinearityProfile", "SkipBlock", "StreamingMoments",
           "anisotropy", "cosine_regularizer", "decoder_layers", "distill", "fit_layers",
           "greedy_linearize", "linearity_profile", "linearity_scores", "load_linearized",
           "save_linearized", "score_pairs", "swapped", "twonn_dimension"]
