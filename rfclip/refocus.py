"""The refocusing math of RF-CLIP (METHODS.md §3 a-d, §4), as pure batched tensor functions.

Shapes: B crops, H heads, N patch tokens on an ``(h, w)`` grid (row-major), T = N + 1 tokens with
CLS at index 0, D channels. Masks are ``bool``. Every function works on a whole batch at once and
is the identity on crops without distractors.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import kernels

Tensor = torch.Tensor


def distraction_scores(x: Tensor, dims: Tensor) -> Tensor:
    """Eq. 6, min-shifted: ``phi_i = max_{j in dims} f~_i[j] / max(sum_k f~_i[k], 1e-8)``.

    Args:
        x: ``(B, N, D)`` patch tokens of the residual stream (any float dtype).
        dims: ``(K,)`` long, the distraction channels.
    Returns:
        ``(B, N)`` float32 scores in [0, 1].
    """
    # Reductions only (no shifted (B, N, D) copy): sum_k (f_k - min) = sum_k f_k - D * min.
    low = x.amin(dim=-1).float()
    total = torch.sub(x.sum(dim=-1, dtype=torch.float32), low, alpha=x.shape[-1])
    top = x.index_select(-1, dims).amax(dim=-1).float() - low
    return top / total.clamp_min(1e-8)


def received_attention(attn: Tensor) -> Tensor:
    """Mean attention each patch receives from the patch queries, head-averaged.

    Args:
        attn: ``(B, H, T, T)`` softmax attention over all tokens.
    Returns:
        ``(B, N)`` float32: ``(1/N) sum_i mean_h attn[h, i, j]`` over patch rows i.
    """
    return attn[:, :, 1:, 1:].float().mean(dim=(1, 2))


def find_distractors(x: Tensor, dims: Tensor, tau: float, received: Tensor | None = None,
                     min_received: float | None = None) -> Tensor:
    """Distractor tokens ``{i : phi_i > tau}`` (§3a).

    With ``min_received`` (the ViT-L/14 condition) a distractor must also receive a mean attention
    above it: ``received`` is ``(B, N)``, from :func:`received_attention`. Returns ``(B, N)`` bool.
    """
    mask = distraction_scores(x, dims) > tau
    if min_received is not None:
        if received is None:
            raise ValueError("min_received needs the received attention")
        mask &= received > min_received
    return mask


def resolve_solver(solver: str, device) -> str:
    """The cut solver that ``solver`` names on ``device``: ``"auto"`` is ``"warm"`` on CPUs and ``"squaring"``
    elsewhere; other names stay as they are."""
    if solver == "auto":
        return "warm" if torch.device(device).type == "cpu" else "squaring"
    return solver


# Default steps of the iterative solvers (``iters=None``). [decision] Subspace iteration: 30. Squaring: 2048
# power steps, i.e. 11 squarings. On the planted benchmark graphs, with eigenvalue ratios (1+l3)/(1+l2) of
# 0.93-0.996, 5 squarings (the default before) cut all 264 graphs differently from eigh, 8 squarings 57,
# and 11 none (bench/PERFORMANCE.md: ``bench/cut_fidelity.py``).
SUBSPACE_STEPS = 30
SQUARING_STEPS = 2048
# Squarings in float16 keep the deflated operator's trace at this value: its eigenvalues then lie in
# [0, 128], a product's entries below 128^2 (float16 overflows at 65504), and the top eigenvalue at
# 128/N or more, so the entries that matter stay in float16's normal range for N up to about 1000.
_HALF_TRACE = 128.0
_HALF_TINY = 2.0 ** -14          # float16's smallest normal number: a floor for its divisors


def squaring_products(dtype: torch.dtype, device) -> torch.dtype:
    """The dtype of the ``"squaring"`` cut's products for a model of ``dtype`` on ``device``: float16 for fp16
    and bf16 models on CUDA devices (tensor cores), float32 otherwise (CPUs have no fast float16 products:
    357 ms against 9 ms per batch of 8 graphs of N = 196 here)."""
    reduced = dtype in (torch.float16, torch.bfloat16)
    return torch.float16 if reduced and torch.device(device).type == "cuda" else torch.float32


def squaring_count(iters: int) -> int:
    """The squarings of the ``"squaring"`` cut for ``iters`` power steps: ``ceil(log2(iters))``, at least 1."""
    return max(1, math.ceil(math.log2(max(iters, 2))))


def fiedler_vector(affinity: Tensor, solver: str = "auto", iters: int | None = None, block: int = 6,
                   start: Tensor | None = None, products: torch.dtype = torch.float32) -> Tensor:
    """Fiedler vector ``y = D^-1/2 z`` of a symmetric affinity (§3b, Eqs. 7-8).

    ``z`` is the eigenvector of the second-smallest eigenvalue of ``D^-1/2 (D - W) D^-1/2``, i.e. of
    the second-largest of ``M = D^-1/2 W D^-1/2``.

    Args:
        affinity: ``(B, N, N)`` symmetric, non-negative, float32.
        solver: ``"auto"`` (``"warm"`` on CPU, ``"squaring"`` elsewhere); ``"eigh"`` (exact, batched
            ``torch.linalg.eigh``); ``"warm"`` (``"eigh"``, except for the graphs with a ``start``: there
            shifted inverse iteration from it, exact to a residual of 1e-5, see :func:`_refine_second_eigvec`,
            and ``eigh`` where that does not converge); ``"subspace"`` (block power
            iteration on ``M + I`` deflated against its known top eigenvector ``D^1/2 1``, then a
            Rayleigh-Ritz step on ``block`` vectors: ``iters`` batched matmuls of ``(N, N) x (N, block)``
            and as many small QRs); ``"squaring"`` (the same power iteration, single vector, taken as
            ``ceil(log2(iters))`` squarings of the deflated ``(N, N)`` operator: a few large batched
            matmuls and no factorisation, which suits GPUs, where batched ``eigh`` and ``qr`` of
            196 x 196 matrices run one matrix at a time).
        iters: power steps of ``"subspace"`` and ``"squaring"``; None: ``SUBSPACE_STEPS`` (30) and
            ``SQUARING_STEPS`` (2048: 11 squarings).
        start: ``(B, N)``, for ``"warm"``: a Fiedler vector of a nearby graph (the previous block's, with
            the layer-averaged affinity), or a zero row for a graph that has none.
        products: dtype of ``"squaring"``'s matrix products: float32, or float16 (tensor cores on GPUs;
            RF-CLIP uses it for fp16 and bf16 models on CUDA, whose affinities carry larger rounding
            errors; see :func:`squaring_products`). Float32 products run in TF32 where a user has
            allowed it (``torch.backends.cuda.matmul.allow_tf32``), about as precise as float16.
    Returns:
        ``(B, N)`` float32; its sign is arbitrary, and with ``"squaring"`` so is its (positive) scale:
        the cut depends on the direction only.
    """
    solver = resolve_solver(solver, affinity.device)
    w = affinity.float()
    d = w.sum(-1).clamp_min(1e-12)
    d_isqrt = d.rsqrt()
    m = d_isqrt[:, :, None] * w * d_isqrt[:, None, :]
    if solver == "warm" and start is not None:
        z = torch.zeros_like(d)
        done = torch.zeros(d.shape[0], dtype=torch.bool, device=d.device)
        rows = (start.abs().amax(-1) > 0).nonzero().squeeze(-1)      # graphs with a start (a host sync)
        if rows.numel():
            root = d.index_select(0, rows).sqrt()
            zr, dr = _refine_second_eigvec(m.index_select(0, rows), root, start.index_select(0, rows).float() * root)
            z.index_copy_(0, rows, zr)
            done.index_copy_(0, rows, dr)
        missing = (~done).nonzero().squeeze(-1)                        # the others: eigh
        if missing.numel():
            z.index_copy_(0, missing, torch.linalg.eigh(m.index_select(0, missing))[1][:, :, -2])
    elif solver in ("eigh", "warm"):
        _, vecs = torch.linalg.eigh(m)
        z = vecs[:, :, -2]
    elif solver == "subspace":
        z = _second_eigvec_subspace(m, d.sqrt(), SUBSPACE_STEPS if iters is None else iters, block)
    elif solver == "squaring":
        z = _second_eigvec_squaring(m, d.sqrt(), SQUARING_STEPS if iters is None else iters, products)
    else:
        raise ValueError(f"unknown ncut solver {solver!r}; use 'eigh', 'warm', 'subspace' or 'squaring'")
    return z * d_isqrt


def _refine_second_eigvec(m: Tensor, top: Tensor, start: Tensor, rounds: int = 4, tol: float = 1e-5,
                          margin: float = 1e-4) -> tuple[Tensor, Tensor]:
    """The eigenvector of ``M``'s second-largest eigenvalue ``l2`` by shifted inverse iteration from ``start``.

    ``S = M - 2 u u^T`` moves the top eigenvector ``u`` (eigenvalue 1) to -1, so ``l2`` is ``S``'s largest
    eigenvalue. A Cholesky factorisation of ``sigma I - S`` succeeds only if ``sigma > l2`` (up to float32
    rounding, about 1e-6): each shift that factorises is an upper bound on ``l2``, and inverse iteration
    with it (two solves per round) favours ``l2``'s eigenvector, since ``l2`` is the eigenvalue nearest
    ``sigma``. Each round takes the Rayleigh quotient ``theta <= l2`` and residual ``r`` of ``x`` and tries
    the shift ``theta + max(r, 0.9 margin)``; where it fails, the graph keeps its last factor. A graph is
    done when ``r <= tol`` and its smallest certified shift is at most ``theta + margin``: ``x`` is then an
    eigenvector of an eigenvalue within ``margin`` below ``l2``, which is ``l2``'s unless the two are that
    close (where no solver's choice is well defined). A start with no component along it never gets there
    (its ``theta`` stays near the lower eigenvalue): ``eigh`` takes over.

    A graph is checked after each factorisation (certified by that shift) and, from the second round on,
    before it: a graph whose certified shift was ``theta + 0.9 margin`` is done once its residual is
    small, without a factorisation of its own, as long as ``theta`` has not fallen by a tenth of the
    margin since (inverse iteration with a certified shift does not lower it; rounding moves it by about
    1e-7). Graphs that are done drop out of the batch. From the previous block's vector that is typically
    two factorisations per graph (bench/PERFORMANCE.md).

    Args:
        m: ``(B, N, N)`` float32 ``D^-1/2 W D^-1/2``; top: ``(B, N)`` its top eigenvector ``D^1/2 1`` (any
            positive scale); start: ``(B, N)`` (zero rows: no start, never done).
    Returns:
        ``z`` ``(B, N)`` (unit norm where done; zero elsewhere) and ``done`` ``(B,)`` bool.
    """
    b, n, _ = m.shape
    u = F.normalize(top, dim=-1)
    s = torch.baddbmm(m, u[:, :, None], u[:, None, :], alpha=-2.0)
    x = start - u * (u * start).sum(-1, keepdim=True)
    has_start = x.norm(dim=-1) > 0
    x = F.normalize(x, dim=-1)[:, :, None]                              # (B', N, 1): the graphs going on
    z = torch.zeros(b, n, dtype=m.dtype, device=m.device)
    done_out = torch.zeros(b, dtype=torch.bool, device=m.device)
    rows = torch.arange(b, device=m.device)                             # (B',) their indices
    bound = torch.full((b,), math.inf, dtype=m.dtype, device=m.device)  # (B',) smallest shift that factorised
    factor = None

    def retire(done: Tensor) -> Tensor | None:
        """Write out the vectors of the graphs ``done`` (one host sync); the indices of the others, or None
        if none is done."""
        count = int(done.sum())
        if count == 0:
            return None
        if count == len(rows):                          # all of them (the usual last round): no gathers
            z.index_copy_(0, rows, x[:, :, 0])
            done_out.index_fill_(0, rows, True)
            return rows[:0]
        finished = done.nonzero().squeeze(-1)
        z.index_copy_(0, rows[finished], x[finished, :, 0])
        done_out.index_fill_(0, rows[finished], True)
        return (~done).nonzero().squeeze(-1)

    for i in range(rounds + 1):
        theta, residual = _rayleigh(s, x)                               # (B',) each
        converged = has_start & (residual <= tol)
        # l2 < bound <= theta + margin, and theta <= l2: theta is within the margin below l2. (No bound yet
        # in the first round.)
        keep = retire(converged & (bound <= theta + margin)) if i else None
        if keep is not None:
            if keep.numel() == 0:
                break
            rows, s, x, bound, theta, residual, converged, has_start, factor = (  # factor: set in round 0
                t[keep] for t in (rows, s, x, bound, theta, residual, converged, has_start, factor))
        shift = theta + residual.clamp_min(0.9 * margin)
        chol, ok = _shifted_cholesky(s, shift)
        bound = torch.where(ok, torch.minimum(bound, shift), bound)
        keep = retire(converged & ok & (shift <= theta + margin))      # certified by this shift
        if i == rounds or (keep is not None and keep.numel() == 0):
            break
        # Where every graph factorised (a host sync), no copy of the factors.
        factor = chol if factor is None or bool(ok.all()) else torch.where(ok[:, None, None], chol, factor)
        if keep is not None:
            rows, s, x, bound, has_start, factor = (t[keep] for t in (rows, s, x, bound, has_start, factor))
        for _ in range(2):
            x = F.normalize(torch.cholesky_solve(x, factor), dim=1)
    return z, done_out


def _rayleigh(s: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Rayleigh quotient ``theta = x^T S x`` and residual ``|S x - theta x|`` of unit vectors ``x`` ``(B, N, 1)``
    for symmetric ``s`` ``(B, N, N)``: two ``(B,)`` tensors."""
    sx = s @ x
    theta = (x * sx).sum(1).squeeze(-1)
    return theta, (sx - theta[:, None, None] * x).norm(dim=1).squeeze(-1)


def _shifted_cholesky(s: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Cholesky factors of ``shift I - S`` for ``s`` ``(B, N, N)`` and ``shift`` ``(B,)``, and ``(B,)`` bool:
    where it factorised, i.e. where ``shift`` lies above ``S``'s largest eigenvalue (up to rounding)."""
    shifted = s.neg()
    shifted.diagonal(dim1=1, dim2=2).add_(shift[:, None])
    chol, info = torch.linalg.cholesky_ex(shifted)
    return chol, info == 0


def _second_eigvec_subspace(m: Tensor, top: Tensor, iters: int, block: int) -> Tensor:
    b, n, _ = m.shape
    u = F.normalize(top, dim=-1)[:, :, None]                      # (B, N, 1) top eigenvector of m
    k = min(block, n - 1)
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(n, k, generator=gen).to(m)[None].expand(b, n, k)
    shifted = m + torch.eye(n, device=m.device, dtype=m.dtype)      # eigenvalues in [0, 2]
    for _ in range(iters):
        v = v - u @ (u.transpose(1, 2) @ v)
        v, _ = torch.linalg.qr(shifted @ v)
    v = v - u @ (u.transpose(1, 2) @ v)
    v, _ = torch.linalg.qr(v)
    small = v.transpose(1, 2) @ m @ v                               # (B, k, k) Rayleigh-Ritz
    _, ritz = torch.linalg.eigh(small)
    return (v @ ritz[:, :, -1:]).squeeze(-1)


def _second_eigvec_squaring(m: Tensor, top: Tensor, iters: int, products: torch.dtype = torch.float32) -> Tensor:
    """Power iteration with ``S = (M + I)/2 - u u^T`` (spectrum in [0, 1], the top eigenvector ``u``
    moved to 0), as ``S^(2^p)`` by ``p = ceil(log2(iters))`` squarings. Rounding that brings ``u``
    back has eigenvalue ~eps and is squared away.

    The divisions by the trace keep the scale from over- or underflowing. In float32 the spectrum stays
    in [0, 1], so nothing overflows, and dividing to trace 1 after every second squaring (not the last)
    keeps the top eigenvalue above ``N^-4`` (``trace(S^j)`` lies in ``[l_max^j, N l_max^j]``). Float16
    overflows at 65504, so there every squaring divides to trace ``_HALF_TRACE``: eigenvalues then lie
    in [0, 128] and a product's entries below 128^2, and the last product times the start vector stays
    below ``128 |start|``.
    Products in float16 round each squaring to about 5e-4, which moves the result by about that over the
    spectral gap; on the planted benchmark graphs 11 squarings in float16 left 14 of 264 cuts 1-8 patches
    away from ``eigh``'s, and in float32 none (bench/PERFORMANCE.md).
    Returns ``z`` ``(B, N)`` float32 up to a positive factor: the cut does not depend on it."""
    n = m.shape[-1]
    u = F.normalize(top, dim=-1)
    s = torch.baddbmm(m, u[:, :, None], u[:, None, :], beta=0.5, alpha=-1)
    s.diagonal(dim1=1, dim2=2).add_(0.5)
    half = products == torch.float16
    s = s.to(products)
    squarings = squaring_count(iters)
    for i in range(squarings):
        s = torch.bmm(s, s)
        if half:
            # The divisor in float16, like s: a float32 one makes the division cast every element (a
            # mixed-dtype kernel took 20.6 us per squaring of 128 graphs on the H100, near the product's
            # 24 us; the same-dtype one is not yet timed). trace/128 lies in [128/N, 128] (docstring
            # above), so rounding it to float16 only scales S by a factor within 5e-4 of 1.
            trace = s.diagonal(dim1=1, dim2=2).sum(-1, dtype=torch.float32).mul_(1 / _HALF_TRACE)
            s.div_(trace.clamp_min_(_HALF_TINY).to(products)[:, None, None])
        elif i % 2 == 1 and i < squarings - 1:
            trace = s.diagonal(dim1=1, dim2=2).sum(-1)
            s.div_(trace.clamp_min_(1e-30)[:, None, None])
    return torch.bmm(s, _start_vector(n, m.device, products)[None].expand(s.shape[0], n, 1)).squeeze(-1).float()


# Unbounded on purpose, like _NEIGHBOUR_WEIGHTS: a CUDA graph replays reads of these tensors' memory, so
# an entry must never be freed while a graph may use it. Entries are tiny (N floats; one per crop size).
_START_VECTORS: dict = {}


def _start_vector(n: int, device, dtype) -> Tensor:
    """A fixed random ``(N, 1)`` start for the power iteration, made once per size and device."""
    key = (n, str(device), dtype)
    if key not in _START_VECTORS:
        gen = torch.Generator(device="cpu").manual_seed(0)
        _START_VECTORS[key] = torch.randn(n, 1, generator=gen).to(device=device, dtype=dtype)
    return _START_VECTORS[key]


def defocused_tokens(affinity: Tensor, distractors: Tensor, solver: str = "auto", iters: int | None = None,
                     start: Tensor | None = None, return_fiedler: bool = False,
                     products: torch.dtype = torch.float32, triton: bool = False):
    """Defocused target tokens ``T_def`` from the normalised cut (§3b).

    Symmetrises ``affinity``, takes the Fiedler vector, keeps ``y_i > mean(y)``; the sign is chosen so
    that this set is the smaller side (at most half of the patches), and where neither side is larger,
    the side of the first patch off the mean (so the cut never depends on the solver's sign). Distractors are removed; if
    nothing is left, all non-distractor patches receive.

    Args:
        affinity: ``(B, N, N)`` non-negative (the layer-averaged, head-averaged kk attention).
        distractors: ``(B, N)`` bool.
        start: ``(B, N)`` Fiedler vectors of nearby graphs, for the ``"warm"`` solver (see
            :func:`fiedler_vector`).
        return_fiedler: also return the Fiedler vector ``y`` ``(B, N)`` float32 (arbitrary sign and scale).
        iters, products: see :func:`fiedler_vector`.
        triton: run the cut as the Triton kernels of :func:`rfclip.kernels.squaring_cut_half` (CUDA tensors,
            or Triton's interpreter): the same iteration, in fewer launches and passes. Only for the
            ``"squaring"`` solver with float16 products (a ValueError otherwise).
    Returns:
        ``(B, N)`` bool, or ``(mask, y)`` with ``return_fiedler``.
    """
    # W + W^T, twice the symmetric part: the Fiedler vector's direction and the cut are the same for
    # any positive multiple of W (D^-1/2 W D^-1/2 does not change), so the 1/2 is left out.
    if triton:
        if products != torch.float16 or resolve_solver(solver, affinity.device) != "squaring":
            raise ValueError(f"the Triton cut is the 'squaring' solver with float16 products, not {solver!r} "
                             f"with {products}")
        n = affinity.shape[-1]
        y = kernels.squaring_cut_half(affinity, squaring_count(SQUARING_STEPS if iters is None else iters),
                                      _start_vector(n, affinity.device, torch.float32).view(-1), _HALF_TRACE)
    else:
        y = fiedler_vector(affinity + affinity.transpose(1, 2), solver=solver, iters=iters, start=start,
                           products=products)
    centred = y - y.mean(dim=-1, keepdim=True)
    # [decision] The solver's sign of y is arbitrary, and the spec's rule picks the side by it whenever
    # neither side holds more than half (an even split, or patches at the mean). So the sign is fixed
    # first: the first patch clearly off the mean counts as above. Patches within 1e-4 of the largest
    # deviation from the mean are on neither side (at the mean up to rounding: solvers differ there).
    tol = 1e-4 * centred.abs().amax(dim=-1, keepdim=True)
    first = (centred.abs() > tol).to(torch.uint8).argmax(dim=-1, keepdim=True)
    centred = centred * torch.gather(centred, -1, first).sign()
    above, below = centred > tol, centred < -tol
    flip = above.sum(-1, keepdim=True) > y.shape[-1] // 2            # more than half above the mean
    above = torch.where(flip, below, above)
    others = ~distractors
    receivers = above & others
    receivers = torch.where(receivers.any(dim=-1, keepdim=True), receivers, others)
    return (receivers, y) if return_fiedler else receivers


def redistribute_attention(attn: Tensor, distractors: Tensor, defocused: Tensor, lam: float,
                           inplace: bool = False) -> Tensor:
    """Move ``lam`` of each patch query's attention on distractors to the defocused keys (§3c).

    For every head and patch query row i, over patch key columns: ``Omega_i = lam * sum_{dis} A[i, j]``;
    ``A[i, dis] *= 1 - lam``; ``A[i, j in def] += Omega_i * A[i, j] / sum_{def} A[i, j']``. The CLS row
    and column are untouched and every row sum is preserved. A row whose defocused weights are all
    zero is left as it is (there is nowhere to move the mass in proportion to).

    Each element is scaled once: ``A[i, j] *= 1 - lam*[j in dis] + (Omega_i / S_i)*[j in def]``, with
    the row sums ``sum_dis A`` and ``S_i = sum_def A`` of every head taken by one matrix product per crop
    (the two column selectors against all ``H*T`` rows), and the factor built as ``[-cut, gain, 1]`` times
    ``[1_dis; 1_def; 1]``, one matrix product per crop over all heads.

    Args:
        attn: ``(B, H, T, T)`` attention (rows sum to 1).
        distractors, defocused: ``(B, N)`` bool, disjoint.
        lam: fraction moved, in [0, 1].
        inplace: scale ``attn`` itself (it is returned) instead of a copy.
    Returns:
        ``(B, H, T, T)`` same dtype.
    """
    out = attn if inplace else attn.clone()
    b, h, t, _ = out.shape
    n = t - 1
    sel = torch.stack([distractors, defocused], dim=1).to(attn.dtype)             # (B, 2, N) column selectors
    # Row sums as (2, T) x (T, H*T) per crop, the selectors on the left: on CPUs three times faster than
    # (H*T, T) x (T, 2), a matrix product with 2 columns. The CLS column is in neither set.
    sums = torch.bmm(F.pad(sel, (1, 0)), out.reshape(b, h * t, t).transpose(1, 2))
    sums = sums.view(b, 2, h, t)[..., 1:]                                          # (B, 2, H, N), patch rows
    on_dis, on_dfc = sums[:, 0, :, :, None], sums[:, 1, :, :, None]                # (B, H, N, 1)
    movable = on_dfc > 0
    gain = torch.where(movable, lam * on_dis / torch.where(movable, on_dfc, torch.ones_like(on_dfc)),
                       torch.zeros_like(on_dfc))
    coef = torch.cat([-lam * movable.to(attn.dtype), gain, torch.ones_like(gain)], dim=-1)  # (B, H, N, 3)
    # factor = 1 - cut_i [j in dis] + gain_i [j in def]: (H*N, 3) x (3, N) per crop, one write of (N, N) per head.
    factor = torch.bmm(coef.view(b, h * n, 3), torch.cat([sel, sel.new_ones(b, 1, n)], dim=1))
    out[:, :, 1:, 1:].mul_(factor.view(b, h, n, n))
    return out


def redistributed_attention_output(q: Tensor, k: Tensor, v: Tensor, distractors: Tensor, defocused: Tensor,
                                   lam: float) -> Tensor:
    """``redistribute_attention(softmax(q k^T / sqrt(dh)), distractors, defocused, lam) @ v`` (§3c), without
    forming the ``(T, T)`` attention matrix.

    On a patch row i the redistributed attention is ``A[i, j] * (1 - cut_i [j in dis] + gain_i [j in def])``,
    so ``A' v = A v - cut * A(1_dis v) + gain * A(1_def v)``, and the row sums ``A 1_dis``, ``A 1_def``
    that give ``cut`` and ``gain`` are attention applied to indicator values. That is four fused
    attention passes over the same ``q, k`` (``F.scaled_dot_product_attention``), each as cheap as the
    block's own, instead of writing and rescaling ``B * H * T^2`` attention weights.

    Args:
        q, k, v: ``(B, H, T, dh)``; CLS at token 0.
        distractors, defocused: ``(B, N)`` bool over the patches, disjoint.
        lam: fraction moved, in [0, 1].
    Returns:
        ``(B, H, T, dh)`` in ``v``'s dtype; the CLS row is plain attention.
    """
    b, h, t, dh = v.shape
    # (B, 1, T, dh): column 0 marks the distractors, column 1 the defocused tokens (CLS is neither), the
    # rest is zero. Copied out over the heads (one write of v's size), so no stride-0 value reaches the
    # fused kernels. A precaution: PyTorch's mem-efficient kernel misread broadcast keys and values in
    # pytorch/pytorch#191937 (bf16, a mask, 1 mod 32 keys); this call has no mask.
    marks = F.pad(torch.stack([distractors, defocused], dim=-1).to(v.dtype), (0, dh - 2, 1, 0))[:, None]
    dis, dfc = marks[..., 0:1], marks[..., 1:2]                          # (B, 1, T, 1)
    out, on_dis_v, on_dfc_v, sums = (F.scaled_dot_product_attention(q, k, value) for value in
                                     (v, v * dis, v * dfc, marks.expand(b, h, t, dh).contiguous()))
    acc = torch.promote_types(v.dtype, torch.float32)                   # combine in >= float32
    out = out.to(acc)
    sums = sums[:, :, 1:, :2].to(acc)                                   # patch rows only: the CLS row is untouched
    on_dis, on_dfc = sums[..., 0:1], sums[..., 1:2]                     # (B, H, N, 1) row sums
    movable = on_dfc > 0                                                # cut = lam, gain = lam * on_dis / on_dfc
    gain = torch.where(movable, on_dis / on_dfc, 0.0)
    rows = out[:, :, 1:]
    rows.addcmul_(on_dis_v[:, :, 1:], movable.to(acc), value=-lam).addcmul_(on_dfc_v[:, :, 1:], gain, value=lam)
    return out.to(v.dtype)


def _grid(x: Tensor, grid: tuple[int, int]) -> Tensor:
    b, n, c = x.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"grid {grid} does not hold {n} tokens")
    return x.transpose(1, 2).reshape(b, c, h, w)


def _tokens(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(1, 2)


def neighbour_mean_channels(x: Tensor, grid: tuple[int, int], mask: Tensor, dims: Tensor,
                            skip_if_empty: bool = True, inplace: bool = False) -> Tensor:
    """Eq. 13: for masked tokens, set channels ``dims`` to the mean of their existing 8 neighbours.

    The neighbourhood is 3x3 minus the centre on the patch grid; at the border only the neighbours
    that exist count. All means use the values before the update (simultaneous). Other channels and
    tokens are untouched, and so is a 1x1 grid (no neighbours). The means are taken in float32, or
    in float64 for float64 input.

    Args:
        x: ``(B, N, D)`` patch tokens; grid: ``(h, w)`` with ``h * w == N``;
        mask: ``(B, N)`` bool; dims: ``(K,)`` long.
        skip_if_empty: return ``x`` itself when ``mask`` is all False (a host sync to find out).
        inplace: write the ``K`` channels into ``x`` (it is returned) instead of a copy of ``x``.
    Returns:
        ``(B, N, D)``.
    """
    if grid[0] * grid[1] == 1 or (skip_if_empty and not bool(mask.any())):
        return x
    sel = x.index_select(-1, dims)                                   # (B, N, K)
    g = _grid(sel.to(torch.promote_types(sel.dtype, torch.float32)), grid)
    # The 3x3 box mean includes the centre: neighbours' mean = (9 * box - centre) / count.
    box_weight, centre_weight = _neighbour_weights(grid, g.device, g.dtype)
    mean = torch.addcmul(g * centre_weight, F.avg_pool2d(g, 3, 1, 1, count_include_pad=True), box_weight)
    new = torch.where(mask[:, :, None], _tokens(mean).to(x.dtype), sel)
    return x.index_copy_(-1, dims, new) if inplace else x.index_copy(-1, dims, new)


_NEIGHBOUR_WEIGHTS: dict = {}


def _neighbour_weights(grid: tuple[int, int], device, dtype) -> tuple[Tensor, Tensor]:
    """``(9 / count, -1 / count)``, each ``(h, w)``, with ``count`` the number of existing neighbours
    of each grid cell (at least 1 on grids larger than 1x1). Made once per grid, device and dtype, so a
    forward pass computes no counts."""
    key = (tuple(grid), str(device), dtype)
    if key not in _NEIGHBOUR_WEIGHTS:
        h, w = grid
        rows = torch.tensor([min(r + 1, h - 1) - max(r - 1, 0) + 1 for r in range(h)], dtype=torch.float64)
        cols = torch.tensor([min(c + 1, w - 1) - max(c - 1, 0) + 1 for c in range(w)], dtype=torch.float64)
        count = rows[:, None] * cols[None, :] - 1                     # (h, w) cells in the 3x3 box, minus the centre
        _NEIGHBOUR_WEIGHTS[key] = ((9.0 / count).to(device, dtype), (-1.0 / count).to(device, dtype))
    return _NEIGHBOUR_WEIGHTS[key]


def release_mean_filter(x: Tensor, grid: tuple[int, int], mask: Tensor, keep: float = 0.6,
                        skip_if_empty: bool = True) -> Tensor:
    """The released code's filter (§4): ``F <- keep F + (1-keep) where(m, mean3x3(F), F)``.

    ``mean3x3`` includes the centre, weights 1/9, zero padding, over all channels.

    Args:
        x: ``(B, N, D)`` patch tokens; grid: ``(h, w)``; mask: ``(B, N)`` bool.
        skip_if_empty: return ``x`` itself when ``mask`` is all False (a host sync to find out).
    Returns:
        ``(B, N, D)``.
    """
    if skip_if_empty and not bool(mask.any()):
        return x
    # Pooled as contiguous NCHW: the channels-last view that _grid gives pools several times slower on GPUs.
    xf = x.float()
    mean = _tokens(F.avg_pool2d(_grid(xf, grid).contiguous(), 3, 1, 1, count_include_pad=True))
    return torch.where(mask[:, :, None], torch.lerp(xf, mean, 1 - keep).to(x.dtype), x)
