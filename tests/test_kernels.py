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
from rfclip.settings import make_settings, resolve_attention_kernels

from _tiny import PLANTED_DIMS, planted_files  # noqa: F401

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
    """The compiled path, without a GPU: bench/kernel_resources.py compiles both kernels for sm_90 as a launch
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
    assert {(r["kernel"], r["tokens"]) for r in rows} == {(k, t) for k in ("kk_head_mean", "redistributed")
                                                           for t in (197, 577)}
    assert all(r["fits"] for r in rows), rows
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
