"""rfclip.kernels (the Triton kernels) against the PyTorch steps they replace.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1
before triton is imported); with one, on CUDA tensors, compiled. Whole-model agreement with the loop
reference is in test_reference.py.
"""
import warnings

import pytest
import torch

import rfclip
from rfclip import kernels, refocus
from rfclip.plans import resolve_attention_kernels, resolve_plan
from rfclip.settings import make_settings

from _tiny import PLANTED_DIMS, planted_crops, planted_files  # noqa: F401

if not kernels.available():
    pytest.skip("triton is not installed", allow_module_level=True)
if kernels.interpreted():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("no CUDA device, and Triton's interpreter is off (TRITON_INTERPRET)", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])   # no bf16 in the interpreter


def qkv(b, h, t, dh, dtype, seed=0):
    """Strided views of one ``(B, T, 3, H, dh)`` projection, as ``DenseViT.qkv`` gives them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(b, t, 3, h, dh, generator=g).permute(2, 0, 3, 1, 4)
    return [(y[i] * (2.0 if i < 2 else 1.0)).to(DEVICE, dtype) for i in range(3)]


def masks(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    dis = torch.rand(b, n, generator=g) < 0.15
    dfc = (torch.rand(b, n, generator=g) < 0.3) & ~dis
    dis[1] = False                       # crop 1: no distractors (plain attention)
    dfc[2] = False                       # crop 2: nowhere to move the mass (rows left as they are)
    return dis.to(DEVICE), dfc.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,dh", [(17, 16), (50, 32), (197, 64)])
def test_kk_head_mean_adds_the_head_mean_softmax(t, dh, dtype):
    _, k, _ = qkv(2, 3, t, dh, dtype)
    start = torch.rand(2, t - 1, t - 1, device=DEVICE)
    out = start.clone()
    kernels.accumulate_kk_head_mean(k, out, dh ** -0.5)
    kf = k.float()
    expected = start + torch.softmax(kf @ kf.transpose(-1, -2) * dh ** -0.5, -1)[:, :, 1:, 1:].mean(1)
    torch.testing.assert_close(out, expected, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,dh", [(17, 16), (50, 32), (197, 64)])
def test_redistributed_attention_matches_the_explicit_step(t, dh, dtype):
    q, k, v = qkv(3, 2, t, dh, dtype)
    dis, dfc = masks(3, t - 1)
    out = kernels.redistributed_attention_output(q, k, v, dis, dfc, 0.7)
    assert out.shape == v.shape and out.dtype == dtype
    qf, kf, vf = q.float(), k.float(), v.float()
    attn = torch.softmax(qf @ kf.transpose(-1, -2) * dh ** -0.5, -1)
    expected = refocus.redistribute_attention(attn, dis, dfc, 0.7) @ vf
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype], rtol=0)
    # the crop without distractors got plain attention; the CLS rows are plain everywhere
    plain = attn @ vf
    torch.testing.assert_close(out[1].float(), plain[1], atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(out[:, :, 0].float(), plain[:, :, 0], atol=TOL[dtype], rtol=0)
    assert (out[0].float() - plain[0]).abs().max() > 10 * TOL[dtype], "the mass must have moved on crop 0"


def test_kernels_refuse_what_they_cannot_hold():
    _, k, _ = qkv(1, 1, kernels.MAX_TOKENS + 1, 16, torch.float32)
    with pytest.raises(ValueError, match="at most 1024 tokens"):
        kernels.accumulate_kk_head_mean(k, torch.zeros(1, kernels.MAX_TOKENS, kernels.MAX_TOKENS, device=DEVICE), 0.25)
    _, k, _ = qkv(1, 1, 17, 16, torch.float32)
    with pytest.raises(ValueError, match="float32"):
        kernels.accumulate_kk_head_mean(k, torch.zeros(1, 16, 16, device=DEVICE, dtype=torch.float16), 0.25)


def test_kernels_compile_for_an_h100_and_fit(tmp_path):
    """The compiled path, without a GPU: bench/kernel_resources.py compiles the kernels for sm_90 as a launch
    would (same blocks, same argument specialisation) in a process without the interpreter."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = tmp_path / "resources.json"
    subprocess.run([sys.executable, str(root / "bench" / "kernel_resources.py"), "--arch", "90", "--tokens", "197,577",
                    "--json", str(out)], env=env, check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    names = ("kk_head_mean", "redistributed", "cut_operator", "cut_square", "cut_square_last")
    assert {(r["kernel"], r["tokens"]) for r in rows} == {(k, t) for k in names for t in (197, 577)}
    assert all(r["fits"] for r in rows), rows
    assert all(r["spill_store_bytes"] == 0 for r in rows if r["kernel"].startswith("cut_")), rows
    # At T = 197 the blocks are the fastest measured on an H100, which spill a little (40 and 176 bytes);
    # a spill of a kilobyte would mean a block size the sweep never timed.
    assert all(r["spill_store_bytes"] < 1024 for r in rows if r["tokens"] == 197), rows


def test_auto_picks_the_kernels_on_cuda_devices_that_run_them(monkeypatch):
    auto = make_settings("rfclip", {"precision": "bf16"})
    assert auto.attention_kernels == "auto"
    assert resolve_attention_kernels(auto, "cpu") == "torch"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_attention_kernels(auto, "cuda") == "triton"
    assert resolve_attention_kernels(auto, "cuda:1") == "triton"
    assert resolve_attention_kernels(make_settings("rfclip", {"precision": "fp16"}), "cuda") == "triton"
    assert resolve_attention_kernels(make_settings("rfclip"), "cuda") == "torch"        # fp32: for checking only
    explicit = make_settings("rfclip", {"plan": "explicit", "precision": "bf16"})
    assert resolve_attention_kernels(explicit, "cuda") == "torch"
    assert resolve_attention_kernels(make_settings("rfclip", {"attention_kernels": "torch", "precision": "bf16"}),
                                     "cuda") == "torch"
    monkeypatch.setattr(torch.version, "hip", "6.2")                                      # ROCm reports "cuda" too
    assert resolve_attention_kernels(auto, "cuda") == "torch"
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_attention_kernels(auto, "cuda") == "torch"
    assert resolve_attention_kernels(make_settings("rfclip", {"attention_kernels": "triton"}), "cuda") == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert resolve_attention_kernels(auto, "cuda") == "torch"


def _auto_and_plain(planted_files, monkeypatch):
    """Segmenters with attention_kernels "auto" as it is on a CUDA device (here on the CPU, interpreted) and
    "torch"; ``launches`` collects the token counts of the affinity kernel's launches."""
    from rfclip.methods import rfclip as rfclip_method

    monkeypatch.setattr(rfclip_method, "resolve_attention_kernels",
                        lambda settings, device: settings.attention_kernels.replace("auto", "triton"))
    launches = []
    accumulate = kernels.accumulate_kk_head_mean
    monkeypatch.setattr(kernels, "accumulate_kk_head_mean",
                        lambda k, *a: launches.append(k.shape[2]) or accumulate(k, *a))

    def seg(**kw):
        return rfclip.Segmenter(model=planted_files[0], weights=planted_files[1], method="rfclip",
                                vocabulary=["a", "b"], device=DEVICE, plan="fused", distraction_dims=PLANTED_DIMS,
                                **kw)
    return seg, seg(), seg(attention_kernels="torch"), launches


def crops(size, seed=0):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_auto_runs_pytorch_on_crops_of_too_many_tokens_without_trying_and_says_so_once(planted_files, monkeypatch):
    """Crops of more tokens than the kernels take (here a lowered limit) go to PyTorch's kernels without a
    try, with one warning for every such size; crops that fit keep the kernels."""
    seg, auto, plain, launches = _auto_and_plain(planted_files, monkeypatch)
    small, large, larger = crops((64, 64)), crops((96, 96)), crops((112, 96))     # 17, 37 and 43 tokens
    monkeypatch.setattr(kernels, "MAX_TOKENS", 20)
    with pytest.warns(RuntimeWarning, match="Crops of more than 20 tokens do not fit .* run on PyTorch's kernels") as said:
        got = auto.encode_dense(large)
    assert [w.filename for w in said] == [__file__]             # the caller's line, not rfclip's
    torch.testing.assert_close(got, plain.encode_dense(large))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # said once, for every size over the limit
        torch.testing.assert_close(auto.encode_dense(large), got)
        torch.testing.assert_close(auto.encode_dense(larger), plain.encode_dense(larger))
        assert launches == []                           # checked before any launch
        auto.encode_dense(small)
    assert launches and set(launches) == {17}           # crops that fit keep the kernels
    assert list(auto.method.refused_tiles()) == [None]
    assert auto.execution()["fallbacks"] == ["attention kernels: crops of more than 20 tokens do not fit the Triton "
                                             "kernels; ran PyTorch's kernels"]
    with pytest.raises(kernels.DoesNotFit, match="at most 20 tokens"):  # named "triton": an error, no fallback
        seg(attention_kernels="triton").encode_dense(large)


def test_auto_runs_pytorch_on_tiles_the_gpu_cannot_hold_once_per_tile(planted_files, monkeypatch):
    """Triton's OutOfResources for one tile size (64 keys here, as a GPU with little shared memory would
    say): crops of that tile run on PyTorch's kernels after one refused try and one warning; other crop
    sizes of the same tile are not tried again; smaller tiles keep the kernels."""
    seg, auto, plain, launches = _auto_and_plain(planted_files, monkeypatch)
    jit = kernels._jit

    def refusing(body):
        kernel = jit(body)

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, BLOCK_T, **kw):
                    if BLOCK_T == 64:
                        raise kernels.OutOfResources(240 * 1024, 99 * 1024, "shared memory")
                    return kernel[grid](*args, BLOCK_T=BLOCK_T, **kw)
                return launch
        return Launcher()
    monkeypatch.setattr(kernels, "_jit", refusing)
    with pytest.warns(RuntimeWarning, match=r"tiles for 64 keys.*\(crops of 33-64 tokens\): they run on PyTorch's"):
        got = auto.encode_dense(crops((96, 96)))                                    # 37 tokens: a 64 tile
    torch.testing.assert_close(got, plain.encode_dense(crops((96, 96))))
    assert launches == [37]                             # the refused first try
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(auto.encode_dense(crops((112, 96))), plain.encode_dense(crops((112, 96))))
        assert launches == [37]                         # 43 tokens, the same tile: not tried again
        auto.encode_dense(crops((64, 64)))              # 17 tokens, a 32 tile
    assert set(launches[1:]) == {17}
    assert list(auto.method.refused_tiles()) == [64]


def test_a_gpu_out_of_shared_memory_is_does_not_fit(monkeypatch):
    """Triton's OutOfResources at launch (tiles larger than the GPU's shared memory) becomes DoesNotFit,
    the error that attention_kernels='auto' answers by running PyTorch's kernels."""
    def refuse(*args, **kwargs):
        raise kernels.OutOfResources(240 * 1024, 99 * 1024, "shared memory")
    monkeypatch.setattr(kernels, "_jit", lambda body: _Refusing(refuse))
    _, k, _ = qkv(1, 2, 17, 16, torch.float32)
    with pytest.raises(kernels.DoesNotFit, match="cannot hold the Triton kernel's tiles"):
        kernels.accumulate_kk_head_mean(k, torch.zeros(1, 16, 16, device=DEVICE), 0.25)


class _Refusing:
    """Stands for a jitted kernel: ``kernel[grid](...)`` calls ``launch``."""
    def __init__(self, launch):
        self.launch = launch

    def __getitem__(self, grid):
        return self.launch


# ---- the squaring cut (rfclip.kernels.squaring_cut_half) --------------------------------------------------
def _unit(y):
    """Fiedler vectors ``(B, N)`` with mean removed and unit length (the cut's threshold is the mean)."""
    return torch.nn.functional.normalize(y.float() - y.float().mean(-1, keepdim=True), dim=-1)


@pytest.mark.parametrize("n,squarings", [(16, 1), (49, 3), (70, 11), (130, 5)])
def test_squaring_cut_kernels_match_pytorchs_float16_iteration(n, squarings):
    """The kernels run PyTorch's float16 squaring iteration (refocus.fiedler_vector, products=float16) from
    the raw, unsymmetric affinity, with any strides, and N not a multiple of the tile: the same vectors to
    float16's rounding, and close to float32 products. The result is positive (no sign flip) up to scale."""
    g = torch.Generator().manual_seed(n)
    a = (torch.rand(3, n, n, generator=g) ** 4).transpose(1, 2).to(DEVICE)          # strided, not symmetric
    start = refocus._start_vector(n, a.device, torch.float32).view(-1)
    y = kernels.squaring_cut_half(a, squarings, start, refocus._HALF_TRACE)
    assert y.shape == (3, n) and y.dtype == torch.float32 and torch.isfinite(y).all()
    sym = a + a.transpose(1, 2)
    half = refocus.fiedler_vector(sym, "squaring", iters=2 ** squarings, products=torch.float16)
    full = refocus.fiedler_vector(sym, "squaring", iters=2 ** squarings)
    cos = torch.nn.functional.cosine_similarity
    assert cos(y, half.float(), dim=-1).min() > 0.9995          # same sign: the same iteration, same start
    assert cos(y, full, dim=-1).min() > 0.999


def test_squaring_cut_kernels_do_not_depend_on_the_affinitys_scale():
    """The forward hands the kernels the affinity summed over blocks, not averaged: a positive multiple of a
    graph gives the same vector (D^-1/2 W D^-1/2 does not change), from 1e-3 to 1e3 times it."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 40, 40, generator=g).to(DEVICE)
    start = refocus._start_vector(40, a.device, torch.float32).view(-1)
    y = _unit(kernels.squaring_cut_half(a, 6, start, refocus._HALF_TRACE))
    for scale in (1e-3, 11.0, 1e3):
        got = _unit(kernels.squaring_cut_half(a * scale, 6, start, refocus._HALF_TRACE))
        assert (got * y).sum(-1).min() > 0.99999, scale


def test_squaring_cut_kernels_cut_like_eigh_on_graphs_with_small_spectral_gaps():
    """On graphs whose gaps (1+l3)/(1+l2) are 0.972-0.996 (like the planted benchmark graphs), the kernels'
    11 float16 squarings keep the Fiedler vector within |cos| 0.999 of eigh's, the bound PyTorch's float16
    products meet (test_cuda.py), and defocused_tokens(triton=True) moves few patches from eigh's cut."""
    from test_reference import _centred_cosines, _smooth_grid_graphs

    w = _smooth_grid_graphs(count=8, spread=(9, 10, 11, 12, 13)).to(DEVICE)
    exact = refocus.fiedler_vector(w + w.transpose(1, 2), "eigh")
    start = refocus._start_vector(w.shape[1], w.device, torch.float32).view(-1)
    y = kernels.squaring_cut_half(w, refocus.squaring_count(refocus.SQUARING_STEPS), start, refocus._HALF_TRACE)
    assert _centred_cosines(y.cpu(), exact.cpu()).min() > 0.999
    dis = torch.zeros(w.shape[:2], dtype=torch.bool, device=DEVICE)
    got = refocus.defocused_tokens(w, dis, "squaring", products=torch.float16, triton=True)
    moved = (got ^ refocus.defocused_tokens(w, dis, "eigh")).sum(-1)
    assert moved.float().mean() <= 1 and moved.max() <= 4, moved


def test_defocused_tokens_runs_the_kernels_for_the_float16_squaring_cut_and_refuses_others(monkeypatch):
    """triton=True is the squaring solver with float16 products; asked of another solver or of float32
    products it is an error, not a silent PyTorch cut."""
    calls = []
    real = kernels.squaring_cut_half
    monkeypatch.setattr(kernels, "squaring_cut_half", lambda a, *r, **k: calls.append(a.shape) or real(a, *r, **k))
    w = torch.rand(2, 20, 20, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    dis = torch.zeros(2, 20, dtype=torch.bool, device=DEVICE)
    for solver, products in (("eigh", torch.float16), ("subspace", torch.float16), ("squaring", torch.float32)):
        with pytest.raises(ValueError, match="the Triton cut is the 'squaring' solver with float16 products"):
            refocus.defocused_tokens(w, dis, solver, products=products, triton=True)
    assert calls == []
    refocus.defocused_tokens(w, dis, "squaring", products=torch.float16, triton=True)
    refocus.defocused_tokens(w, dis, "squaring", iters=8, products=torch.float16, triton=True)
    assert calls == [(2, 20, 20)] * 2


def test_the_forward_cuts_with_the_kernels_when_asked(planted_files, monkeypatch):
    """RF-CLIP with ncut_kernels="triton" (here an fp16 model on the interpreter's CPU, or a real GPU) cuts with
    the kernels, on the affinity summed over blocks; its cuts are within a few patches of eigh's, and its
    features match those of PyTorch's cut closely (that cut multiplies in float32 on CPUs, float16 on GPUs)."""
    real_cut, real_kernel = refocus.defocused_tokens, kernels.squaring_cut_half
    calls, moved = [], []          # calls: the largest row sum of each affinity the kernels got
    monkeypatch.setattr(kernels, "squaring_cut_half",
                        lambda a, *r, **k: calls.append(float(a.sum(-1).max())) or real_kernel(a, *r, **k))

    def compare(affinity, distractors, *a, **k):
        got = real_cut(affinity, distractors, *a, **k)
        moved.append(int((got ^ real_cut(affinity.float(), distractors, "eigh")).sum()))
        return got
    monkeypatch.setattr(refocus, "defocused_tokens", compare)

    def seg(cut):
        return rfclip.Segmenter(model=planted_files[0], weights=planted_files[1], method="rfclip",
                                vocabulary=["a", "b"], device=DEVICE, distraction_dims=PLANTED_DIMS, tau=0.07,
                                precision="fp16", ncut_solver="squaring", ncut_kernels=cut, plan="fused")
    x = torch.stack(list(planted_crops(2))).float()
    triton_cut = seg("triton")
    assert triton_cut.execution()["ncut_kernels"] == "triton"
    got = triton_cut.encode_dense(x).float()
    assert calls and moved and max(moved) <= 3, moved
    # Summed over blocks, not averaged: a block's head-mean rows sum to at most 1, their sum over blocks more.
    assert calls[0] <= 1 + 1e-5 < max(calls), calls
    cuts = len(calls)
    ref = seg("torch").encode_dense(x).float()
    assert len(calls) == cuts                                            # PyTorch's cut ran there
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() > 0.999


def test_ncut_kernels_triton_is_refused_where_it_would_not_run():
    """The kernels are the float16 squaring cut: an fp32 model, another solver, or a CPU without the
    interpreter is an error that says so, not a silent PyTorch cut."""
    with pytest.raises(ValueError, match="precision fp16 or bf16"):
        make_settings("rfclip", {"ncut_kernels": "triton"})
    with pytest.raises(ValueError, match="ncut_solver 'squaring' or 'auto'"):
        make_settings("rfclip", {"ncut_kernels": "triton", "precision": "bf16", "ncut_solver": "eigh"})
    with pytest.raises(ValueError, match="ncut_kernels must be one of torch, triton"):
        make_settings("rfclip", {"ncut_kernels": "auto"})
    ok = make_settings("rfclip", {"ncut_kernels": "triton", "precision": "bf16", "ncut_solver": "squaring"})
    if kernels.interpreted():                                            # CPUs are allowed, for tests
        with pytest.raises(ValueError, match="on CPUs ncut_solver 'auto' is 'warm'"):
            resolve_plan(make_settings("rfclip", {"ncut_kernels": "triton", "precision": "bf16"}), "cpu")
        assert resolve_plan(ok, "cpu") == "explicit"
    else:
        with pytest.raises(ValueError, match="ncut_kernels='triton' needs a CUDA device"):
            resolve_plan(ok, "cpu")
