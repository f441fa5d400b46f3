"""CUDA paths: the same methods on the GPU in fp32, fp16 and bf16. Skipped (with the reason) without CUDA.

Run them on a GPU machine with ``python -m pytest -q tests/test_cuda.py``.
"""
import pytest
import torch
import torch.nn.functional as F

import rfclip

from _tiny import PLANTED_DIMS, planted_crops, planted_files, planted_image  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def segmenter(files, method, device, **kw):
    if method.startswith("rfclip"):
        kw.setdefault("distraction_dims", PLANTED_DIMS)
    return rfclip.Segmenter(model=files[0], weights=files[1], method=method, vocabulary=["sky", "road", "car"],
                            device=device, short_side=224, **kw)


@pytest.mark.parametrize("method", rfclip.available_methods())
def test_cuda_fp32_matches_cpu(planted_files, method):
    x = planted_crops(3, 224, 160, torch.float32)
    cpu = segmenter(planted_files, method, "cpu").encode_dense(x)
    gpu = segmenter(planted_files, method, "cuda", ncut_solver="eigh").encode_dense(x).cpu()
    # TF32 may be on for matmuls on the GPU: compare directions, not digits.
    cos = (F.normalize(cpu.float(), dim=-1) * F.normalize(gpu.float(), dim=-1)).sum(-1)
    assert cos.min() > 0.999


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("method", ["clip", "clearclip", "rfclip", "rfclip-release"])
def test_cuda_reduced_precision_is_close_to_fp32(planted_files, method, precision):
    x = planted_crops(4, 224, 224, torch.float32)
    ref = segmenter(planted_files, method, "cuda").encode_dense(x).float()
    low = segmenter(planted_files, method, "cuda", precision=precision).encode_dense(x).float()
    cos = (F.normalize(ref, dim=-1) * F.normalize(low, dim=-1)).sum(-1)
    assert cos.mean() > 0.99                      # stated tolerance for 16-bit image towers


def test_cuda_predict_batch_end_to_end(planted_files):
    seg = segmenter(planted_files, "rfclip", "cuda", precision="bf16")
    preds = seg.segment_batch([planted_image(250, 330), planted_image(90, 70, seed=2)])
    assert preds[0].labels.shape == (250, 330) and preds[1].labels.shape == (90, 70)
    assert preds[0].labels.max() < 3


@pytest.mark.parametrize("method", ["clip", "naclip", "rfclip", "rfclip-release"])
def test_cuda_plans_agree(planted_files, method):
    """explicit (host checks, attention matrices), fused (no syncs) and graphed (CUDA graph replay)."""
    x = planted_crops(3, 224, 224, torch.float32)
    out = {plan: segmenter(planted_files, method, "cuda", plan=plan, batch_size=4).encode_dense(x).float()
           for plan in ("explicit", "fused", "graphed")}
    for plan in ("fused", "graphed"):
        cos = (F.normalize(out[plan], dim=-1) * F.normalize(out["explicit"], dim=-1)).sum(-1)
        assert cos.min() > 0.999, plan


def test_cuda_graph_replays_new_inputs_and_pads_short_batches(planted_files):
    seg = segmenter(planted_files, "rfclip", "cuda", plan="graphed", batch_size=4)
    eager = segmenter(planted_files, "rfclip", "cuda", plan="fused", batch_size=4)
    noise = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    pool = torch.cat([planted_crops(5, 224, 224, torch.float32), noise])     # a crop without distractors last
    for start, n in ((0, 4), (4, 2), (2, 4)):             # same graph for a short batch (padded)
        x = pool[start:start + n]
        got, want = seg.encode_dense(x).float(), eager.encode_dense(x).float()
        assert got.shape == want.shape == (n, 14, 14, want.shape[-1])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert len(seg._encode_crops._graphs) == 1


def test_cuda_a_capture_that_fails_for_real_is_capture_failed_and_the_gpu_goes_on(planted_files, monkeypatch):
    """A forward pass that syncs (``.item()``) cannot be captured: CUDA refuses, GraphedEncoder raises
    CaptureFailed, and the device still runs and captures. Under plan="auto" the Segmenter runs the fused
    plan from then on, and gives back the failed capture's memory."""
    from rfclip.graphs import CaptureFailed, GraphedEncoder
    from rfclip.methods.base import DenseOutput

    def syncing(x):
        return DenseOutput(x * float(x.abs().max().item()))
    x = torch.randn(2, 3, 8, 8, device="cuda")
    with pytest.raises(CaptureFailed):
        GraphedEncoder(syncing, batch_size=4)(x)
    good = GraphedEncoder(lambda x: DenseOutput(x * 2.0), batch_size=4)
    torch.testing.assert_close(good(x).features, x * 2.0)
    assert len(good._graphs) == 1

    seg = segmenter(planted_files, "rfclip", "cuda", batch_size=4)
    assert seg.plan == "graphed"
    method_encode = seg.method.encode
    monkeypatch.setattr(seg.method, "encode", lambda x: DenseOutput(method_encode(x).features * float(x.max().item())))
    seg._graphed.encode = seg.method.encode
    crops = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with pytest.warns(RuntimeWarning, match="Running the 'fused' plan"):
        seg.encode_dense(crops)
    torch.cuda.synchronize()
    assert seg.plan == "fused" and seg._graphed is None and len(seg.execution()["fallbacks"]) == 1
    reserved = torch.cuda.memory_reserved()
    seg.encode_dense(crops)
    assert torch.cuda.memory_reserved() <= reserved * 1.5 + 64 * 2 ** 20


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("plan", ["fused", "graphed"])
def test_cuda_triton_kernels_agree_with_torch(planted_files, plan, precision):
    """attention_kernels='triton' (compiled kernels, captured in graphs on the graphed plan) against torch."""
    x = planted_crops(3, 224, 224, torch.float32)
    kw = dict(plan=plan, batch_size=4, precision=precision)
    want = segmenter(planted_files, "rfclip", "cuda", attention_kernels="torch", **kw).encode_dense(x).float()
    got = segmenter(planted_files, "rfclip", "cuda", attention_kernels="triton", **kw).encode_dense(x).float()
    cos = (F.normalize(got, dim=-1) * F.normalize(want, dim=-1)).sum(-1)
    assert cos.min() > (0.9999 if precision == "fp32" else 0.999)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("plan", ["fused", "graphed"])
def test_cuda_triton_cut_agrees_with_torchs(planted_files, plan, precision):
    """ncut_kernels='triton' (compiled, captured in graphs on the graphed plan) against PyTorch's float16 cut:
    the same iteration, so the features agree to float16 rounding of the cut."""
    x = planted_crops(3, 224, 224, torch.float32)
    kw = dict(plan=plan, batch_size=4, precision=precision)
    want = segmenter(planted_files, "rfclip", "cuda", ncut_kernels="torch", **kw).encode_dense(x).float()
    got = segmenter(planted_files, "rfclip", "cuda", ncut_kernels="triton", **kw).encode_dense(x).float()
    cos = (F.normalize(got, dim=-1) * F.normalize(want, dim=-1)).sum(-1)
    assert cos.min() > 0.999


def test_cuda_graphed_segmentation_matches_eager(planted_files):
    imgs = [planted_image(250, 330), planted_image(90, 70, seed=2), planted_image(300, 200, seed=3)]
    a = segmenter(planted_files, "rfclip", "cuda", plan="graphed", batch_size=4).segment_batch(imgs)
    b = segmenter(planted_files, "rfclip", "cuda", plan="fused", batch_size=4).segment_batch(imgs)
    for pa, pb in zip(a, b):
        assert (pa.labels == pb.labels).mean() > 0.999


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [197, 225, 257])
def test_cuda_fused_step_c_matches_the_explicit_matrix(tokens, precision):
    """Step (c) as fused attention passes on the GPU's kernels against the explicit attention matrix in
    float64 on the CPU. 225 and 257 tokens are 1 mod 32, the case where PyTorch's mem-efficient kernel
    misread broadcast keys and values in pytorch/pytorch#191937 (reported with bf16 and a mask)."""
    from rfclip import refocus

    g = torch.Generator().manual_seed(tokens)
    b, h, dh, n = 3, 12, 64, tokens - 1
    q, k, v = (torch.randn(b, h, tokens, dh, generator=g, dtype=torch.float64) for _ in range(3))
    dis = torch.rand(b, n, generator=g) < 0.05
    dfc = (torch.rand(b, n, generator=g) < 0.3) & ~dis
    want = refocus.redistribute_attention((q @ k.transpose(-1, -2) / dh ** 0.5).softmax(-1), dis, dfc, 0.7) @ v
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    got = refocus.redistributed_attention_output(*(t.to("cuda", dtype) for t in (q, k, v)), dis.cuda(), dfc.cuda(), 0.7)
    tol = 1e-3 if precision == "fp32" else 2e-2      # TF32 / bf16 inputs; plain attention is 0.3 away
    torch.testing.assert_close(got.double().cpu(), want, atol=tol, rtol=tol)


def test_cuda_default_runs_the_triton_kernels(planted_files, monkeypatch):
    """attention_kernels='auto' (the default) runs rfclip.kernels for a bf16 model on a CUDA device."""
    from rfclip import kernels

    if not kernels.available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the default picks the Triton kernels on compute capability 8.0+ with triton 3+")
    launches = []
    for name in ("accumulate_kk_head_mean", "redistributed_attention_output"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _k=kernel, _n=name, **kw: launches.append(_n) or _k(*a, **kw))
    segmenter(planted_files, "rfclip", "cuda", precision="bf16").segment_batch([planted_image()])  # step (c) runs
    assert {"accumulate_kk_head_mean", "redistributed_attention_output"} <= set(launches)


@pytest.mark.parametrize("products", [torch.float32, torch.float16])
def test_cuda_squaring_cut_matches_the_cpu_on_graphs_with_small_gaps(products):
    """The GPU's cut (cuBLAS products; float16 on tensor cores) against the CPU's on graphs with small
    spectral gaps (test_reference._smooth_grid_graphs): float32 products cut as eigh does on both; with
    float16 products the Fiedler vector stays within |cos| 0.999 of eigh's (the bound CPU float16 meets)."""
    from rfclip import refocus
    from test_reference import _centred_cosines, _smooth_grid_graphs

    w = _smooth_grid_graphs(count=24, spread=(9, 10, 11, 12, 13))
    sym = w + w.transpose(1, 2)
    y_exact = refocus.fiedler_vector(sym, "eigh")
    y_gpu = refocus.fiedler_vector(sym.cuda(), "squaring", products=products).cpu()
    assert torch.isfinite(y_gpu).all()
    assert _centred_cosines(y_gpu, y_exact).min() > (0.99999 if products == torch.float32 else 0.999)
    if products == torch.float32:
        dis = torch.zeros(len(w), w.shape[1], dtype=torch.bool)
        assert torch.equal(refocus.defocused_tokens(w.cuda(), dis.cuda(), "squaring").cpu(),
                           refocus.defocused_tokens(w, dis, "eigh"))
