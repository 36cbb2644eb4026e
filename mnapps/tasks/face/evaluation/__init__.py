"""Face verification evaluation: pair lists, embeddings of pair images, and the LFW-style metrics.

The package holds one thing per module: :mod:`.pairs` (:func:`read_pairs` and
:func:`resolve_pairs`: LFW ``pairs.txt`` and CSV pair lists, and the images they name),
:mod:`.metrics` (:func:`verification_metrics`: k-fold accuracy, ROC, AUC, EER and TAR@FAR from
pair distances, each beside its baseline), :mod:`.embeddings` (:func:`embed_faces`, the one
embedding loop, and the collapse guard :func:`embedding_spread`) and :mod:`.report`
(:func:`plot_roc`, :func:`format_verification_table`). Every public name is importable from the
package itself.
"""

from .embeddings import (
    COLLAPSE_COSINE,
    COLLAPSE_RANK,
    collapse_warning,
    embed_faces,
    embedding_spread,
    is_collapsed,
    pair_distances,
)
from .metrics import (
    DEFAULT_FARS,
    accuracy_at_threshold,
    equal_error_rate,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_metrics,
)
from .pairs import PairList, PairSpec, read_pairs, resolve_pairs
from .report import format_verification_table, plot_roc

__all__ = [
    "PairSpec",
    "PairList",
    "read_pairs",
    "resolve_pairs",
    "kfold_accuracy",
    "accuracy_at_threshold",
    "roc_curve",
    "roc_auc",
    "equal_error_rate",
    "tar_at_far",
    "verification_metrics",
    "embed_faces",
    "embedding_spread",
    "collapse_warning",
    "is_collapsed",
    "COLLAPSE_COSINE",
    "COLLAPSE_RANK",
    "pair_distances",
    "plot_roc",
    "format_verification_table",
    "DEFAULT_FARS",
]
