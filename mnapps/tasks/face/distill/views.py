"""New inputs from few faces: mixup and cutmix of two crops, for a teacher to embed online.

This module owns the batch-level half of the few-face recipe. A teacher that embeds every
view it is shown can label any image, so the student does not need more *faces*, it needs
more *inputs*: points between and around the training crops where it can be told what the
teacher's function does. Mixing two faces makes such points (Beyer et al. 2022, "Knowledge
distillation: A good teacher is patient and consistent": "function matching" with aggressive
mixup, teacher and student on the very same view):

* mixup (Zhang et al. 2018): ``lam * a + (1 - lam) * b`` with ``lam ~ Beta(alpha, alpha)``;
* cutmix (Yun et al. 2019): a box of ``b`` pasted into ``a`` covering ``1 - lam`` of it.

Targets are never mixed: the teacher embeds the mixed image itself, which is what makes the
result a valid training pair whatever the teacher's function does between two faces. Every
draw uses torch's global generator (seeded per epoch by the engine), so ``--resume``
reproduces a run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["mix_faces"]


def _cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A box covering about ``1 - lam`` of the image, centred anywhere, clipped to it."""
    cut = math.sqrt(1.0 - lam)
    box_h, box_w = int(round(height * cut)), int(round(width * cut))
    cy = int(torch.randint(0, height, (1,)))
    cx = int(torch.randint(0, width, (1,)))
    top, left = max(cy - box_h // 2, 0), max(cx - box_w // 2, 0)
    return top, min(top + box_h, height), left, min(left + box_w, width)


def mix_faces(images: Tensor, *, prob: float, alpha: float = 1.0, cutmix_share: float = 0.5) -> Tensor:
    """Mix some images of a batch with other images of the same batch.

    Args:
        images: ``Tensor[N, 3, H, W]`` in [0, 1]; not modified.
        prob: chance that an image is replaced by a mix of itself and another batch image.
        alpha: Beta(alpha, alpha) draws the mixing weight ``lam`` of the image itself
            (1.0: uniform; small values keep most mixes close to one of the two faces).
        cutmix_share: share of the mixed images made by cutmix instead of mixup.

    Returns:
        A new tensor of the same shape; with ``prob == 0`` or ``N < 2`` the input itself.

    Raises:
        ValueError: a probability outside [0, 1] or ``alpha <= 0``.
    """
    if not 0.0 <= prob <= 1.0 or not 0.0 <= cutmix_share <= 1.0:
        raise ValueError(f"mix probabilities must be in [0, 1], got prob={prob}, cutmix_share={cutmix_share}")
    if alpha <= 0:
        raise ValueError(f"mix alpha must be > 0, got {alpha}")
    n = images.shape[0]
    if prob == 0.0 or n < 2:
        return images
    chosen = (torch.rand(n) < prob).nonzero().flatten().tolist()
    if not chosen:
        return images
    # Partner j != i: a shift of 1..n-1 positions in the batch, drawn per image.
    partners = [(i + int(torch.randint(1, n, (1,)))) % n for i in chosen]
    lams = torch.distributions.Beta(alpha, alpha).sample((len(chosen),)).tolist()
    use_cutmix = (torch.rand(len(chosen)) < cutmix_share).tolist()
    mixed = images.clone()
    height, width = images.shape[-2:]
    for i, j, lam, cutmix in zip(chosen, partners, lams, use_cutmix):
        if cutmix:
            top, bottom, left, right = _cutmix_box(height, width, lam)
            mixed[i, :, top:bottom, left:right] = images[j, :, top:bottom, left:right]
        else:
            mixed[i] = lam * images[i] + (1.0 - lam) * images[j]
    return mixed
