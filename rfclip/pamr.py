"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as a post-processing step.

Affinities between each pixel and its 8 neighbours at each dilation come from colour differences
scaled by the local colour spread: ``k(p, n) = -mean_c |I_p - I_n| / (0.1 * std(I)_p)``, softmax over
all neighbours; the masks are then averaged ``iters`` times with those weights. The std is taken, as
in the authors' ``LocalStDev``, over each dilation's 3 x 3 window, the pixel itself included once per
dilation (18 samples for dilations 8 and 16).

[decision] ``Segmenter`` refines the logits (METHODS.md §1 step 4 comes before the softmax of step 5),
as the SCLIP / ClearCLIP pipelines do, not probabilities.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .images import bilinear_rows

Tensor = torch.Tensor

#: Working memory of one band of :func:`pamr_row_bands`. A Cityscapes image (2048 x 1024) with 30 names
#: fits in one band, so the benchmarks' images are refined whole.
PAMR_BAND_BYTES = 2 ** 30


def _offsets(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """The 8 neighbours ``(dy, dx)`` at each dilation: ``K = 8 * len(dilations)`` of them."""
    return [(dy, dx) for d in dilations for dy in (-d, 0, d) for dx in (-d, 0, d) if (dy, dx) != (0, 0)]


def _shifts(x: Tensor, offsets: list[tuple[int, int]]):
    """Yield ``x`` ``(C, H, W)`` shifted to each neighbour in ``offsets`` (replicate border), ``(C, H, W)``
    views of one padded copy. [decision] One neighbour at a time, not stacked: a ``(C, K, H, W)`` stack
    took 16 times the masks' memory (about 30 GB for a 16 MP image and 30 names)."""
    _, h, w = x.shape
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    xp = F.pad(x[None], (pad, pad, pad, pad), mode="replicate")[0]
    for dy, dx in offsets:
        yield xp[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def _affinity_weights(image: Tensor, dilations: tuple[int, ...]) -> Tensor:
    """Softmax weights ``(K, H, W)`` float32 of each pixel's neighbours, from ``image`` ``(3, H, W)``."""
    img = image.float()
    offsets = _offsets(dilations)
    n = len(offsets) + len(dilations)                    # the window: neighbours, the centre once per dilation
    mean = img * len(dilations)
    for nb in _shifts(img, offsets):
        mean = mean + nb
    mean = mean / n
    var = (img - mean).square() * len(dilations)
    for nb in _shifts(img, offsets):
        var = var + (nb - mean).square()
    spread = (var / (n - 1)).sqrt() + 1e-8               # (3, H, W): the unbiased std, as torch.std
    scale = -1.0 / (0.1 * spread * img.shape[0])         # the mean over channels folded in
    aff = img.new_empty((len(offsets),) + img.shape[1:])
    for k, nb in enumerate(_shifts(img, offsets)):
        torch.sum((nb - img).abs().mul_(scale), dim=0, out=aff[k])
    # the softmax over the neighbours, in place: one set of K planes, not two
    aff.sub_(aff.amax(dim=0, keepdim=True)).exp_()
    return aff.div_(aff.sum(dim=0, keepdim=True))


@torch.no_grad()
def pamr(image: Tensor, masks: Tensor, iters: int = 10, dilations: tuple[int, ...] = (8, 16)) -> Tensor:
    """Refine ``masks`` ``(Q, H, W)`` with affinities from ``image`` ``(3, H, W)``; returns ``(Q, H, W)``
    in ``masks``' dtype, computed in float32. Memory: about 3 copies of the masks in float32 and
    ``K = 8 * len(dilations)`` float32 planes of weights."""
    weights = _affinity_weights(image, dilations)
    offsets = _offsets(dilations)
    out = masks.float()
    for _ in range(iters):
        acc = torch.zeros_like(out)
        for k, nb in enumerate(_shifts(out, offsets)):
            acc.addcmul_(nb, weights[k])
        out = acc
    return out.to(masks.dtype)


@torch.no_grad()
def pamr_row_bands(logits: Tensor, image: Tensor, size: tuple[int, int], max_bytes: Optional[int] = None,
                   iters: int = 10, dilations: tuple[int, ...] = (8, 16)):
    """Yield ``(r0, r1, band)``: PAMR of ``logits`` ``(Q, h, w)``, guided by ``image`` ``(3, h', w')``, both
    resized bilinearly to ``size`` ``(H, W)``; ``band`` ``(Q, r1 - r0, W)`` float32 holds rows ``r0:r1``.

    One band where the whole image fits in ``max_bytes`` (default :data:`PAMR_BAND_BYTES`). Otherwise
    each band is refined with a halo of ``iters * max(dilations)`` rows on either side: a row's refined
    value depends on no row further away, so the bands equal the whole image's refinement up to float
    rounding. [decision] A band is at least
    a halo high, so no row is refined more than 3 times; memory may then exceed ``max_bytes``.
    """
    q = logits.shape[0]
    H, W = size
    halo = iters * max(dilations)
    per_row = W * 4 * (3 * q + 8 * len(dilations) + 12)  # masks x3, weights, the guide and its temporaries
    fit = (PAMR_BAND_BYTES if max_bytes is None else max_bytes) // per_row
    rows = H if fit >= H else max(halo, fit - 2 * halo)
    image, logits = image.float(), logits.float()           # once, not per band (both at the working size)
    for r0 in range(0, H, rows):
        r1 = min(H, r0 + rows)
        e0, e1 = max(0, r0 - halo), min(H, r1 + halo)
        refined = pamr(bilinear_rows(image, size, e0, e1), bilinear_rows(logits, size, e0, e1), iters, dilations)
        yield r0, r1, refined[:, r0 - e0:r1 - e0]
