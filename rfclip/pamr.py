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

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _neighbours(x: Tensor, dilations: tuple[int, ...]) -> Tensor:
    """``(C, K, H, W)``: x shifted to each of the 8 neighbours at each dilation (replicate border)."""
    c, h, w = x.shape
    pad = max(dilations)
    xp = F.pad(x[None], (pad, pad, pad, pad), mode="replicate")[0]
    shifts = []
    for d in dilations:
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy == 0 and dx == 0:
                    continue
                shifts.append(xp[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w])
    return torch.stack(shifts, dim=1)


@torch.no_grad()
def pamr(image: Tensor, masks: Tensor, iters: int = 10, dilations: tuple[int, ...] = (8, 16)) -> Tensor:
    """Refine ``masks`` ``(Q, H, W)`` with affinities from ``image`` ``(3, H, W)``; returns ``(Q, H, W)``."""
    img = image.float()
    nb = _neighbours(img, dilations)                                  # (3, K, H, W)
    centre = img[:, None].expand(-1, len(dilations), -1, -1)        # once per dilation's window
    spread = torch.cat([nb, centre], dim=1).std(dim=1, keepdim=True) + 1e-8
    aff = -(nb - img[:, None]).abs() / (0.1 * spread)
    weights = aff.mean(dim=0).softmax(dim=0)                         # (K, H, W)
    out = masks.float()
    for _ in range(iters):
        out = (_neighbours(out, dilations) * weights[None]).sum(dim=1)
    return out.to(masks.dtype)
