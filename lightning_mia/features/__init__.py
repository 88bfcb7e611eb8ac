"""Per-sample features for membership-inference audits (Rezaei & Liu, CVPR 2021, Sec. 4).

Every feature maps a batch to a float32 ``(n, d)`` tensor (:class:`Feature`), is registered in
:data:`FEATURES` and can be built from a name or ``{"name": ..., **options}``:

============================ ========================================================================
``confidence``               softmax sorted descending (option ``top_k``)
``softmax``                  full softmax vector
``true_class_prob``          ``p_y``
``loss``                     cross-entropy with the true label
``entropy``                  Shannon entropy of the softmax
``modified_entropy``         Song & Mittal (2021)
``logit_scaled_confidence``  ``log p_y - log sum_{j != y} p_j`` (LiRA)
``intermediate``             outputs of chosen layers (forward hooks), optional PCA cap
``gradient_norms``           7 statistics of per-sample ``dL/dw`` and ``dL/dx``
``boundary_distance``        L2 distance to the decision boundary (Algorithm 1; label-only variant)
``trajectory``               the loss (or LiRA's confidence) at every audited epoch so far
============================ ========================================================================

Example:
    >>> import torch
    >>> from lightning_mia.features import FEATURES, extract_features
    >>> sorted(FEATURES)[:3]
    ['boundary_distance', 'confidence', 'entropy']
    >>> model = torch.nn.Linear(4, 3)
    >>> extract_features(model, "entropy", (torch.randn(6, 4), torch.zeros(6, dtype=torch.long))).shape
    (6, 1)
"""
from lightning_mia.features.base import FEATURES, Feature, build_feature, eval_mode  # noqa: I001
from lightning_mia.features.extract import extract_features, run_extraction
from lightning_mia.features.confidence import (
    Confidence,
    Entropy,
    LogitScaledConfidence,
    Loss,
    ModifiedEntropy,
    Softmax,
    TrueClassProb,
)
from lightning_mia.features.intermediate import Intermediate
from lightning_mia.features.gradients import STAT_NAMES, GradientNorms
from lightning_mia.features.boundary import BoundaryDistance
from lightning_mia.features.trajectory import Trajectory

__all__ = [
    "FEATURES",
    "Feature",
    "build_feature",
    "eval_mode",
    "extract_features",
    "run_extraction",
    "Confidence",
    "Softmax",
    "TrueClassProb",
    "Loss",
    "Entropy",
    "ModifiedEntropy",
    "LogitScaledConfidence",
    "Intermediate",
    "GradientNorms",
    "STAT_NAMES",
    "BoundaryDistance",
    "Trajectory",
]
