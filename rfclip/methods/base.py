"""What a dense method is: a callable from normalised crops to dense features, plus crop logits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..settings import Settings
from ..vit import DenseViT

Tensor = torch.Tensor


@dataclass
class DenseOutput:
    """Output of a method's forward pass.

    Attributes:
        features: ``(B, h, w, E)`` dense features after ``ln_post`` and ``proj``, before L2 normalisation.
        cls: ``(B, E)`` the crop's plain CLIP embedding, when the method computes it, else None.
    """

    features: Tensor
    cls: Optional[Tensor] = None


class DenseMethod:
    """Base class: subclasses implement :meth:`encode`; :meth:`crop_logits` is cosine similarity.

    Args:
        vit: the walked image tower.
        settings: resolved settings.
        arch: open_clip architecture name (for the per-architecture tables).
    """

    name = "base"
    needs_global_embedding = False

    def __init__(self, vit: DenseViT, settings: Settings, arch: str):
        self.vit = vit
        self.settings = settings
        self.arch = arch

    def encode(self, x: Tensor) -> DenseOutput:
        """Normalised crops ``(B, 3, H, W)``, H and W multiples of the patch, to :class:`DenseOutput`."""
        raise NotImplementedError

    def crop_logits(self, features: Tensor, text: Tensor, global_emb: Optional[Tensor] = None) -> Tensor:
        """Cosine logits ``(B, Q, h, w)`` from unit features ``(B, h, w, E)`` and unit queries ``(Q, E)``."""
        return torch.einsum("bhwe,qe->bqhw", features, text.to(features.dtype))
