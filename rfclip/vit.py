"""Step-by-step access to an open_clip ``VisionTransformer``, for methods that change its blocks.

The weights stay in the open_clip modules; this class only walks them: patch embedding with a
resized positional embedding, per-block q/k/v, attention variants, the block's output projection,
MLP and the ``ln_post @ proj`` head. Shapes: B crops, T = 1 + N tokens (CLS first), D width,
H heads of size ``dh``, E the joint embedding size.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


class DenseViT:
    """Walks an open_clip ``VisionTransformer`` block by block.

    Args:
        visual: ``clip_model.visual`` of an open_clip CLIP ViT (class token, ``nn.MultiheadAttention``
            blocks, no attentional pooler).
    """

    def __init__(self, visual: nn.Module):
        for attr in ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post", "proj"):
            if not hasattr(visual, attr):
                raise TypeError(f"{type(visual).__name__} is not an open_clip CLIP ViT (no {attr})")
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError("ViTs with an attentional pooler are not supported")
        self.visual = visual
        self.blocks = list(visual.transformer.resblocks)
        first = self.blocks[0]
        if not isinstance(first.attn, nn.MultiheadAttention):
            raise TypeError("only blocks with nn.MultiheadAttention are supported")
        self.num_layers = len(self.blocks)
        self.width = first.attn.embed_dim
        self.heads = first.attn.num_heads
        self.head_dim = self.width // self.heads
        self.scale = self.head_dim ** -0.5
        self.patch = visual.conv1.kernel_size[0]
        n_pos = visual.positional_embedding.shape[0] - 1
        side = int(round(math.sqrt(n_pos)))
        self.pos_grid = tuple(getattr(visual, "grid_size", (side, side)))
        self.input_size = tuple(getattr(visual, "image_size", (self.pos_grid[0] * self.patch,) * 2))
        self._pos_cache: dict[tuple, Tensor] = {}

    # ---- embedding ---------------------------------------------------------------------------
    def positional_embedding(self, grid: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """``(1 + h*w, D)``: CLS position kept, the patch grid resized bicubically (align_corners=False)."""
        key = (grid, dtype, device)
        if key not in self._pos_cache:
            pos = self.visual.positional_embedding.float()
            cls, patches = pos[:1], pos[1:]
            gh, gw = self.pos_grid
            if tuple(grid) != (gh, gw):
                g = patches.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
                g = F.interpolate(g, size=grid, mode="bicubic", align_corners=False)
                patches = g.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
            self._pos_cache[key] = torch.cat([cls, patches]).to(device=device, dtype=dtype)
        return self._pos_cache[key]

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Normalised images ``(B, 3, H, W)`` (H, W multiples of the patch) to tokens ``(B, T, D)``."""
        if x.shape[-2] % self.patch or x.shape[-1] % self.patch:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch}")
        v = self.visual
        x = v.conv1(x.to(v.conv1.weight.dtype))
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(grid, x.dtype, x.device)
        return v.ln_pre(x), grid

    # ---- attention pieces --------------------------------------------------------------------
    def qkv(self, block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q, k, v`` of ``block`` on ``ln_1(x)``, each ``(B, H, T, dh)``."""
        b, t, _ = x.shape
        attn = block.attn
        y = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        y = y.view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return y[0], y[1], y[2]

    def keys_values(self, block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """``k, v`` of ``block`` on ``ln_1(x)``, each ``(B, H, T, dh)`` (no query projection)."""
        b, t, d = x.shape
        attn = block.attn
        w = attn.in_proj_weight[d:]
        bias = attn.in_proj_bias[d:] if attn.in_proj_bias is not None else None
        y = F.linear(block.ln_1(x), w, bias).view(b, t, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return y[0], y[1]

    def attention_scores(self, a: Tensor, b: Tensor) -> Tensor:
        """``a b^T / sqrt(dh)`` in ``a``'s dtype: ``(B, H, T, T')`` for ``a`` ``(B, H, T, dh)``, ``b`` ``(B, H, T', dh)``.

        One batched matmul with the scale as its ``alpha``. The views that :meth:`qkv` returns are copied
        once into ``(B*H, T, dh)``; ``b``'s transpose is a view of that copy, which the matmul reads as it
        is (a transposed copy of ``b`` costs twice as much on CPUs)."""
        a3 = a.reshape(-1, a.shape[-2], a.shape[-1])
        b3 = a3 if b is a else b.reshape(-1, b.shape[-2], b.shape[-1])
        zero = a3.new_zeros(1, 1, 1).expand(a3.shape[0], a3.shape[1], b3.shape[1])  # ignored (beta=0)
        out = torch.baddbmm(zero, a3, b3.transpose(1, 2), beta=0, alpha=self.scale)
        return out.view(*a.shape[:-2], a3.shape[1], b3.shape[1])

    def softmax_attention(self, a: Tensor, b: Tensor) -> Tensor:
        """``softmax(a b^T / sqrt(dh))`` over keys, computed in float32: ``(B, H, T, T)``."""
        return self.attention_scores(a, b).softmax(dim=-1, dtype=torch.float32)

    def mean_patch_self_attention(self, k: Tensor) -> Tensor:
        """Head-mean of the patch block of ``softmax(k k^T / sqrt(dh))``: ``(B, N, N)`` float32.

        The softmax runs over all T keys (CLS included) before the CLS row and column are dropped;
        it is kept in ``k``'s dtype (half the memory traffic of float32 in 16-bit towers), the head
        mean is taken in float32."""
        return self.attention_scores(k, k).softmax(dim=-1)[:, :, 1:, 1:].mean(dim=1, dtype=torch.float32)

    def project(self, block: nn.Module, heads_out: Tensor) -> Tensor:
        """Merge heads ``(B, H, T', dh)`` and apply ``out_proj``: ``(B, T', D)`` (no residual, no ls_1)."""
        b, h, t, dh = heads_out.shape
        merged = heads_out.transpose(1, 2).reshape(b, t, h * dh)
        return block.attn.out_proj(merged)

    def attend(self, block: nn.Module, attn: Tensor, v: Tensor) -> Tensor:
        """``out_proj(attn @ v)`` for an explicit attention ``(B, H, T', T)``: ``(B, T', D)``."""
        return self.project(block, torch.matmul(attn.to(v.dtype), v))

    def finish_block(self, block: nn.Module, x: Tensor, attn_out: Tensor) -> Tensor:
        """Residual + MLP: ``x + ls_1(attn_out)``, then ``+ ls_2(mlp(ln_2(.)))``."""
        x = x + block.ls_1(attn_out)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def plain_block(self, block: nn.Module, x: Tensor, qkv: Optional[tuple] = None) -> Tensor:
        """The unchanged block (fused ``scaled_dot_product_attention``); ``qkv`` may be reused."""
        q, k, v = qkv if qkv is not None else self.qkv(block, x)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.finish_block(block, x, self.project(block, out))

    # ---- head --------------------------------------------------------------------------------
    def head(self, tokens: Tensor) -> Tensor:
        """``ln_post(tokens) @ proj``: ``(..., D)`` to ``(..., E)``, not normalised."""
        return self.visual.ln_post(tokens) @ self.visual.proj
