"""Invariants of the refocusing math (METHODS.md §3 a-d, §4) on constructed inputs."""
import pytest
import torch
import torch.nn.functional as F

from rfclip import refocus

DIMS = torch.tensor([1, 5])


def stream(b=2, n=16, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g)


def test_planted_overactivated_token_is_a_distractor_and_ordinary_ones_are_not():
    x = stream(d=64)
    x[0, 3, 5] = 60.0                      # token 3 of crop 0: one distraction channel massively active
    x[1, 7, 2] = 60.0                      # massive, but in a channel that is not a distraction dim
    mask = refocus.find_distractors(x, DIMS, tau=5 / 64)
    assert mask[0, 3] and mask.sum() == 1


def test_distraction_score_is_min_shifted_ratio():
    x = torch.tensor([[[-1.0, 3.0, 0.0, 1.0]]])          # shifted: [0, 4, 1, 2], sum 7
    phi = refocus.distraction_scores(x, torch.tensor([1, 3]))
    assert phi.item() == pytest.approx(4 / 7)


def test_attention_condition_filters_distractors():
    x = stream(b=1, n=4, d=8)
    x[0, :2, 1] = 50.0                                   # tokens 0 and 1 over-activated
    attn = torch.full((1, 2, 5, 5), 0.02)
    attn[:, :, :, 2] = 0.9                               # everyone attends to patch 1 (token index 2)
    attn = attn / attn.sum(-1, keepdim=True)
    mask = refocus.find_distractors(x, DIMS, tau=0.1, received=refocus.received_attention(attn), min_received=0.1)
    assert mask.tolist() == [[False, True, False, False]]


def two_block_affinity(n1=10, n2=6, inside=1.0, across=0.01, noise=0.01, seed=0):
    n = n1 + n2
    g = torch.Generator().manual_seed(seed)
    w = torch.full((n, n), across)
    w[:n1, :n1] = inside
    w[n1:, n1:] = inside
    w = w + noise * torch.rand(n, n, generator=g)
    perm = torch.randperm(n, generator=g)
    return w[perm][:, perm], perm


@pytest.mark.parametrize("solver", ["auto", "eigh", "subspace", "squaring"])
def test_normalised_cut_splits_two_blocks(solver):
    w, perm = two_block_affinity()
    small_block = perm >= 10                             # the 6 tokens of the second block, permuted
    dis = torch.zeros(1, 16, dtype=torch.bool)
    defocused = refocus.defocused_tokens(w[None], dis, solver=solver)
    assert torch.equal(defocused[0], small_block)        # the smaller side, exactly the planted block


def test_defocused_set_excludes_distractors_and_falls_back_when_empty():
    w, perm = two_block_affinity()
    small_block = perm >= 10
    dis = small_block.clone()[None]                      # every defocused token is a distractor
    defocused = refocus.defocused_tokens(w[None], dis)
    assert torch.equal(defocused, ~dis)                  # then all non-distractor patches receive
    dis2 = torch.zeros(1, 16, dtype=torch.bool)
    dis2[0, small_block.nonzero()[0]] = True
    d2 = refocus.defocused_tokens(w[None], dis2)
    assert not (d2 & dis2).any() and d2.sum() == small_block.sum() - 1


def random_attention(b=2, h=3, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n + 1, n + 1, generator=g).softmax(-1).double()


def test_fused_redistribution_equals_the_explicit_matrix_times_v():
    """Four fused attention passes give ``redistribute_attention(A) @ v`` (CLS row untouched)."""
    g = torch.Generator().manual_seed(4)
    b, h, n, dh = 2, 3, 16, 8
    q, k, v = (torch.randn(b, h, n + 1, dh, generator=g, dtype=torch.float64) for _ in range(3))
    dis = torch.zeros(b, n, dtype=torch.bool)
    dfc = torch.zeros(b, n, dtype=torch.bool)
    dis[0, [1, 4]] = True
    dfc[0, [7, 8, 9]] = True
    dfc[1, [2, 3]] = True                                  # crop 1 has no distractors: plain attention
    attn = (q @ k.transpose(-1, -2) / dh ** 0.5).softmax(-1)
    explicit = refocus.redistribute_attention(attn, dis, dfc, 0.7) @ v
    fused = refocus.redistributed_attention_output(q, k, v, dis, dfc, 0.7)
    torch.testing.assert_close(fused, explicit, rtol=0, atol=1e-12)
    torch.testing.assert_close(fused[1], attn[1] @ v[1], rtol=0, atol=1e-12)
    assert not torch.allclose(fused[0], attn[0] @ v[0])   # crop 0 did change


def test_redistribution_preserves_rows_and_moves_lam_proportionally():
    attn = random_attention()
    dis = torch.zeros(2, 16, dtype=torch.bool)
    dfc = torch.zeros(2, 16, dtype=torch.bool)
    dis[0, [1, 4]] = True
    dfc[0, [7, 8, 9]] = True
    dis[1, [0]] = True
    dfc[1, [2, 3]] = True
    lam = 0.7
    out = refocus.redistribute_attention(attn, dis, dfc, lam)
    torch.testing.assert_close(out.sum(-1), attn.sum(-1), rtol=0, atol=1e-12)
    assert torch.equal(out[:, :, 0], attn[:, :, 0]) and torch.equal(out[:, :, :, 0], attn[:, :, :, 0])
    p, q = attn[:, :, 1:, 1:], out[:, :, 1:, 1:]
    for b in range(2):
        budget = lam * p[b][..., dis[b]].sum(-1)
        torch.testing.assert_close(q[b][..., dis[b]], (1 - lam) * p[b][..., dis[b]])
        gained = q[b][..., dfc[b]] - p[b][..., dfc[b]]
        torch.testing.assert_close(gained.sum(-1), budget)                      # exactly lam of the mass
        share = p[b][..., dfc[b]] / p[b][..., dfc[b]].sum(-1, keepdim=True)
        torch.testing.assert_close(gained, budget[..., None] * share)           # in proportion
        rest = ~(dis[b] | dfc[b])
        assert torch.equal(q[b][..., rest], p[b][..., rest])


def test_redistribution_of_a_strided_matrix_with_a_row_that_cannot_move():
    """The matrix products read any layout (here a transposed view, left as it is without ``inplace``), and
    a row whose defocused weights are all zero keeps its attention, as the per-element rule says."""
    attn = random_attention(b=2, h=3, n=16, seed=3)
    attn[1, 2, 5, 1:] = torch.cat([torch.zeros(8), attn[1, 2, 5, 9:] / attn[1, 2, 5, 9:].sum()]) * (1 - attn[1, 2, 5, 0])
    dis = torch.zeros(2, 16, dtype=torch.bool)
    dfc = torch.zeros(2, 16, dtype=torch.bool)
    dis[:, [9, 12]] = True
    dfc[:, [0, 3, 7]] = True                          # patch columns 1, 4, 8: zero in row (1, 2, 5)
    strided = attn.transpose(-1, -2).contiguous().transpose(-1, -2)
    before = strided.clone()
    out = refocus.redistribute_attention(strided, dis, dfc, 0.6)
    assert torch.equal(strided, before)
    torch.testing.assert_close(out, refocus.redistribute_attention(attn.clone(), dis, dfc, 0.6), rtol=0, atol=1e-12)
    assert torch.equal(out[1, 2, 5], attn[1, 2, 5])                  # nowhere to move the mass
    assert not torch.equal(out[1, 2, 6], attn[1, 2, 6])
    torch.testing.assert_close(out.sum(-1), attn.sum(-1), rtol=0, atol=1e-12)


def test_neighbour_mean_changes_only_distraction_channels_of_distractors():
    h, w, d = 3, 4, 6
    x = torch.arange(h * w * d, dtype=torch.float64).reshape(1, h * w, d) ** 1.3
    mask = torch.zeros(1, h * w, dtype=torch.bool)
    mask[0, 0] = True              # corner (0, 0): neighbours (0,1), (1,0), (1,1)
    mask[0, 1] = True              # its neighbour (0, 1) is also a distractor: simultaneous update
    mask[0, 6] = True              # interior (1, 2): 8 neighbours
    dims = torch.tensor([2, 4])
    out = refocus.neighbour_mean_channels(x, (h, w), mask, dims)
    grid = x[0].reshape(h, w, d)

    def nb_mean(r, c):
        vals = [grid[rr, cc] for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                if (rr, cc) != (r, c) and 0 <= rr < h and 0 <= cc < w]
        return torch.stack(vals).mean(0)

    for tok, (r, c) in {0: (0, 0), 1: (0, 1), 6: (1, 2)}.items():
        torch.testing.assert_close(out[0, tok, dims], nb_mean(r, c)[dims])
    unchanged = torch.ones(1, h * w, d, dtype=torch.bool)
    for tok in (0, 1, 6):
        unchanged[0, tok, dims] = False
    assert torch.equal(out[unchanged], x[unchanged])


@pytest.mark.parametrize("grid", [(1, 1), (1, 3), (2, 2), (4, 3)])
def test_neighbour_mean_on_every_cell_of_small_grids(grid):
    """Every token masked: each gets the mean of the neighbours that exist (none on a 1x1 grid: kept)."""
    h, w = grid
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, h * w, 5, generator=g, dtype=torch.float64)
    dims = torch.tensor([0, 3])
    out = refocus.neighbour_mean_channels(x, grid, torch.ones(2, h * w, dtype=torch.bool), dims)
    cells = x.reshape(2, h, w, 5)
    for r in range(h):
        for c in range(w):
            nbs = [cells[:, rr, cc] for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                   if (rr, cc) != (r, c) and 0 <= rr < h and 0 <= cc < w]
            want = torch.stack(nbs).mean(0) if nbs else cells[:, r, c]
            torch.testing.assert_close(out[:, r * w + c, dims], want[:, dims], rtol=1e-12, atol=1e-12)
    assert torch.equal(out[..., [1, 2, 4]], x[..., [1, 2, 4]])


def test_release_filter_blends_with_3x3_mean_including_centre():
    h, w, d = 3, 3, 2
    x = torch.arange(h * w * d, dtype=torch.float64).reshape(1, h * w, d)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 0] = True
    out = refocus.release_mean_filter(x, (h, w), mask, keep=0.6)
    grid = x[0].reshape(h, w, d)
    mean00 = grid[:2, :2].reshape(-1, d).sum(0) / 9.0           # zero padding, weights 1/9
    torch.testing.assert_close(out[0, 0], 0.6 * x[0, 0] + 0.4 * mean00)
    assert torch.equal(out[0, 1:], x[0, 1:])


def test_every_step_is_identity_without_distractors():
    x = stream(b=2, n=12, d=8)
    none = torch.zeros(2, 12, dtype=torch.bool)
    attn = random_attention(n=12)
    receivers = refocus.defocused_tokens(torch.rand(2, 12, 12), none)
    assert torch.equal(refocus.redistribute_attention(attn, none, receivers, 0.7), attn)
    assert torch.equal(refocus.neighbour_mean_channels(x, (3, 4), none, DIMS), x)
    assert torch.equal(refocus.release_mean_filter(x, (3, 4), none), x)
    assert not refocus.find_distractors(torch.zeros(2, 12, 8), DIMS, tau=0.1).any()


def test_auto_solver_is_exact_eigh_on_cpu():
    """On CPUs "auto" is "warm", which is eigh itself for graphs without a start (and for zero starts)."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 40, 8, generator=g)
    w = (k @ k.transpose(1, 2)).softmax(-1)
    w = 0.5 * (w + w.transpose(1, 2))
    exact = refocus.fiedler_vector(w, "eigh")
    torch.testing.assert_close(refocus.fiedler_vector(w, "auto"), exact, rtol=0, atol=0)
    torch.testing.assert_close(refocus.fiedler_vector(w, "warm", start=torch.zeros(2, 40)), exact, rtol=0, atol=0)


def _eigenbasis(b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top, basis)``: a positive ``(B, N)`` vector and orthonormal ``(B, N, N)`` columns, the first ``+top``'s
    direction (the known top eigenvector of ``D^-1/2 W D^-1/2``)."""
    g = torch.Generator().manual_seed(seed)
    top = torch.rand(b, n, generator=g) + 0.5
    u = F.normalize(top, dim=-1)
    basis = torch.linalg.qr(torch.cat([u[:, :, None], torch.randn(b, n, n - 1, generator=g)], -1))[0]
    return top, basis * torch.sign((basis[:, :, :1] * u[:, :, None]).sum(1, keepdim=True))


def _with_spectrum(basis: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """``basis diag(vals) basis^T``, ``(B, N, N)``; ``vals`` ``(N,)`` with 1 first."""
    return basis @ torch.diag_embed(vals.expand(basis.shape[0], -1)) @ basis.transpose(1, 2)


def test_the_warm_cut_never_accepts_the_third_eigenvector():
    """A start almost without the second eigenvector (one crossing l3 between blocks, with a small gap and
    low modes mixed in) must not come back done with the third one: done needs a certified shift within
    the margin above the current vector's Rayleigh quotient, so such graphs go to eigh or reach z2. From
    the starts with three tenths of z2 and l3 = 0.9 every graph does reach it, in the four rounds."""
    from rfclip.refocus import _refine_second_eigvec

    n = 196
    top, basis = _eigenbasis(b=8, n=n, seed=7)
    for l3 in (0.90, 0.93):
        m = _with_spectrum(basis, torch.cat([torch.tensor([1.0, 0.95, l3]), torch.linspace(0.8, -0.5, n - 3)]))
        z2, z3, low = basis[:, :, 1], basis[:, :, 2], basis[:, :, -1]
        for eps in (0.0, 1e-5, 1e-4, 1e-2, 0.3):
            z, done = _refine_second_eigvec(m, top, z3 + 0.3 * low + eps * z2)
            cos = (z * z2).sum(-1).abs()
            assert (~done | (cos > 0.999)).all(), (l3, eps, done, cos)
            assert done.all() or (l3, eps) != (0.90, 0.3)


def _running_mean_graphs(count=16, n=196, seed=5):
    """Pairs of kk-attention-like graphs a block apart: the second is the running mean of the first and
    one more layer's attention (3:1), as the layer-averaged affinity moves from block to block."""
    g = torch.Generator().manual_seed(seed)
    side = int(n ** 0.5)
    ys, xs = torch.meshgrid(torch.arange(float(side)), torch.arange(float(side)), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], -1)
    def layer():
        feat = torch.cat([pos.expand(count, n, 2) / 3, 0.4 * torch.randn(count, n, 16, generator=g)], -1)
        return (feat @ feat.transpose(1, 2) / 4).softmax(-1)
    first = (layer() + layer() + layer()) / 3
    return first, (3 * first + layer()) / 4


def test_the_warm_cut_from_the_previous_block_matches_eigh():
    """Started from the previous graph's Fiedler vector, the inverse iteration converges (no eigh needed)
    and cuts as eigh does; started from a poor vector (another eigenvector) it still cuts as eigh does,
    through the certified shift or the eigh fallback."""
    from rfclip.refocus import _refine_second_eigvec

    before, after = _running_mean_graphs()
    dis = torch.zeros(after.shape[0], after.shape[1], dtype=torch.bool)
    dis[:, :2] = True
    start = refocus.fiedler_vector(before + before.transpose(1, 2), "eigh")
    exact = refocus.defocused_tokens(after, dis, "eigh")
    assert torch.equal(refocus.defocused_tokens(after, dis, "warm", start=start), exact)
    w = after + after.transpose(1, 2)
    d = w.sum(-1)
    m = d.rsqrt()[:, :, None] * w * d.rsqrt()[:, None, :]
    _, done = _refine_second_eigvec(m, d.sqrt(), start * d.sqrt())
    assert done.all()                                                   # converged from the warm start
    third = torch.linalg.eigh(m)[1][:, :, -3] * d.rsqrt()              # the wrong eigenvector as a start
    assert torch.equal(refocus.defocused_tokens(after, dis, "warm", start=third), exact)


def test_the_warm_cut_factorises_only_the_graphs_not_done(monkeypatch):
    """A graph whose start is already its Fiedler vector is done after one factorisation (its shift is
    certified and its residual small), and graphs that are done are not factorised again: here two of four
    graphs start from their own vector, two from the previous graph's, and the second round factorises two.
    Every graph comes back as eigh's vector."""
    before, after = _running_mean_graphs(count=4)
    w = after + after.transpose(1, 2)
    exact = refocus.fiedler_vector(w, "eigh")
    start = torch.cat([exact[:2], refocus.fiedler_vector(before + before.transpose(1, 2), "eigh")[2:]])
    sizes, real = [], torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda a, **k: sizes.append(a.shape[0]) or real(a, **k))
    monkeypatch.setattr(torch.linalg, "eigh", None)                    # no fallback needed
    got = refocus.fiedler_vector(w, "warm", start=start)
    assert sizes == [4, 2]
    assert (F.cosine_similarity(got, exact, dim=-1).abs() > 0.9999).all()


def test_the_warm_cut_certifies_a_graph_by_its_earlier_shift(monkeypatch):
    """A graph whose residual at its second shift lies between the tolerance and 0.9 of the margin (here
    6.7e-5: l2 = 0.6, l3 = 0.5, a start with a tenth of z3) is not done after that factorisation, and is
    done at the next round's check on that shift, without a factorisation of its own. Graphs that start
    on z2 are done after one factorisation; graphs that start further off (three tenths of z3) need a
    third, of those two only, in the last round allowed (``rounds=2``: the last round factorises and
    checks too). Interleaved, so that graphs leave the batch from the middle, and every graph comes
    back as z2, in its own row."""
    top, basis = _eigenbasis(b=6, n=64, seed=2)
    m = _with_spectrum(basis, torch.cat([torch.tensor([1.0, 0.6, 0.5]), torch.linspace(0.45, -0.5, 61)]))
    z2, z3 = basis[:, :, 1], basis[:, :, 2]
    sizes, solves = [], []
    real_factor, real_solve = torch.linalg.cholesky_ex, torch.cholesky_solve
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda a, **k: sizes.append(a.shape[0]) or real_factor(a, **k))
    monkeypatch.setattr(torch, "cholesky_solve", lambda x, f: solves.append(x.shape[0]) or real_solve(x, f))
    off = torch.tensor([0.3, 0.0, 0.1, 0.3, 0.0, 0.1])[:, None]
    z, done = refocus._refine_second_eigvec(m, top, z2 + off * z3, rounds=2)
    assert done.all() and sizes == [6, 4, 2] and solves == [4, 4, 4, 4]
    assert ((z * z2).sum(-1).abs() > 0.99999).all()


def test_the_warm_cut_returns_only_vectors_within_the_tolerance():
    """A graph certified by an earlier shift is done only once its own residual is within the tolerance
    too. With l3 only 5e-5 below l2 (less than the margin: any mix of z2 and z3 is acceptable) the first
    certified shift lies within the margin above theta while the residual is still about 2e-5, so a
    check on the bound alone would return such a vector."""
    top, basis = _eigenbasis(b=4, n=64, seed=2)
    m = _with_spectrum(basis, torch.cat([torch.tensor([1.0, 0.6, 0.6 - 5e-5]), torch.linspace(0.55, -0.5, 61)]))
    z2, z3 = basis[:, :, 1], basis[:, :, 2]
    z, done = refocus._refine_second_eigvec(m, top, z2 + torch.tensor([1.0, 2.0, 1.0, 2.0])[:, None] * z3)
    u = F.normalize(top.double(), dim=-1)
    s = m.double() - 2 * u[:, :, None] * u[:, None, :]
    sz = (s @ z.double()[:, :, None]).squeeze(-1)
    residual = (sz - (z.double() * sz).sum(-1, keepdim=True) * z.double()).norm(dim=-1)
    assert done.all() and (residual <= 1.2e-5).all(), residual        # tol 1e-5, plus float32 rounding


def test_the_warm_cut_runs_under_a_float64_default_dtype():
    """The solver's own buffers follow the graphs' dtype (float32), not torch's default dtype."""
    before, after = _running_mean_graphs(count=2)
    start = refocus.fiedler_vector(before + before.transpose(1, 2), "eigh")
    exact = refocus.fiedler_vector(after + after.transpose(1, 2), "eigh")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = refocus.fiedler_vector(after + after.transpose(1, 2), "warm", start=start)
    finally:
        torch.set_default_dtype(default)
    assert got.dtype == torch.float32 and (F.cosine_similarity(got, exact, dim=-1).abs() > 0.9999).all()


@pytest.mark.parametrize("products", [torch.float32, torch.float16])
@pytest.mark.parametrize("iters", [30, 64, None, 1 << 14])
def test_squaring_solver_finds_the_fiedler_vector_up_to_sign(iters, products):
    """On a graph with a spectral gap the power-by-squaring vector is the exact eigenvector's direction,
    also after 14 squarings (S^16384: nothing underflows), with float32 or float16 products."""
    w, _ = two_block_affinity(noise=0.2)
    w = 0.5 * (w + w.T)
    exact = refocus.fiedler_vector(w[None], "eigh")
    fast = refocus.fiedler_vector(w[None], "squaring", iters=iters, products=products)
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    cos = (F.normalize(exact, dim=-1) * F.normalize(fast, dim=-1)).sum().abs()
    assert cos > (0.9999 if products == torch.float32 else 0.999)


@pytest.mark.parametrize("products", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [196, 576])
def test_squaring_solver_does_not_underflow_on_a_near_complete_graph(n, products):
    """The worst case for the scale: every deflated eigenvalue about equal (1/2 before any division), so
    without the trace divisions 2^14 powers would underflow to a zero vector; in float16, which
    overflows at 65504, the trace is kept at 128, so a product's entries stay below 128^2. N = 576:
    ViT-L/14 at 336 px."""
    g = torch.Generator().manual_seed(8)
    noise = torch.rand(n, n, generator=g) * 1e-3
    w = (1 + noise + noise.T)[None]
    y = refocus.fiedler_vector(w, "squaring", iters=1 << 14, products=products)
    assert torch.isfinite(y).all() and y.abs().max() > 0


def test_float16_squaring_does_not_overflow_when_one_eigenvalue_dominates():
    """A patch that attends only to itself: its indicator is an eigenvector of eigenvalue 1, so after
    deflation one eigenvalue carries the whole trace on a single entry, which each squaring squares.
    Divided to trace 128, that entry stays at 128, its square at 128^2, below float16's 65504 (at a
    trace of 4096 this overflows). Two disconnected halves, l2 = 1 spread over all entries, too."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(196, 8, generator=g)
    lone = (k @ k.T / 4).softmax(-1)
    lone[5, :] = lone[:, 5] = 0
    lone[5, 5] = 1
    halves = torch.zeros(576, 576)
    halves[:288, :288] = halves[288:, 288:] = 1
    cuts = []
    for w in (lone, halves):
        none = torch.zeros(1, len(w), dtype=torch.bool)
        cut, y = refocus.defocused_tokens(w[None], none, "squaring", iters=1 << 14, return_fiedler=True,
                                          products=torch.float16)
        assert torch.isfinite(y).all()
        assert torch.equal(cut, refocus.defocused_tokens(w[None], none, "eigh"))
        cuts.append(cut[0])
    assert torch.equal(cuts[0].nonzero(), torch.tensor([[5]])) and cuts[1].sum() == 288


def test_unknown_solver_is_refused():
    w, _ = two_block_affinity()
    with pytest.raises(ValueError, match="unknown ncut solver"):
        refocus.fiedler_vector(w[None], "lanczos")
