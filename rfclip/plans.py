"""Which execution plan and which kernels run a method's forward on a device.

A plan changes how a forward runs, not what it computes (``Settings.plan``): ``"explicit"`` (plain
PyTorch, per-head attention tensors), ``"fused"`` (batched, fused attention), ``"graphed"`` (``"fused"``
replayed as a CUDA graph). The kernels are PyTorch's or the Triton ones of :mod:`rfclip.kernels`.
"""
from __future__ import annotations

from .settings import Settings


def resolve_plan(settings: Settings, device) -> str:
    """The plan that runs on ``device``: ``"auto"`` -> ``"explicit"`` on CPUs (``"fused"`` with Triton
    kernels), ``"graphed"`` on CUDA devices for fixed-size crops with a capturable cut, else ``"fused"``.
    ``"graphed"`` needs a CUDA device; Triton kernels need one too (or, for tests, CPU tensors in
    Triton's interpreter, ``TRITON_INTERPRET=1``)."""
    from . import kernels           # imported here: importing this module loads no triton

    kind = getattr(device, "type", str(device))
    plan, triton = settings.plan, settings.attention_kernels == "triton"     # asked for by name
    for name in ("attention_kernels", "ncut_kernels"):
        if getattr(settings, name) == "triton" and kind != "cuda" and not kernels.interpreted():
            raise ValueError(f"{name}='triton' needs a CUDA device, not {kind} (CPU tensors run only in "
                             f"Triton's interpreter, TRITON_INTERPRET=1, which is for tests)")
    if settings.ncut_kernels == "triton" and not kernels.available():
        raise ValueError("ncut_kernels='triton' needs the triton package, 3.0 or later (it comes with torch's "
                         "CUDA builds on Linux); use ncut_kernels='torch'")
    if settings.ncut_kernels == "triton" and kind == "cpu" and settings.ncut_solver == "auto":
        raise ValueError("ncut_kernels='triton' runs the 'squaring' cut; on CPUs ncut_solver 'auto' is 'warm': "
                         "set ncut_solver='squaring'")
    if plan == "auto":
        if kind == "cpu":
            return "fused" if triton else "explicit"
        # Fixed crop shapes: sliding windows on images resized so that every window is full-size.
        graphable = 0 < settings.slide_crop <= settings.short_side and settings.ncut_solver in ("auto", "squaring")
        return "graphed" if kind == "cuda" and graphable else "fused"
    if plan == "graphed" and kind != "cuda":
        raise ValueError(f"plan='graphed' replays CUDA graphs and needs a CUDA device, not {kind}")
    return plan


def resolve_attention_kernels(settings: Settings, device) -> str:
    """``"torch"`` or ``"triton"``: who runs RF-CLIP's affinity and step (c) on ``device`` (see
    ``Settings.attention_kernels``; ``"auto"`` -> ``"triton"`` for fp16/bf16 models on NVIDIA CUDA
    devices of compute capability 8.0 or more where triton 3+ imports, on the fused and graphed plans)."""
    import torch

    from . import kernels

    if settings.attention_kernels != "auto":
        return settings.attention_kernels
    device = torch.device(device)
    use = (device.type == "cuda" and torch.version.hip is None and settings.plan != "explicit"
           and settings.precision in ("fp16", "bf16") and kernels.available()
           and torch.cuda.get_device_capability(device) >= (8, 0))
    return "triton" if use else "torch"
