"""RF-CLIP as the paper describes it (METHODS.md §3): refocus every block, then a kk-averaged last block.

Per block l < L, batched over crops: (a) distractors on the input stream; (b) defocused tokens from a
normalised cut of the layer-averaged kk attention; (c) attention moved from distractors to defocused
tokens; the block runs on; (d) the distractors' distraction channels smoothed on the output.
Last block (e): ``out_proj(A_bar v)`` with ``A_bar`` the mean over layers of each head's kk attention.
Crops without distractors in a layer skip (b) and (c) (the cut runs only on the crops that need it).
On GPUs only fused attention runs on ViT-B (``refocus.redistributed_attention_output`` and the
``fused`` plan of :class:`KKAttention`, or one Triton kernel for each, ``rfclip.kernels``, which
``attention_kernels="auto"`` picks for fp16/bf16 models on CUDA devices); on CPUs explicit attention
matrices are cheaper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels, refocus
from ..plans import resolve_attention_kernels, resolve_plan
from ..settings import DISTRACTION_DIMS, MIN_RECEIVED_ATTENTION, base_arch
from ..warn import warn
from .base import DenseMethod, DenseOutput
from .kk_attention import KKAttention

Tensor = torch.Tensor


def distraction_setup(method: DenseMethod, device) -> tuple[Tensor, float, float | None]:
    """``(dims, tau, min_received)`` for ``method``'s architecture, from its settings or the known tables.

    Cached on the method per device, so a forward pass makes no host-to-device copy (CUDA graphs)."""
    cache = method.__dict__.setdefault("_distraction_setup", {})
    key = str(device)
    if key not in cache:
        cache[key] = _distraction_setup(method.settings, method.arch, method.vit.width, device,
                                        getattr(method, "uses_received_attention", False))
    return cache[key]


def _distraction_setup(settings, arch: str, width: int, device, received: bool = True
                       ) -> tuple[Tensor, float, float | None]:
    dims = settings.distraction_dims
    if dims is None:
        dims = DISTRACTION_DIMS.get(base_arch(arch))
    if dims is None:
        raise ValueError(
            f"distraction dimensions are unknown for {arch}: pass distraction_dims=[...] (CLI: --setting "
            f"distraction_dims=[...]); find them with `python -m rfclip.find_distraction_dims --model M "
            f"--weights W --images DIR`, M and W being the --model and --weights used here")
    if max(dims) >= width or min(dims) < 0:
        raise ValueError(f"distraction_dims {list(dims)} out of range for width {width}")
    tau = settings.tau if settings.tau is not None else 5.0 / width
    if not received:                   # a method without the attention condition (rfclip-release)
        return torch.tensor(list(dims), dtype=torch.long, device=device), tau, None
    min_recv = settings.min_received_attention
    if min_recv is None:
        min_recv = MIN_RECEIVED_ATTENTION.get(base_arch(arch))
    if min_recv is not None and min_recv <= 0:
        min_recv = None
    return torch.tensor(list(dims), dtype=torch.long, device=device), tau, min_recv


def check_distraction_settings(method: DenseMethod) -> None:
    """Raise now, at construction, if ``method``'s distraction dimensions are unknown or out of range,
    rather than at the first forward pass."""
    _distraction_setup(method.settings, method.arch, method.vit.width, "cpu")


def plan_flags(settings, device: torch.device) -> tuple[bool, bool]:
    """``(fused, host_checks)`` for the plan: fused attention (``fused``, ``graphed``), and skipping
    steps by looking at masks on the host (all but ``graphed``, which must never synchronise; its
    masked steps are the identity where a mask is empty)."""
    plan = resolve_plan(settings, device)
    return plan != "explicit", plan != "graphed"


class RFCLIP(DenseMethod):
    name = "rfclip"
    uses_received_attention = True          # the distractor condition on received attention (§3a)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_distraction_settings(self)

    def encode(self, x: Tensor) -> DenseOutput:
        triton = resolve_attention_kernels(self.settings, x.device) == "triton"
        if not triton or self.settings.attention_kernels == "triton":
            return self._encode(x, triton)
        # "auto" chose the kernels: crops whose tiles this GPU cannot hold run on PyTorch's, and say so once
        # per tile size (None: more tokens than any tile takes). At most a handful of keys: powers of two.
        t = (x.shape[-2] // self.vit.patch) * (x.shape[-1] // self.vit.patch) + 1
        refused = self.__dict__.setdefault("_refused_tiles", {})          # tile -> what does not fit
        try:
            tile, error = kernels.row_tile(t), None
        except kernels.DoesNotFit as e:
            tile, error = None, e
        if error is None and tile not in refused:
            try:
                return self._encode(x, True)
            except kernels.DoesNotFit as e:
                error = e
        if tile not in refused:
            refused[tile] = (f"crops of more than {kernels.MAX_TOKENS} tokens do not fit the Triton kernels"
                             if tile is None else f"this GPU cannot hold the Triton kernels' tiles for {tile} keys "
                             f"(crops of {tile // 2 + 1 if tile > 16 else 1}-{tile} tokens)")
            warn(f"attention_kernels='auto': {error}. {refused[tile][0].upper() + refused[tile][1:]}: they run "
                 f"on PyTorch's kernels from now on.")
        return self._encode(x, False)

    def refused_tiles(self) -> dict:
        """``{tile: what does not fit}`` for the kernel tiles that ``attention_kernels="auto"`` found this GPU
        cannot hold (None: crops of more than ``kernels.MAX_TOKENS`` tokens); their crops ran on PyTorch's
        kernels. The texts depend on the tile only."""
        return dict(self.__dict__.get("_refused_tiles", {}))

    def _encode(self, x: Tensor, triton: bool) -> DenseOutput:
        vit, s = self.vit, self.settings
        dims, tau, min_recv = distraction_setup(self, x.device)
        fused, check = plan_flags(s, x.device)
        tokens, grid = vit.embed(x)
        b, n = tokens.shape[0], tokens.shape[1] - 1
        redistributed = kernels.redistributed_attention_output if triton else refocus.redistributed_attention_output
        kk = KKAttention(vit, fused, need_affinity=s.distractor_attention and s.defocus_ncut and n >= 3,
                         triton=triton)
        # With host checks and no received-attention condition, step (d)'s mask on a block's output also
        # gives the next block's step (a): see _smooth_output. Then ``dis`` and ``crops`` arrive from there.
        ahead = self.masks_ahead(x.device)
        dis = crops = None
        # The "warm" cut (the CPU default) starts each crop's cut from its Fiedler vector of the last block
        # that cut it: (B, N) float32, zero rows for crops not cut yet.
        warm = refocus.resolve_solver(s.ncut_solver, x.device) == "warm"
        fiedler = x.new_zeros(b, n, dtype=torch.float32) if warm and kk.need_affinity else None
        # The squaring cut multiplies in float16 for reduced-precision models on GPUs (tensor cores), in the
        # Triton kernels with ncut_kernels="triton" (fp16/bf16 models only; settings checks).
        cut_triton = s.ncut_kernels == "triton"
        products = torch.float16 if cut_triton else refocus.squaring_products(tokens.dtype, x.device)
        for i, block in enumerate(vit.blocks[:-1]):
            q, k, v = vit.qkv(block, tokens)
            kk.add(k)
            # The attention matrix is materialised for the received-attention condition (ViT-L/14), or
            # to move mass on the explicit plan; the fused plan moves it with four fused passes.
            attn = vit.softmax_attention(q, k) if min_recv is not None else None
            recv = refocus.received_attention(attn) if min_recv is not None else None
            if dis is None:
                dis = refocus.find_distractors(tokens[:, 1:], dims, tau, recv, min_recv)
                # With host checks, one sync finds the crops that have distractors, (B',) long.
                crops = dis.any(dim=-1).nonzero().squeeze(-1) if s.distractor_attention and check else None
            if s.distractor_attention and (crops is None or crops.numel() > 0):
                some = crops is not None and crops.numel() < b       # only some crops have distractors
                if some:                                             # the cut on those crops only
                    dc = dis.index_select(0, crops)
                    rc = self._receivers(kk, dc, crops, fiedler, products, cut_triton)
                if some and attn is None:
                    # Step (c) on the crops with distractors only, written over the block's fused
                    # attention of all crops. That attention is wasted on the crops with distractors,
                    # but it takes fewer launches and copies than gathering the other crops first.
                    qc, kc, vc = (t.index_select(0, crops) for t in (q, k, v))
                    heads = F.scaled_dot_product_attention(q, k, v)
                    heads.index_copy_(0, crops, self._refocused_heads(qc, kc, vc, None, dc, rc, fused, redistributed))
                else:
                    # Crops without distractors: any receivers do (nothing moves); ~dis is the cheapest.
                    receivers = ((~dis).index_copy(0, crops, rc) if some
                                 else self._receivers(kk, dis, None, fiedler, products, cut_triton))
                    heads = self._refocused_heads(q, k, v, attn, dis, receivers, fused, redistributed)
                tokens = vit.finish_block(block, tokens, vit.project(block, heads))
            elif attn is not None:
                tokens = vit.finish_block(block, tokens, vit.attend(block, attn, v))
            else:
                tokens = vit.plain_block(block, tokens, (q, k, v))
            dis, crops = self._smooth_output(tokens, grid, dims, tau, recv, min_recv, ahead and i < len(vit.blocks) - 2)
        out = kk.last_block(tokens)
        return DenseOutput(vit.head(out).reshape(b, grid[0], grid[1], -1))

    def masks_ahead(self, device) -> bool:
        """Whether step (d)'s mask on a block's output also gives the next block's step (a) mask (see
        :meth:`_smooth_output`): with host checks, steps (a)-(d) on, and no received-attention condition."""
        s = self.settings
        _, check = plan_flags(s, device)
        return (check and s.distractor_attention and s.embedding_redistribution
                and distraction_setup(self, device)[2] is None)

    def _smooth_output(self, tokens: Tensor, grid: tuple[int, int], dims: Tensor, tau: float,
                       recv: Tensor | None, min_recv: float | None, ahead: bool) -> tuple:
        """Step (d) on a block's output ``tokens`` ``(B, T, D)``, in place. Returns the next block's step (a)
        mask ``(B, N)`` bool and its crops ``(B',)`` long when known here (``ahead``), else ``(None, None)``.

        Without ``ahead`` it runs unchecked: on crops without distractors it writes back the same K
        channels, a few small kernels, cheaper than a sync on GPUs. With ``ahead`` one sync finds the crops
        that have distractors on the output. If none has, nothing is smoothed, and the mask is the next
        block's step (a) mask as it is (the same function of the same tokens). Otherwise the smoothed
        output's mask is taken again, and these crops stand for the next block's: its crops with
        distractors are among them, and steps (b) and (c) leave a crop without distractors as it is. So the
        next block needs no sync of its own."""
        s = self.settings
        if not s.embedding_redistribution:
            return None, None
        patches = tokens[:, 1:]
        dis_out = refocus.find_distractors(patches, dims, tau, recv, min_recv)
        crops = dis_out.any(dim=-1).nonzero().squeeze(-1) if ahead else None
        if crops is not None and crops.numel() == 0:
            return dis_out, crops
        refocus.neighbour_mean_channels(patches, grid, dis_out, dims, skip_if_empty=False, inplace=True)
        if crops is None:
            return None, None
        return refocus.find_distractors(patches, dims, tau), crops

    def _refocused_heads(self, q: Tensor, k: Tensor, v: Tensor, attn: Tensor | None, dis: Tensor,
                         receivers: Tensor, fused: bool, redistributed) -> Tensor:
        """Step (c): ``A' v`` per head, ``(B, H, T, dh)``, with ``A`` the block's attention (``attn``
        ``(B, H, T, T)`` if it was materialised), moved from ``dis`` to ``receivers`` (``(B, N)`` bool)."""
        if fused and attn is None:
            return redistributed(q, k, v, dis, receivers, self.settings.lam)
        attn = self.vit.softmax_attention(q, k) if attn is None else attn
        attn = refocus.redistribute_attention(attn, dis, receivers, self.settings.lam, inplace=True)
        return torch.matmul(attn.to(v.dtype), v)

    def _receivers(self, kk: KKAttention, dis: Tensor, crops: Tensor | None, fiedler: Tensor | None,
                   products: torch.dtype, triton: bool) -> Tensor:
        """Defocused tokens ``(B', N)`` bool of the crops ``crops`` ``(B',)`` long (None: all), whose
        distractors are ``dis`` ``(B', N)`` bool: the cut, or every non-distractor when it is off.

        ``fiedler`` ``(B, N)`` float32 (the ``"warm"`` cut; else None) holds each crop's last Fiedler vector:
        the cut starts from it and writes the new one back. ``products``: the dtype of the ``"squaring"``
        cut's matrix products (float16 for reduced-precision models on GPUs); ``triton``: that cut runs as
        the Triton kernels (:func:`rfclip.kernels.squaring_cut_half`), on the affinity summed over the
        blocks (a positive multiple of the mean, which cuts the same)."""
        s = self.settings
        if not kk.need_affinity:                          # the cut is off (or fewer than 3 patches)
            return ~dis
        if fiedler is None:
            return refocus.defocused_tokens(kk.affinity(crops, mean=not triton), dis, s.ncut_solver,
                                            s.ncut_iters, products=products, triton=triton)
        start = fiedler if crops is None else fiedler.index_select(0, crops)
        receivers, y = refocus.defocused_tokens(kk.affinity(crops), dis, "warm", s.ncut_iters, start=start,
                                                return_fiedler=True)
        if crops is None:
            fiedler.copy_(y)
        else:
            fiedler.index_copy_(0, crops, y)
        return receivers
