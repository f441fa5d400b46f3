"""CLIP, MaskCLIP, SCLIP, ClearCLIP and NACLIP: only the last block differs (METHODS.md §2).

Blocks 1..L-1 run unchanged. The last block's attention is one of the variants below; "no residual,
no FFN" means its output is ``out_proj(A v)`` alone. Attention variants run through the fused
``scaled_dot_product_attention`` (``(A_qq + A_kk) v = sdpa(q, q, v) + sdpa(k, k, v)``), so no T x T
matrix is materialised.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .base import DenseMethod, DenseOutput

Tensor = torch.Tensor


@functools.lru_cache(maxsize=16)
def neighbourhood_bias(grid: tuple[int, int], sigma: float, device, dtype=torch.float32) -> Tensor:
    """NACLIP's Gaussian ``G`` over patch-grid distances: ``(T, T)``, peak 1, zero on CLS row/column.

    Made once per grid, sigma, device and dtype (a forward pass only reads it)."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=-1).to(torch.float32)
    dist2 = torch.cdist(pos, pos).pow(2)
    g = torch.exp(-dist2 / (2 * sigma ** 2))
    out = torch.zeros(h * w + 1, h * w + 1, device=device)
    out[1:, 1:] = g
    return out.to(dtype)


class LastLayerVariant(DenseMethod):
    """A baseline given by its last-block attention and whether it keeps residual + FFN.

    ``attention`` is one of ``"qk"`` (vanilla), ``"identity"`` (MaskCLIP: ``out_proj(v)``),
    ``"qq+kk"`` (SCLIP), ``"qq"`` (ClearCLIP), ``"kk+gauss"`` (NACLIP).
    """

    attention = "qk"
    residual = True

    def encode(self, x: Tensor) -> DenseOutput:
        vit = self.vit
        tokens, grid = vit.embed(x)
        for block in vit.blocks[:-1]:
            tokens = vit.plain_block(block, tokens)
        last = vit.blocks[-1]
        q, k, v = vit.qkv(last, tokens)
        if self.attention == "qk":
            mixed = F.scaled_dot_product_attention(q, k, v)
        elif self.attention == "identity":
            mixed = v
        elif self.attention == "qq+kk":
            mixed = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
        elif self.attention == "qq":
            mixed = F.scaled_dot_product_attention(q, q, v)
        elif self.attention == "kk+gauss":
            bias = neighbourhood_bias(grid, self.settings.naclip_sigma, x.device, k.dtype)
            mixed = F.scaled_dot_product_attention(k, k, v, attn_mask=bias)
        else:
            raise ValueError(self.attention)
        out = vit.project(last, mixed)
        if self.residual:
            out = vit.finish_block(last, tokens, out)
        b = x.shape[0]
        feats = vit.head(out[:, 1:]).reshape(b, grid[0], grid[1], -1)
        cls = vit.head(out[:, 0]) if (self.attention == "qk" and self.residual) else None
        return DenseOutput(feats, cls)


class VanillaCLIP(LastLayerVariant):
    name, attention, residual = "clip", "qk", True


class MaskCLIP(LastLayerVariant):
    name, attention, residual = "maskclip", "identity", False


class SCLIP(LastLayerVariant):
    name, attention, residual = "sclip", "qq+kk", True


class ClearCLIP(LastLayerVariant):
    name, attention, residual = "clearclip", "qq", False


class NACLIP(LastLayerVariant):
    name, attention, residual = "naclip", "kk+gauss", False
