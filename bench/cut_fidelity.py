"""How close each normalised-cut solver comes to the exact cut, on the graphs RF-CLIP really cuts.

    python bench/cut_fidelity.py [--model ViT-B-16] [--crops 8] [--device cpu] [--precision fp32]
                                 [--workloads isolated,clustered,dense,photos] [--rounds 5] [--json F]

The model is the random ViT-B/16 with planted distractors of ``bench_methods.py``, on its workloads
(``planted_images``) and on ``photos``: the four bundled sample photos (``samples/``), two 224 x 224
crops of each. One RF-CLIP forward per workload runs as the ``graphed`` plan does (every crop is cut
in every block) with the exact ``eigh`` cut, and records the layer-averaged affinities it cuts:
``(B, N, N)`` per block. Then every solver configuration cuts those same graphs, and the script prints:

1. per workload, the eigenvalue ratios ``(1 + l3) / (1 + l2)`` of the graphs (near 1: a small spectral
   gap, where power iteration converges slowly);
2. per configuration and workload, how many cuts differ from ``eigh``'s (the defocused set, no
   distractors removed), the mean and largest number of patches that differ, and the time per batch of
   ``--crops`` graphs (median over the blocks and ``--rounds``);
3. per configuration that RF-CLIP can run on the model's own dtype, the cosine between its dense
   features and the ``eigh`` cut's, on the same crops, over all patches: the effect a user sees. Only
   blocks with distractors use the cut (the script prints how many each block has), so a workload
   without them shows no effect at all.

Float16 products are the ``squaring`` cut of fp16 and bf16 models on CUDA (``refocus.squaring_products``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_methods as bm  # noqa: E402  (the workloads, model and timing helpers)

import rfclip  # noqa: E402
from rfclip import kernels, refocus  # noqa: E402
from rfclip.methods import rfclip as rfclip_method  # noqa: E402
from rfclip.settings import DISTRACTION_DIMS, base_arch  # noqa: E402
from rfclip.testing import random_model, save_checkpoint  # noqa: E402

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples")
# (label, solver, iters, products, Triton kernels): the configurations compared with eigh. The Triton rows
# (rfclip.kernels.squaring_cut_half) run on CUDA devices only.
CONFIGS = [
    ("squaring, 5 squarings (ncut_iters=32; the default before)", "squaring", 32, torch.float32, False),
    ("squaring, 8 squarings (ncut_iters=256)", "squaring", 256, torch.float32, False),
    ("squaring, 11 squarings (the default)", "squaring", None, torch.float32, False),
    ("squaring, 5 squarings, float16 products", "squaring", 32, torch.float16, False),
    ("squaring, 11 squarings, float16 products (the default for fp16/bf16 models on GPUs)", "squaring", None,
     torch.float16, False),
    ("squaring, 11 squarings, float16 products, Triton kernels (ncut_kernels='triton')", "squaring", None,
     torch.float16, True),
    ("subspace (30 steps)", "subspace", None, torch.float32, False),
    ("warm (the CPU default): from the previous block's vector, eigh in the first block", "warm", None, torch.float32,
     False),
]


def photo_crops(size: int = 224) -> list[np.ndarray]:
    """Two ``size`` x ``size`` crops of each bundled sample photo (short side resized to ``size``; the
    left and right ends of the long side), ``(size, size, 3)`` uint8 each."""
    out = []
    for path in sorted(glob.glob(os.path.join(SAMPLES, "*.jpg")) + glob.glob(os.path.join(SAMPLES, "*.png"))):
        im = Image.open(path).convert("RGB")
        scale = size / min(im.size)
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
        a = np.array(im)                                           # writable: torch.from_numpy wants it
        out += [a[:size, :size], a[-size:, -size:]]
    return out


def record_graphs(seg: rfclip.Segmenter, x: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """The affinities ``(B, N, N)`` float32 that one RF-CLIP forward of ``x`` cuts, one per block, with
    every crop cut in every block (the ``graphed`` plan's behaviour, run eagerly), and the number of
    distractors in the batch at each of those blocks."""
    graphs, counts = [], []
    real = refocus.defocused_tokens

    def record(affinity, distractors, *a, **kw):
        graphs.append(affinity.detach().float().clone())          # (B, N, N), on the model's device
        counts.append(int(distractors.sum()))
        return real(affinity, distractors, *a, **kw)

    with mock.patch.object(rfclip_method, "plan_flags", lambda settings, device: (True, False)), \
            mock.patch.object(refocus, "defocused_tokens", record), torch.inference_mode():
        seg.method.encode(x)
    return graphs, counts


def eigen_ratios(graphs: list[torch.Tensor]) -> torch.Tensor:
    """``(1 + l3) / (1 + l2)`` of ``D^-1/2 W D^-1/2`` for every graph, ``W`` symmetrised; ``(blocks * B,)``."""
    out = []
    for w in graphs:
        w = (w + w.transpose(1, 2)).double().cpu()
        d = w.sum(-1).rsqrt()
        ev = torch.linalg.eigvalsh(d[:, :, None] * w * d[:, None, :])
        out.append((1 + ev[:, -3]) / (1 + ev[:, -2]))
    return torch.cat(out)


def exact_cuts(graphs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``eigh``'s defocused set ``(B, N)`` bool of each graph, no distractors removed."""
    return [refocus.defocused_tokens(w, torch.zeros(w.shape[:2], dtype=torch.bool, device=w.device), "eigh")
            for w in graphs]


def cut_differences(graphs: list[torch.Tensor], exact: list[torch.Tensor], solver: str, iters, products,
                    triton: bool, rounds: int) -> tuple[torch.Tensor, float]:
    """Patches whose side differs from the ``exact`` cut, per graph ``(blocks * B,)`` long, and the median
    seconds per call on one block's batch. ``"warm"`` starts each block's cut from its own Fiedler vectors
    of the block before, as the forward does (none in the first block: eigh)."""
    diffs, times = [], []
    start = None
    for w, reference in zip(graphs, exact):
        none = torch.zeros(w.shape[:2], dtype=torch.bool, device=w.device)

        def cut():
            return refocus.defocused_tokens(w, none, solver, iters, products=products, start=start,
                                            return_fiedler=True, triton=triton)
        got, y = cut()
        times += [bm.timed(cut, w.device) for _ in range(rounds)]
        diffs.append((got ^ reference).sum(-1).cpu())
        start = y if solver == "warm" else None
    return torch.cat(diffs), statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--crops", type=int, default=8, help="crops per workload (photos: at most 8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--workloads", default="isolated,clustered,dense,photos")
    p.add_argument("--rounds", type=int, default=3, help="timed calls per block and configuration")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    device = torch.device(args.device)
    workloads = args.workloads.split(",")
    unknown = set(workloads) - set(bm.WORKLOADS) - {"photos"}
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}; choose from {[*bm.WORKLOADS, 'photos']}")

    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()
    clip = random_model(args.model, seed=0, plant_dims=DISTRACTION_DIMS[base_arch(args.model)])
    checkpoint = str(save_checkpoint(clip, os.path.join(tmp, "random.pt")))

    def segmenter(**extra):
        return rfclip.Segmenter(model=args.model, weights=checkpoint, method="rfclip", vocabulary=["a"],
                                device=args.device, precision=args.precision, plan="fused", **extra)

    exact_seg = segmenter(ncut_solver="eigh")
    patch = exact_seg.vit.patch
    batches = {w: bm.to_batch(photo_crops()[:args.crops] if w == "photos" else
                              bm.planted_images(args.crops, 224, 224, patch, **bm.WORKLOADS[w]), device, exact_seg.dtype)
               for w in workloads}
    print(f"# {args.model} (random, planted distractors), {args.precision}, device {device}, torch {torch.__version__}")
    recorded = {w: record_graphs(exact_seg, x) for w, x in batches.items()}
    graphs = {w: g for w, (g, _) in recorded.items()}              # on the device
    exact = {w: exact_cuts(g) for w, g in graphs.items()}
    for w, (_, counts) in recorded.items():
        print(f"distractors per block, workload {w}, batch of {len(batches[w])}: {counts}")
    n = graphs[workloads[0]][0].shape[-1]
    figures: dict = {"ratios": {}, "cuts": {}, "features": {}}

    print(f"\n## 1. Eigenvalue ratios (1+l3)/(1+l2) of the graphs cut ({len(graphs[workloads[0]])} blocks x "
          f"{', '.join(f'{len(batches[w])} ({w})' for w in workloads)} crops, N = {n})")
    print("| workload | min | median | max |")
    print("|---|---|---|---|")
    for w, gs in graphs.items():
        r = eigen_ratios(gs)
        figures["ratios"][w] = [float(r.min()), float(r.median()), float(r.max())]
        print(f"| {w} | {r.min():.3f} | {r.median():.3f} | {r.max():.3f} |")

    print("\n## 2. Cuts that differ from eigh's: graphs differing / graphs, mean and largest number of "
          f"the {n} patches on the other side; ms per batch of {args.crops} graphs")
    print("| solver | " + " | ".join(f"{w}: differ | mean | max" for w in workloads) + " | ms per batch |")
    print("|---|" + "---|---|---|" * len(workloads) + "---|")
    can_triton = device.type == "cuda" and kernels.available()
    for label, solver, iters, products, triton in CONFIGS:
        if triton and not can_triton:
            continue
        cells, ms = [], []
        for w in workloads:
            d, t = cut_differences(graphs[w], exact[w], solver, iters, products, triton, args.rounds)
            figures["cuts"][f"{w}/{label}"] = {"differ": int((d > 0).sum()), "graphs": len(d),
                                               "mean": float(d.float().mean()), "max": int(d.max()), "s": t}
            cells.append(f"{int((d > 0).sum())}/{len(d)} | {d.float().mean():.2f} | {int(d.max())}")
            ms.append(t)
        print(f"| {label} | " + " | ".join(cells) + f" | {statistics.median(ms) * 1000:.2f} |")

    # The model's own cut for each configuration RF-CLIP runs on this dtype.
    half = refocus.squaring_products(exact_seg.dtype, device) == torch.float16
    print("\n## 3. Dense features against the eigh cut's (graphed plan's behaviour): cosine per patch, "
          "min / mean over the crops")
    print("| solver | " + " | ".join(workloads) + " |")
    print("|---|" + "---|" * len(workloads))
    with mock.patch.object(rfclip_method, "plan_flags", lambda settings, device: (True, False)), torch.inference_mode():
        reference = {w: exact_seg.method.encode(x).features.float() for w, x in batches.items()}
        for label, solver, iters, products, triton in CONFIGS:
            if (solver == "squaring" and (products == torch.float16) != half) or (triton and not can_triton):
                continue                         # RF-CLIP picks the products by the model's dtype and device
            seg = segmenter(ncut_solver=solver, ncut_iters=iters, ncut_kernels="triton" if triton else "torch")
            cells = []
            for w, x in batches.items():
                cos = F.cosine_similarity(seg.method.encode(x).features.float(), reference[w], dim=-1)
                figures["features"][f"{w}/{label}"] = [float(cos.min()), float(cos.mean())]
                cells.append(f"{cos.min():.4f} / {cos.mean():.5f}")
            print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
