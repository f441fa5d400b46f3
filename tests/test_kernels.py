"""rfclip.kernels (the Triton kernels) against the PyTorch steps they replace.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1
before triton is imported); with one, on CUDA tensors, compiled. Whole-model agreement with the loop
reference is in test_reference.py.
"""
import pytest
import torch

from rfclip import kernels, refocus

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


def test_kernels_compile_for_an_h100_without_spills_at_vit_b_size(tmp_path):
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
    assert all(r["spill_store_bytes"] == 0 for r in rows if r["tokens"] == 197), rows
