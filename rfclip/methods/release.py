"""RF-CLIP as the authors' released code does it (METHODS.md §4), method ``rfclip-release``.

Image side: every block plain; after each block the distractors are mean-filtered
(``refocus.release_mean_filter``); ``z_bar`` is the mean of the L block outputs; feature enhancing by
thresholded cosine similarity; two branches through a kk-averaged last block, averaged.
Text side (from CASS): per crop and per cluster of similar queries, the query that best matches the
whole image moves toward (the unit mean of) its two best-matching patches, and the patch logits are
blended with the whole image's similarity: ``(1 - w) * patch + w * global``. The whole image's
embedding is the CLS of this method's own (filtered) forward pass on the whole image.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import refocus
from .base import DenseMethod, DenseOutput
from .kk_attention import KKAttention
from .rfclip import check_distraction_settings, distraction_setup, plan_flags

Tensor = torch.Tensor


def query_clusters(text: Tensor, threshold: float) -> Tensor:
    """Complete-linkage clusters of unit queries ``(Q, E)`` on cosine distance, cut at ``threshold``.

    Returns ``(Q,)`` long cluster ids in ``[0, C)``.
    """
    q = text.shape[0]
    if q == 1:
        return torch.zeros(1, dtype=torch.long, device=text.device)
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    emb = text.detach().float().cpu().numpy()
    dist = np.clip(pdist(emb, metric="cosine"), 0.0, None)
    ids = fcluster(linkage(dist, method="complete"), t=threshold, criterion="distance") - 1
    return torch.as_tensor(ids, dtype=torch.long, device=text.device)


class RFCLIPRelease(DenseMethod):
    name = "rfclip-release"
    needs_global_embedding = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_distraction_settings(self)
        self._clusters: Optional[tuple[Tensor, Tensor]] = None   # (text it was computed for, ids)

    def encode(self, x: Tensor) -> DenseOutput:
        vit, s = self.vit, self.settings
        dims, tau, _ = distraction_setup(self, x.device)
        tokens, grid = vit.embed(x)
        b = tokens.shape[0]
        fused, check = plan_flags(s, x.device)
        kk = KKAttention(vit, fused, need_affinity=False)
        out_sum = torch.zeros_like(tokens, dtype=torch.float32)
        before_last = tokens
        for l, block in enumerate(vit.blocks):
            q, k, v = vit.qkv(block, tokens)
            if l < vit.num_layers - 1:
                kk.add(k)
            tokens = vit.plain_block(block, tokens, (q, k, v))
            patches = tokens[:, 1:]
            mask = refocus.find_distractors(patches, dims, tau)
            filtered = refocus.release_mean_filter(patches, grid, mask, s.release_keep, check)
            if filtered is not patches:
                tokens = torch.cat([tokens[:, :1], filtered], dim=1)
            out_sum.add_(tokens)
            if l == vit.num_layers - 2:
                before_last = tokens
        cls = vit.head(tokens[:, 0])
        z_bar = (out_sum / vit.num_layers).to(tokens.dtype)
        zp = F.normalize(z_bar[:, 1:].float(), dim=-1)
        sim = zp @ zp.transpose(1, 2)
        sim = torch.where(sim < s.release_sim_threshold, torch.zeros_like(sim), sim).to(tokens.dtype)
        branch_a = torch.cat([before_last[:, :1], sim @ before_last[:, 1:]], dim=1)
        branch_b = torch.cat([z_bar[:, :1], sim @ z_bar[:, 1:]], dim=1)
        out_a = kk.last_block(branch_a)
        out_b = kk.last_block(branch_b)
        dense = vit.head(0.5 * (out_a + out_b))
        return DenseOutput(dense.reshape(b, grid[0], grid[1], -1), cls)

    def _cluster_ids(self, text: Tensor) -> Tensor:
        if self._clusters is None or self._clusters[0] is not text:
            self._clusters = (text, query_clusters(text, self.settings.h_threshold))
        return self._clusters[1]

    def crop_logits(self, features: Tensor, text: Tensor, global_emb: Optional[Tensor] = None) -> Tensor:
        """Cosine logits with the CASS extras; ``global_emb`` ``(B, E)`` unit (whole image or crop CLS)."""
        s = self.settings
        logits = super().crop_logits(features, text)                     # (B, Q, h, w)
        if global_emb is None:
            return logits
        b, q, h, w = logits.shape
        gsim = global_emb.float() @ text.float().T                        # (B, Q)
        if s.mean_vector_weight > 0:
            flat = features.reshape(b, h * w, -1).float()
            top2 = logits.reshape(b, q, h * w).topk(min(2, h * w), dim=-1).indices      # (B, Q, 2)
            picked_feats = torch.gather(flat[:, None].expand(b, q, h * w, flat.shape[-1]), 2,
                                        top2[..., None].expand(*top2.shape, flat.shape[-1]))
            target = picked_feats.mean(dim=2)       # (B, Q, E): the raw mean of two unit features (§4)
            moved = F.normalize((1 - s.mean_vector_weight) * text.float()[None]
                                + s.mean_vector_weight * target, dim=-1)
            adjusted = torch.einsum("bne,bqe->bqn", flat, moved).reshape(b, q, h, w)
            ids = self._cluster_ids(text)
            member = F.one_hot(ids).T.bool()                              # (C, Q)
            scores = gsim[:, None, :].masked_fill(~member[None], float("-inf"))   # (B, C, Q)
            picked = torch.zeros(b, q, dtype=torch.bool, device=logits.device)
            picked.scatter_(1, scores.argmax(dim=-1), True)
            logits = torch.where(picked[:, :, None, None], adjusted.to(logits.dtype), logits)
        w = s.global_semantics_weight
        return (1 - w) * logits + w * gsim[:, :, None, None].to(logits.dtype)
