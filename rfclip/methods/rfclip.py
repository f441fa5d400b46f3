"""RF-CLIP as the paper describes it (METHODS.md §3): refocus every block, then a kk-averaged last block.

Per block l < L, batched over crops: (a) distractors on the input stream; (b) defocused tokens from a
normalised cut of the layer-averaged kk attention; (c) attention moved from distractors to defocused
tokens; the block runs on; (d) the distractors' distraction channels smoothed on the output.
Last block (e): ``out_proj(A_bar v)`` with ``A_bar`` the head-wise mean of every layer's kk attention.
Crops without distractors in a layer skip (b) and (c) (the cut runs only on the crops that need it).
"""
from __future__ import annotations

import torch

from .. import refocus
from ..settings import DISTRACTION_DIMS, MIN_RECEIVED_ATTENTION, base_arch
from .base import DenseMethod, DenseOutput

Tensor = torch.Tensor


def distraction_setup(settings, arch: str, width: int, device) -> tuple[Tensor, float, float | None]:
    """``(dims, tau, min_received)`` for an architecture, from the settings or the known tables."""
    dims = settings.distraction_dims
    if dims is None:
        dims = DISTRACTION_DIMS.get(base_arch(arch))
    if dims is None:
        raise ValueError(
            f"distraction dimensions are unknown for {arch}: pass distraction_dims=[...] (find them with "
            f"`python -m rfclip.find_distraction_dims --model {arch} --weights W --images DIR`)")
    if max(dims) >= width or min(dims) < 0:
        raise ValueError(f"distraction_dims {list(dims)} out of range for width {width}")
    tau = settings.tau if settings.tau is not None else 5.0 / width
    min_recv = settings.min_received_attention
    if min_recv is None:
        min_recv = MIN_RECEIVED_ATTENTION.get(base_arch(arch))
    if min_recv is not None and min_recv <= 0:
        min_recv = None
    return torch.tensor(list(dims), dtype=torch.long, device=device), tau, min_recv


def kk_averaged_last_block(vit, kk_sum: Tensor | None, tokens: Tensor, consume_sum: bool = False) -> Tensor:
    """Eq. 14: ``out_proj(A_bar v)`` of the last block on ``tokens`` ``(B, T, D)``: ``(B, N, D)``.

    ``A_bar`` is the head-wise mean over all L layers of the patch-block kk attention: ``kk_sum``
    ``(B, H, N, N)`` holds layers 1..L-1, the last layer's entry is computed here from ``tokens``.
    No residual, no FFN. ``consume_sum`` lets the sum be reused in place (it is then spent).
    """
    last = vit.blocks[-1]
    k, v = vit.keys(last, tokens)
    kk = vit.softmax_attention(k, k)[:, :, 1:, 1:]
    if kk_sum is None:
        a_bar = kk
    else:
        a_bar = kk_sum.add_(kk) if consume_sum else kk_sum + kk
    return vit.attend(last, a_bar.div_(vit.num_layers), v[:, :, 1:])


class RFCLIP(DenseMethod):
    name = "rfclip"

    def encode(self, x: Tensor) -> DenseOutput:
        vit, s = self.vit, self.settings
        dims, tau, min_recv = distraction_setup(s, self.arch, vit.width, x.device)
        tokens, grid = vit.embed(x)
        b, n = tokens.shape[0], tokens.shape[1] - 1
        kk_sum = None                                     # (B, H, N, N) float32, sum of patch-block kk attention
        for l, block in enumerate(vit.blocks[:-1], start=1):
            q, k, v = vit.qkv(block, tokens)
            kk = vit.softmax_attention(k, k)[:, :, 1:, 1:]
            kk_sum = kk.clone() if kk_sum is None else kk_sum.add_(kk)
            # The attention matrix is materialised only when it is needed: for the received-attention
            # condition (ViT-L/14) or to move mass; otherwise the fused kernel runs (plain block).
            attn = vit.softmax_attention(q, k) if min_recv is not None else None
            recv = refocus.received_attention(attn) if min_recv is not None else None
            dis = refocus.find_distractors(tokens[:, 1:], dims, tau, recv, min_recv)
            if s.distractor_attention and bool(dis.any()):
                attn = vit.softmax_attention(q, k) if attn is None else attn
                attn = refocus.redistribute_attention(attn, dis, self._receivers(kk_sum, l, dis, n), s.lam,
                                                      inplace=True)
            if attn is None:
                tokens = vit.plain_block(block, tokens, (q, k, v))
            else:
                tokens = vit.finish_block(block, tokens, vit.attend(block, attn, v))
            if s.embedding_redistribution:
                dis_out = refocus.find_distractors(tokens[:, 1:], dims, tau, recv, min_recv)
                if bool(dis_out.any()):
                    patches = refocus.neighbour_mean_channels(tokens[:, 1:], grid, dis_out, dims)
                    tokens = torch.cat([tokens[:, :1], patches], dim=1)
        out = kk_averaged_last_block(vit, kk_sum, tokens, consume_sum=True)
        return DenseOutput(vit.head(out).reshape(b, grid[0], grid[1], -1))

    def _receivers(self, kk_sum: Tensor, layers: int, dis: Tensor, n: int) -> Tensor:
        """Defocused tokens ``(B, N)`` bool; the cut runs only on crops that have distractors."""
        s = self.settings
        receivers = ~dis
        if not s.defocus_ncut or n < 3:
            return receivers
        idx = dis.any(dim=-1).nonzero().squeeze(-1)
        affinity = kk_sum.mean(dim=1).index_select(0, idx) / layers      # head-average first: (B', N, N)
        cut = refocus.defocused_tokens(affinity, dis.index_select(0, idx), s.ncut_solver, s.ncut_iters)
        return receivers.index_copy(0, idx, cut)
