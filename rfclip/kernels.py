"""Triton kernels for RF-CLIP's two per-block attention steps (``Settings.attention_kernels="triton"``).

On the ``fused`` plan each block l < L of RF-CLIP spends, beside the plain block:

- the cut's affinity: the head-mean of ``softmax(k k^T / sqrt(dh))``, which PyTorch computes by writing
  and re-reading ``B * H * T^2`` logits and probabilities (:meth:`rfclip.vit.DenseViT.mean_patch_self_attention`);
- step (c): four fused attention passes (:func:`rfclip.refocus.redistributed_attention_output`).

At ViT crop sizes a whole attention row fits on chip (T = 197 keys at 224 px for ViT-B/16), so each
step is one kernel here: a program holds ``BLOCK_M`` query rows against all T keys, takes the softmax
in float32, and writes only what the step needs: the ``(N, N)`` head-mean added to the running sum,
or the redistributed ``A' v``. Rows of at most :data:`MAX_TOKENS` keys.

With ``Settings.ncut_kernels="triton"`` the cut's float16 ``"squaring"`` power iteration is Triton's
too (:func:`squaring_cut_half`): one kernel builds the deflated operator from the raw affinity, one per
squaring multiplies tiles and scales the product from the sums of squares that the kernel before wrote.

The numbers match the PyTorch steps (tested; float32 within 1e-5; the cut to float16 rounding). On
CPU tensors the kernels run in Triton's interpreter, which is how the test suite checks them without a
GPU; it is slow and meant for tests only (the settings refuse CPUs unless ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:                      # triton ships with CUDA builds of torch on Linux only
    triton = tl = OutOfResources = None

Tensor = torch.Tensor

MAX_TOKENS = 1024
_LOG2E = 1.4426950408889634


class DoesNotFit(ValueError):
    """The kernels cannot hold these crops: more than :data:`MAX_TOKENS` tokens, or tiles larger than
    this GPU's shared memory. ``attention_kernels="auto"`` then runs PyTorch's kernels instead."""


def available() -> bool:
    """Whether Triton can be imported, in a version that runs these kernels (3.0 or later: ``tl.dot``'s
    ``input_precision``)."""
    return triton is not None and int(triton.__version__.split(".")[0]) >= 3


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


def row_tile(t: int) -> int:
    """``BLOCK_T``, the keys one program holds, for crops of ``t`` tokens: the power of two >= ``t`` (at
    least 16). The kernels' launch shapes, and so whether a GPU can hold them, depend on ``t`` only
    through it (and the head size, fixed per model). Raises :class:`DoesNotFit` over :data:`MAX_TOKENS`."""
    if triton is None:
        raise RuntimeError("attention_kernels='triton' needs the triton package (it comes with torch's "
                           "CUDA builds on Linux); use attention_kernels='torch'")
    if t > MAX_TOKENS:
        raise DoesNotFit(f"the Triton kernels hold whole attention rows and take at most {MAX_TOKENS} tokens, "
                         f"got {t} (smaller crops, or attention_kernels='torch')")
    return max(16, triton.next_power_of_2(t))


def _tiles(t: int, dh: int) -> tuple[int, int]:
    """``(BLOCK_T, BLOCK_D)`` for ``t`` tokens of head size ``dh`` (powers of two, at least 16)."""
    return row_tile(t), max(16, triton.next_power_of_2(dh))


# ---- kernel bodies (plain functions, made kernels on first use by _jit) ---------------------------
def _kk_head_mean_body(K, OUT, T, H, scale, inv_heads,
                       s_kb, s_kh, s_kt, s_kd, s_ob, s_or, s_oc,
                       DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # Program (row block, crop): OUT[b, i-1, j-1] += mean_h softmax_j(k_hi . k_hj * scale), i, j >= 1.
    b = tl.program_id(1)
    rows = 1 + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)        # patch query tokens
    cols = tl.arange(0, BLOCK_T)                                         # key tokens, CLS included
    ch = tl.arange(0, BLOCK_D)
    row_ok, col_ok, ch_ok = rows < T, cols < T, ch < DH
    acc = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
    for h in range(H):
        base = K + b * s_kb + h * s_kh
        q = tl.load(base + rows[:, None] * s_kt + ch[None, :] * s_kd, mask=row_ok[:, None] & ch_ok[None, :], other=0.0)
        k = tl.load(base + cols[:, None] * s_kt + ch[None, :] * s_kd, mask=col_ok[:, None] & ch_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale     # log2 units
        s = tl.where(col_ok[None, :], s, float("-inf"))
        p = tl.exp2(s - tl.max(s, axis=1)[:, None])
        acc += p * (1.0 / tl.sum(p, axis=1))[:, None]
    ptr = OUT + b * s_ob + (rows - 1)[:, None] * s_or + (cols - 1)[None, :] * s_oc
    keep = row_ok[:, None] & (col_ok & (cols >= 1))[None, :]
    tl.store(ptr, tl.load(ptr, mask=keep, other=0.0) + acc * inv_heads, mask=keep)


def _redistributed_body(Q, K, V, DIS, DFC, O, T, H, scale, lam,
                        s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
                        s_ob, s_oh, s_ot, s_od, s_mb, s_mn,
                        DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # Program (row block, crop * head): O = A' V with A' the redistributed softmax(q k^T * scale).
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)            # query tokens, CLS included
    cols = tl.arange(0, BLOCK_T)
    ch = tl.arange(0, BLOCK_D)
    row_ok, col_ok, ch_ok = rows < T, cols < T, ch < DH
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qt + ch[None, :] * s_qd,
                mask=row_ok[:, None] & ch_ok[None, :], other=0.0)
    k = tl.load(K + b * s_kb + h * s_kh + cols[:, None] * s_kt + ch[None, :] * s_kd,
                mask=col_ok[:, None] & ch_ok[None, :], other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + cols[:, None] * s_vt + ch[None, :] * s_vd,
                mask=col_ok[:, None] & ch_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    s = tl.where(col_ok[None, :], s, float("-inf"))
    p = tl.exp2(s - tl.max(s, axis=1)[:, None])
    p = p * (1.0 / tl.sum(p, axis=1))[:, None]
    # Column indicators over the patch keys (the CLS key, column 0, is neither).
    patch = col_ok & (cols >= 1)
    dis = tl.load(DIS + b * s_mb + (cols - 1) * s_mn, mask=patch, other=0).to(tl.float32)
    dfc = tl.load(DFC + b * s_mb + (cols - 1) * s_mn, mask=patch, other=0).to(tl.float32)
    on_dis = tl.sum(p * dis[None, :], axis=1)
    on_dfc = tl.sum(p * dfc[None, :], axis=1)
    movable = (on_dfc > 0) & (rows >= 1)                                 # the CLS row is untouched
    cut = tl.where(movable, lam, 0.0)
    gain = tl.where(movable, lam * on_dis / tl.where(movable, on_dfc, 1.0), 0.0)
    p = p * (1.0 - cut[:, None] * dis[None, :] + gain[:, None] * dfc[None, :])
    out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_ot + ch[None, :] * s_od, out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & ch_ok[None, :])


def _deflated_half_body(A, R, U, S, NORM, N, s_ab, s_ar, s_ac, s_sb, s_sr, s_sc, s_rb, s_nb,
                        BLOCK: tl.constexpr):
    # Program (row block, column block, graph): the squaring cut's operator in float16,
    # S = (D^-1/2 (A + A^T) D^-1/2 + I) / 2 - u u^T, and the tile's sum of squares (a partial of |S|_F^2).
    b = tl.program_id(2).to(tl.int64)                 # int64 offsets: B N^2 may pass 2^31
    pi, pj = tl.program_id(0), tl.program_id(1)
    rows = pi * BLOCK + tl.arange(0, BLOCK)
    cols = pj * BLOCK + tl.arange(0, BLOCK)
    row_ok, col_ok = rows < N, cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    a = tl.load(A + b * s_ab + rows[:, None] * s_ar + cols[None, :] * s_ac, mask=ok, other=0.0)
    at = tl.load(A + b * s_ab + cols[None, :] * s_ar + rows[:, None] * s_ac, mask=ok, other=0.0)   # A^T's tile
    r_i = tl.load(R + b * s_rb + rows, mask=row_ok, other=0.0)
    r_j = tl.load(R + b * s_rb + cols, mask=col_ok, other=0.0)
    u_i = tl.load(U + b * s_rb + rows, mask=row_ok, other=0.0)
    u_j = tl.load(U + b * s_rb + cols, mask=col_ok, other=0.0)
    diag = rows[:, None] == cols[None, :]
    s = 0.5 * (a + at) * r_i[:, None] * r_j[None, :] - u_i[:, None] * u_j[None, :] + tl.where(diag & ok, 0.5, 0.0)
    s = s.to(tl.float16)
    tl.store(S + b * s_sb + rows[:, None] * s_sr + cols[None, :] * s_sc, s, mask=ok)
    f = s.to(tl.float32)
    tl.store(NORM + b * s_nb + pi * tl.num_programs(1) + pj, tl.sum(tl.sum(f * f, axis=1), axis=0))


def _square_half_body(S, OUT, NORM_IN, NORM_OUT, START, Z, N, target,
                      s_sb, s_sr, s_sc, s_ob, s_or, s_oc, s_nb, s_zb, s_zp,
                      TILES: tl.constexpr, LAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program (row block, column block, graph): one squaring of the symmetric S, scaled to trace `target`:
    # trace(S S) = |S|_F^2, the sum of the step before's per-tile partials. Not LAST: the product to OUT in
    # float16 and its tile's sum of squares. LAST: the product times START, partial over this column block.
    b = tl.program_id(2).to(tl.int64)                 # int64 offsets: B N^2 may pass 2^31
    pi, pj = tl.program_id(0), tl.program_id(1)
    grid = tl.num_programs(1)
    tiles = tl.arange(0, TILES)
    norm = tl.sum(tl.load(NORM_IN + b * s_nb + tiles, mask=tiles < grid * grid, other=0.0), axis=0)
    scale = target / tl.maximum(norm, 1e-30)
    rows = pi * BLOCK + tl.arange(0, BLOCK)
    cols = pj * BLOCK + tl.arange(0, BLOCK)
    row_ok, col_ok = rows < N, cols < N
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < N
        x = tl.load(S + b * s_sb + rows[:, None] * s_sr + ks[None, :] * s_sc, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        y = tl.load(S + b * s_sb + ks[:, None] * s_sr + cols[None, :] * s_sc, mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = tl.dot(x, y, acc)
    acc = acc * scale
    if LAST:
        v = tl.load(START + cols, mask=col_ok, other=0.0)
        tl.store(Z + b * s_zb + pj * s_zp + rows, tl.sum(acc * v[None, :], axis=1), mask=row_ok)
    else:
        p = acc.to(tl.float16)
        tl.store(OUT + b * s_ob + rows[:, None] * s_or + cols[None, :] * s_oc, p, mask=row_ok[:, None] & col_ok[None, :])
        f = p.to(tl.float32)
        tl.store(NORM_OUT + b * s_nb + pi * grid + pj, tl.sum(tl.sum(f * f, axis=1), axis=0))


@dataclass
class Launch:
    """One kernel launch: ``body[grid](*args, **constexprs, num_warps=..., num_stages=...)``.

    Block sizes and warps: at T = 197 (ViT-B/16 at 224 px) the fastest of a sweep on an H100 in bf16 at
    32 and 128 crops (bench/PERFORMANCE.md); at T = 257 and 577, chosen by compiling for sm_90 without a
    GPU (``bench/kernel_resources.py``) as the largest row block that neither spills registers nor
    outgrows shared memory.
    """
    body: Callable
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: Optional[int] = None       # None: Triton's default


def kk_head_mean_launch(k: Tensor, out: Tensor, scale: float) -> Launch:
    """The launch of :func:`accumulate_kk_head_mean` (arguments as there)."""
    b, h, t, dh = k.shape
    if out.shape != (b, t - 1, t - 1) or out.dtype != torch.float32:
        raise ValueError(f"out must be ({b}, {t - 1}, {t - 1}) float32, got {tuple(out.shape)} {out.dtype}")
    block_t, block_d = _tiles(t, dh)
    block_m = 32 if block_t <= 256 else 16
    return Launch(_kk_head_mean_body, (triton.cdiv(t - 1, block_m), b),
                  (k, out, t, h, scale * _LOG2E, 1.0 / h, *k.stride(), *out.stride()),
                  dict(DH=dh, BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_D=block_d, PRECISION=_precision(k.dtype)),
                  num_warps=4 if block_t <= 256 else 8,
                  # pipelining the head loop (prefetching the next head's keys) outgrows shared memory above 256
                  num_stages=None if block_t <= 256 else 1)


def redistributed_launch(q: Tensor, k: Tensor, v: Tensor, dis: Tensor, dfc: Tensor, out: Tensor, lam: float,
                         scale: float) -> Launch:
    """The launch of :func:`redistributed_attention_output`; ``dis``, ``dfc`` ``(B, N)`` uint8, ``out`` like ``v``."""
    b, h, t, dh = q.shape
    block_t, block_d = _tiles(t, dh)
    block_m = 64 if block_t <= 256 else 32 if block_t <= 512 else 16
    return Launch(_redistributed_body, (triton.cdiv(t, block_m), b * h),
                  (q, k, v, dis, dfc, out, t, h, scale * _LOG2E, float(lam),
                   *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dis.stride()),
                  dict(DH=dh, BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_D=block_d, PRECISION=_precision(v.dtype)),
                  num_warps=4 if block_t <= 256 else 8)


def cut_tiles(n: int) -> tuple[int, int, int]:
    """``(BLOCK, BLOCK_K, num_warps)`` of the squaring cut's kernels for ``n`` patches: output tiles of
    ``BLOCK x BLOCK``, products taken ``BLOCK_K`` columns at a time."""
    return 64, 32, 4


def squaring_launches(affinity: Tensor, r: Tensor, u: Tensor, start: Tensor, squarings: int, trace: float,
                      tiles: Optional[tuple[int, int, int]] = None) -> tuple[list[Launch], Tensor]:
    """The launches of :func:`squaring_cut_half` and the ``(B, P, N)`` float32 buffer of their result (P
    column blocks; the result is its sum over P). Arguments as there; ``r``, ``u`` ``(B, N)`` contiguous."""
    b, n, _ = affinity.shape
    block, block_k, warps = tiles or cut_tiles(n)
    parts = triton.cdiv(n, block)
    grid = (parts, parts, b)
    dev = affinity.device
    ping = [torch.empty(b, n, n, device=dev, dtype=torch.float16) for _ in range(min(2, squarings))]
    norms = torch.empty(squarings, b, parts * parts, device=dev, dtype=torch.float32)   # per-tile |S|_F^2
    z = torch.empty(b, parts, n, device=dev, dtype=torch.float32)
    launches = [Launch(_deflated_half_body, grid,
                       (affinity, r, u, ping[0], norms[0], n, *affinity.stride(), *ping[0].stride(), r.stride(0),
                        norms.stride(1)), dict(BLOCK=block), num_warps=warps)]
    for i in range(squarings):
        last = i == squarings - 1
        src, dst = ping[i % 2], ping[(i + 1) % 2] if not last else ping[i % 2]    # the last stores no product
        norm_out = norms[i + 1] if not last else norms[i]                           # nor norms
        launches.append(Launch(_square_half_body, grid,
                               (src, dst, norms[i], norm_out, start, z, n, float(trace), *src.stride(),
                                *dst.stride(), norms.stride(1), z.stride(0), z.stride(1)),
                               dict(TILES=max(2, triton.next_power_of_2(parts * parts)), LAST=last, BLOCK=block,
                                    BLOCK_K=block_k), num_warps=warps))
    return launches, z


def squaring_cut_half(affinity: Tensor, squarings: int, start: Tensor, trace: float,
                      tiles: Optional[tuple[int, int, int]] = None) -> Tensor:
    """The ``"squaring"`` cut's power iteration in float16, as :func:`rfclip.refocus.fiedler_vector` runs
    it with float16 products, in ``squarings + 1`` kernels from the raw affinity: one kernel symmetrises,
    normalises and deflates, and each squaring takes its scale from the sums of squares that the kernel
    before wrote (``trace(S S) = |S|_F^2`` for a symmetric ``S``), so PyTorch makes no pass over the
    ``(N, N)`` matrices but the affinity's row and column sums.

    Each product (float16 tiles, float32 sums) is scaled to trace ``trace``, as PyTorch's float16 path
    divides it: its eigenvalues lie in ``[0, trace]``, its entries below ``trace``. The last squaring
    multiplies its product by ``start`` instead of storing it.

    Args:
        affinity: ``(B, N, N)`` float32, non-negative, any strides; need not be symmetric (``A + A^T`` is
            taken) nor averaged (a positive multiple cuts the same).
        squarings: p >= 1: ``S^(2^p)`` is applied to ``start``.
        start: ``(N,)`` float32 contiguous, the power iteration's start vector.
        trace: each product's trace (``rfclip.refocus._HALF_TRACE``).
        tiles: ``(BLOCK, BLOCK_K, num_warps)``; None: :func:`cut_tiles`'s (for benchmarks).
    Returns:
        ``y = D^-1/2 S^(2^p) start``, ``(B, N)`` float32, up to a positive factor.
    """
    if squarings < 1:
        raise ValueError(f"squarings must be at least 1, got {squarings}")
    a = affinity.float()
    d = (a.sum(-1) + a.sum(-2)).clamp_min(1e-12)
    r = d.rsqrt()
    u = torch.nn.functional.normalize(d.sqrt(), dim=-1)
    launches, z = squaring_launches(a, r, u, start, squarings, trace, tiles)
    for launch in launches:
        _run(launch, a.device)
    return z.sum(1) * r


def _run(launch: Launch, device: torch.device) -> None:
    if device.type == "cpu" and not interpreted():
        raise RuntimeError("the Triton kernels run on CUDA devices; CPU tensors only in Triton's interpreter "
                           "(TRITON_INTERPRET=1 set before triton is imported; for tests)")
    options = {"num_warps": launch.num_warps}
    if launch.num_stages is not None:
        options["num_stages"] = launch.num_stages
    try:
        _jit(launch.body)[launch.grid](*launch.args, **launch.constexprs, **options)
    except OutOfResources as e:
        if "BLOCK_T" not in launch.constexprs:        # the cut's kernels: not a matter of crop size
            raise RuntimeError(f"this GPU cannot hold the Triton cut's tiles ({e}); use ncut_kernels='torch'") from e
        raise DoesNotFit(f"this GPU cannot hold the Triton kernel's tiles for {launch.constexprs['BLOCK_T']} "
                         f"keys ({e}); use attention_kernels='torch', or smaller crops") from e


@functools.lru_cache(maxsize=None)
def _jit(body):
    # Compiled (or, with TRITON_INTERPRET=1, interpreted) on first use. Triton reads that switch when it is
    # imported, because its own library functions are decorated then; setting it later has no effect.
    return triton.jit(body)


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs: exact products (not TF32), so the float32 path matches PyTorch to 1e-5.
    return "ieee" if dtype == torch.float32 else "tf32"


def accumulate_kk_head_mean(k: Tensor, out: Tensor, scale: float) -> Tensor:
    """``out += mean_h softmax(k_h k_h^T * scale)[1:, 1:]`` in place (the cut's affinity, one block).

    Args:
        k: ``(B, H, T, dh)`` keys, any strides, float32/float16/bfloat16; CLS at token 0.
        out: ``(B, N, N)`` float32 running sum, N = T - 1.
        scale: the attention scale, ``dh ** -0.5``.
    Returns:
        ``out``.
    """
    _run(kk_head_mean_launch(k, out, scale), k.device)
    return out


def redistributed_attention_output(q: Tensor, k: Tensor, v: Tensor, distractors: Tensor, defocused: Tensor,
                                   lam: float, scale: Optional[float] = None) -> Tensor:
    """Step (c) in one kernel: the same result as :func:`rfclip.refocus.redistributed_attention_output`.

    Args:
        q, k, v: ``(B, H, T, dh)``, any strides, one dtype; CLS at token 0.
        distractors, defocused: ``(B, N)`` bool over the patches, disjoint.
        lam: fraction moved, in [0, 1].
        scale: attention scale; None means ``dh ** -0.5``.
    Returns:
        ``(B, H, T, dh)`` contiguous, in ``v``'s dtype; the CLS row is plain attention.
    """
    out = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    dis, dfc = (m.to(torch.uint8).contiguous() for m in (distractors, defocused))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    _run(redistributed_launch(q, k, v, dis, dfc, out, lam, scale), q.device)
    return out
