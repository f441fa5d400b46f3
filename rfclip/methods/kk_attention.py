"""The layer-averaged kk attention that RF-CLIP keeps across blocks (METHODS.md §3b and Eq. 14).

Each block l < L contributes ``K_l = softmax(k_l k_l^T / sqrt(dh))`` (over all T keys, CLS included),
of which the patch block is used. Two consumers need the running sum:

- the normalised cut (§3b): the head-mean of the patch block, averaged over the layers so far,
  ``(B', N, N)`` for the crops that have distractors;
- the last block (Eq. 14): ``out_proj(A_bar v)``, with ``A_bar`` the mean over all L layers of each
  head's patch block.

Two storage plans give the same numbers (tested), and differ only in cost:

- ``explicit``: keep the per-head sum ``(B, H, N, N)`` float32. Cheapest on CPUs.
- ``fused``: keep each layer's keys ``(B, H, T, dh)`` and only the ``(B, N, N)`` head-mean sum; apply
  ``A_bar v = (1/L) sum_l K_l v`` as L fused attention passes (``q = k = k_l``; a zero CLS value drops
  the CLS column without renormalising). No per-head ``(T, T)`` matrix is kept, which on GPUs, where
  these passes are memory-bound, is several times cheaper. With ``triton`` the head-mean of each
  block is one kernel (``rfclip.kernels.accumulate_kk_head_mean``) that adds into the running sum
  without writing the per-head softmax.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import kernels

Tensor = torch.Tensor


class KKAttention:
    """Running sum of the kk attention of blocks 1..L-1.

    Args:
        vit: the walked tower (``rfclip.vit.DenseViT``).
        fused: the storage plan (see the module docstring).
        need_affinity: whether :meth:`affinity` will be asked for (the cut is on).
        triton: on the fused plan, accumulate the affinity with the Triton kernel.
    """

    def __init__(self, vit, fused: bool, need_affinity: bool, triton: bool = False):
        self.vit, self.fused, self.need_affinity, self.triton = vit, fused, need_affinity, triton
        self.layers = 0
        self._keys: list[Tensor] = []               # fused: k_l, (B, H, T, dh) contiguous
        self._head_sum: Optional[Tensor] = None     # explicit: (B, H, N, N) float32
        self._mean_sum: Optional[Tensor] = None     # fused: (B, N, N) float32, sum of head means

    def add(self, k: Tensor) -> None:
        """Add the keys ``(B, H, T, dh)`` of the next block."""
        self.layers += 1
        if self.fused:
            self._keys.append(k.contiguous())
            if self.need_affinity and self.triton:
                if self._mean_sum is None:
                    b, _, t, _ = k.shape
                    self._mean_sum = torch.zeros(b, t - 1, t - 1, device=k.device, dtype=torch.float32)
                kernels.accumulate_kk_head_mean(self._keys[-1], self._mean_sum, self.vit.scale)
            elif self.need_affinity:
                kk = self.vit.mean_patch_self_attention(self._keys[-1])
                self._mean_sum = kk if self._mean_sum is None else self._mean_sum.add_(kk)
        else:
            kk = self.vit.softmax_attention(k, k)[:, :, 1:, 1:]
            self._head_sum = kk.clone() if self._head_sum is None else self._head_sum.add_(kk)

    def affinity(self, crops: Optional[Tensor] = None, mean: bool = True) -> Tensor:
        """Head-mean patch-block kk attention averaged over the blocks added so far, for ``crops``
        (``(B',)`` long indices; None: all): ``(B', N, N)`` float32. ``mean=False``: summed over the blocks
        instead (a positive multiple, which cuts the same; it saves a pass over the matrices, and is the
        running sum itself, not a copy, when no crops are selected on the fused plan)."""
        total = self._mean_sum if self.fused else self._head_sum
        # The head mean reads all of (B, H, N, N): taken after the selection when it keeps at most half of the
        # crops, before it otherwise (then only the (B', N, N) means are copied).
        if crops is not None and (self.fused or 2 * crops.numel() <= total.shape[0]):
            total = total.index_select(0, crops)
            crops = None
        if not self.fused:
            total = total.mean(dim=1)
        if crops is not None:
            total = total.index_select(0, crops)
        return total / self.layers if mean else total

    def last_block(self, tokens: Tensor) -> Tensor:
        """Eq. 14 on ``tokens`` ``(B, T, D)`` (all L-1 blocks added): ``out_proj(A_bar v)``, ``(B, N, D)``.
        No residual, no FFN. Can be called more than once (on different tokens)."""
        vit = self.vit
        last = vit.blocks[-1]
        k, v = vit.keys_values(last, tokens)
        if not self.fused:
            # (sum_l K_l) (v / L): the 1/L scales the (T, dh) values, not the (N, N) sum.
            kk_sum = self._head_sum + vit.softmax_attention(k, k)[:, :, 1:, 1:]
            return vit.attend(last, kk_sum, v[:, :, 1:] / vit.num_layers)
        v = torch.cat([torch.zeros_like(v[:, :, :1]), v[:, :, 1:]], dim=2)
        total = None                                    # (B, H, T, dh) float32; the CLS row is dropped at the end
        for kl in (*self._keys, k):
            out = F.scaled_dot_product_attention(kl, kl, v)
            # Whole outputs, in the layout the attention kernel wrote: an add of two tensors with the same
            # strides is one vectorised pass. Adding the sliced (strided) outputs ran PyTorch's generic
            # elementwise kernel, ~90 us per add at 128 crops on an H100 (bench/PERFORMANCE.md).
            total = out.float() if total is None else total.add_(out)
        return vit.project(last, (total[:, :, 1:] / vit.num_layers).to(v.dtype))
