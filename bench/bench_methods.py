"""Side-by-side cost of every method, in one process, on the same inputs.

    python bench/bench_methods.py [--model ViT-B-16] [--crops 8] [--rounds 5] [--device cpu]
                                  [--precision fp32] [--images 4] [--skip-memory] [--skip-ops] [--profile rfclip,clip]
                                  [--workloads isolated,clustered,dense]

No pretrained weights exist here, so the model is random; distractors are planted in the
architecture's distraction channels (``rfclip.testing.plant_distractors``) and painted into the
inputs, so RF-CLIP's steps do real work. Workloads (``planted_images``): ``isolated`` single
distractors, which RF-CLIP's step (d) smooths away after the first layer, and ``clustered`` 3x3
blocks, which it cannot, so its steps run in most layers (the default pair); ``dense``, three 5x5
blocks per crop, keeps nearly every crop's steps running in every block, the most work RF-CLIP can do.
The script prints how many distractors each layer found, on the plain model and on RF-CLIP's own path.

Tables printed:
1. dense forward, crops/s of each method on one batch of 224x224 crops per workload, against plain
   open_clip ``encode_image`` on the same batch, and each method's cost relative to ``clip``; then
   the per-round ratios against ``clip`` (each round times every method once), their median, quartiles
   and extremes, which show how noisy the machine was;
2. end-to-end images/s of ``Segmenter.predict_batch`` at VOC settings (short side 336, slide
   224/112), and the ratio RF-CLIP / CLIP (first workload);
3. the normalised-cut solver: time per batch of N x N graphs, eigh against subspace iteration and
   power iteration by repeated squaring (float32 and float16 products; how close each comes to eigh's
   cut is ``bench/cut_fidelity.py``);
4. peak memory of one dense forward per method (CUDA: max allocated; CPU: peak live tensor bytes
   from the torch profiler's allocation events);
5. host work: the aten ops that one dense forward dispatches per method and workload, and how many of
   them launch work (not views, not no-ops): each costs host time, which on a GPU is the limit at small
   batches; the counts do not depend on the machine's speed, only on the device type (CUDA's attention
   dispatches other ops than the CPU's); Triton launches are not aten ops and are not counted;
6. with ``--profile``, the torch profiler's op table of one dense forward of the named methods.

Timings are medians over ``--rounds`` rounds; in each round every method runs once, in turn, so
slow drifts of a noisy machine hit all methods alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from unittest import mock

import numpy as np
import torch

import rfclip
from rfclip import kernels, refocus
from rfclip.segmenter import MEAN, STD
from rfclip.methods.rfclip import distraction_setup
from rfclip.settings import DISTRACTION_DIMS, PLANS, base_arch
from rfclip.testing import distractor_pattern, paint_pattern, random_model, save_checkpoint

# Table 3's rows: label -> (solver, iters, products dtype, Triton kernels). float16 products are the squaring
# cut of fp16 and bf16 models; on CPUs they are slow (no float16 matrix units) and shown for completeness. The
# Triton row (rfclip.kernels.squaring_cut_half, ncut_kernels="triton") runs on CUDA devices only.
SOLVERS = {"eigh": ("eigh", None, torch.float32, False), "subspace": ("subspace", None, torch.float32, False),
           "squaring (11 squarings)": ("squaring", None, torch.float32, False),
           "squaring, 5 squarings (the default before)": ("squaring", 32, torch.float32, False),
           "squaring (11), float16 products": ("squaring", None, torch.float16, False),
           "squaring (11), float16 products, Triton kernels": ("squaring", None, torch.float16, True)}


def default_methods(device: torch.device, precision: str = "fp32") -> list[str]:
    """Every method, plus variants that the defaults (``ncut_solver="auto"``, ``plan="auto"``) do
    not pick on this device: rfclip with the other cut solvers, plans and kernels (the Triton cut for
    fp16/bf16 models where triton imports), and clip eager (``fused``; CUDA devices replay graphs by
    default)."""
    if device.type == "cpu":
        extra = ["rfclip+eigh", "rfclip+subspace", "rfclip+squaring", "rfclip+fused"]
    else:
        extra = ["clip+fused", "rfclip+fused", "rfclip+torch", "rfclip+fused+torch", "rfclip+explicit",
                 "rfclip+eigh", "rfclip+subspace"]
        if precision != "fp32" and kernels.available():
            extra += ["rfclip+cut-triton", "rfclip+fused+cut-triton"]
    return rfclip.available_methods() + extra


# Planted workloads (see planted_images): where RF-CLIP's steps stop after the first layer (isolated), where
# they run in most layers (clustered), and the near worst case (dense), where nearly every crop keeps
# distractors in every block. Table 1 runs the first two unless --workloads names others.
WORKLOADS = {"isolated": dict(spots=6, cluster=1), "clustered": dict(spots=2, cluster=3),
             "dense": dict(spots=3, cluster=5)}


def planted_images(n: int, h: int, w: int, patch: int, seed: int = 0, spots: int = 6,
                   cluster: int = 1) -> list[np.ndarray]:
    """Smooth images with the distractor pattern painted on ``spots`` random squares of
    ``cluster x cluster`` grid cells each.

    - ``cluster=1`` (workload ``isolated``): single distractors. Step (d) replaces each by its
      neighbours' mean, so on RF-CLIP's own path they are gone after the first layer.
    - ``cluster=3`` (workload ``clustered``): 3x3 blocks. A distractor's neighbours are distractors too,
      so smoothing cannot remove them and RF-CLIP's steps run in most layers (real CLIP weights make
      distractors in layers 7-12, the paper's Fig. 2; how many survive step (d) there is unknown here).
    - ``spots=3, cluster=5`` (workload ``dense``): three 5x5 blocks. Step (d) erodes them one ring at a
      time, so nearly every crop runs RF-CLIP's steps in every block: the most work the method can do.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(yy * (c + 1 + i) + xx * (3 - c)) % 256 for c in range(3)], -1).astype(np.uint8)
        cells = []
        for _ in range(spots):
            r = int(rng.integers(h // patch - cluster + 1))
            c = int(rng.integers(w // patch - cluster + 1))
            cells += [(r + dr, c + dc) for dr in range(cluster) for dc in range(cluster)]
        out.append(paint_pattern(base, distractor_pattern(patch, seed=0), cells))
    return out


def to_batch(images: list[np.ndarray], device, dtype) -> torch.Tensor:
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images])
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x.to(device, dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def build(model: str, checkpoint: str, method: str, device: str, precision: str,
          vocabulary=None) -> rfclip.Segmenter:
    """``method`` may name variants: ``"rfclip+subspace"`` is rfclip with ``ncut_solver="subspace"``,
    ``"rfclip+fused"`` with ``plan="fused"`` (likewise ``explicit``, ``graphed``), ``"rfclip+triton"``
    with ``attention_kernels="triton"`` (likewise ``torch``), ``"rfclip+cut-triton"`` with
    ``ncut_kernels="triton"``, ``"rfclip+iters256"`` with ``ncut_iters=256``; they combine
    (``"rfclip+graphed+torch"``)."""
    method, *variants = method.split("+")
    extra = {}
    for variant in variants:
        if variant in PLANS:
            extra["plan"] = variant
        elif variant in ("triton", "torch"):
            extra["attention_kernels"] = variant
        elif variant.startswith("cut-"):
            extra["ncut_kernels"] = variant[4:]
        elif variant.startswith("iters") and variant[5:].isdigit():
            extra["ncut_iters"] = int(variant[5:])
        else:
            extra["ncut_solver"] = variant
    return rfclip.Segmenter(model=model, weights=checkpoint, method=method, vocabulary=vocabulary or VOC_LIKE,
                            device=device, **extra,
                            precision=precision, short_side=336, slide_crop=224, slide_stride=112,
                            batch_size=args_batch)


VOC_LIKE = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
            "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "monitor"]
args_batch = 16


def distractor_counts(seg: rfclip.Segmenter, x: torch.Tensor) -> tuple[list[int], list[int]]:
    """Distractors per layer, summed over the batch ``x``: ``(plain, rfclip)``.

    ``plain``: step (a)'s mask on each block input of the unchanged model. ``rfclip``: the masks that
    ``seg`` (an ``rfclip`` segmenter) finds on its own path, steps (a) and (d) alternating (input of
    block 1, output of block 1, input of block 2, ...), recorded by wrapping
    ``refocus.find_distractors`` for one forward. Where step (d)'s mask gives the next step (a) mask
    (``RFCLIP.masks_ahead``), an output without distractors is not looked at again: its input count
    is that same 0."""
    dims, tau, _ = distraction_setup(seg.method, x.device)
    plain, found = [], []
    real = refocus.find_distractors
    ahead = seg.method.masks_ahead(x.device)

    def record(*a, **kw):
        mask = real(*a, **kw)
        found.append(int(mask.sum()))
        if ahead and len(found) % 2 == 0 and found[-1] == 0:
            found.append(0)                       # the next block's input: the same mask, not recomputed
        return mask

    with torch.inference_mode():
        tokens, _ = seg.vit.embed(x)
        for block in seg.vit.blocks[:-1]:
            plain.append(int(refocus.find_distractors(tokens[:, 1:], dims, tau).sum()))
            tokens = seg.vit.plain_block(block, tokens)
        with mock.patch.object(refocus, "find_distractors", record):
            seg.method.encode(x)
    return plain, found[:2 * len(plain)]


def paired_ratios(times: list[float], reference: list[float]) -> dict[str, float]:
    """Per-round ratios ``times[r] / reference[r]`` (two methods timed in the same rounds) summarised as
    their median, quartiles (inclusive method) and extremes. Needs at least two rounds."""
    if len(times) != len(reference) or len(times) < 2:
        raise ValueError("paired ratios need the same rounds, at least two, for both methods")
    ratios = [t / r for t, r in zip(times, reference)]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "min": min(ratios), "max": max(ratios)}


def peak_tensor_memory_cpu(fn) -> float:
    """Peak MiB of tensor memory allocated while ``fn`` runs, from the torch profiler's allocation
    events (running sum of allocations and frees in time order). Process RSS cannot show it: the
    model load already raised the RSS high-water mark above any forward pass."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2 ** 20


def op_counts(fn) -> dict[str, int]:
    """Aten ops that one call of ``fn`` dispatches (``ops``), and those that launch work
    (``launching``: in-place ops, and ops that return a tensor with storage of its own; not views, nor
    ops that hand back an input's storage, like a ``.to`` to the same dtype or ``contiguous`` on a
    contiguous tensor, nor ops that return no tensor). Counted with a ``TorchDispatchMode``, after a
    warm-up call (a CUDA graph replay counts as the few ops it dispatches)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"ops": 0, "launching": 0}

    def storages(values) -> set:
        return {v.untyped_storage().data_ptr() for v in values if isinstance(v, torch.Tensor) and v.numel()}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            counts["ops"] += 1
            flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
            flat_out = torch.utils._pytree.tree_leaves(out)
            if func._schema.is_mutable or storages(flat_out) - storages(flat_in):
                counts["launching"] += 1
            return out

    with torch.inference_mode():
        fn()
        with Count():
            fn()
    return counts


def profile_table(fn, device: torch.device, rows: int = 15) -> str:
    """torch.profiler's op table for one call of ``fn`` (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        fn()
        sync(device)
        with profile(activities=activities) as prof:
            fn()
            sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48)


def main() -> None:
    global args_batch
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--crops", type=int, default=8, help="crops in the dense-forward batch")
    p.add_argument("--images", type=int, default=4, help="images for the end-to-end table")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--methods", default=None, help="comma-separated; default: every method and cut solver")
    p.add_argument("--profile", default="", help="comma-separated methods to profile (torch.profiler table "
                   "of one dense forward, sorted by self device time on CUDA, self CPU time on CPU)")
    p.add_argument("--workloads", default="isolated,clustered",
                   help=f"comma-separated planted workloads for table 1 ({', '.join(WORKLOADS)}; see planted_images); "
                        "the others use the first")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-ops", action="store_true", help="skip table 5 (aten ops per forward)")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    args_batch = max(args.crops, 16)
    device = torch.device(args.device)
    methods = args.methods.split(",") if args.methods else default_methods(device, args.precision)
    torch.manual_seed(0)

    tmp = tempfile.mkdtemp()
    clip = random_model(args.model, seed=0, plant_dims=DISTRACTION_DIMS[base_arch(args.model)])
    checkpoint = str(save_checkpoint(clip, os.path.join(tmp, "random.pt")))
    segs = {m: build(args.model, checkpoint, m, args.device, args.precision) for m in methods}
    any_seg = next(iter(segs.values()))
    dtype = any_seg.dtype
    plain = any_seg.clip.visual
    workloads = args.workloads.split(",")
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}; choose from {list(WORKLOADS)}")
    batches = {w: to_batch(planted_images(args.crops, 224, 224, any_seg.vit.patch, **WORKLOADS[w]), device, dtype)
               for w in workloads}
    crops = batches[workloads[0]]                     # tables 4 and 6 use the first workload
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# {args.model} (random, planted distractors), {args.precision}, device {device} ({device_name}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    counter = segs.get("rfclip") or build(args.model, checkpoint, "rfclip", args.device, args.precision)
    for w, x in batches.items():
        on_plain, on_rfclip = distractor_counts(counter, x)
        print(f"distractors per layer, workload {w}, batch of {args.crops}: plain model's block inputs {on_plain}; "
              f"rfclip's own path, input/output of each block {on_rfclip}")

    # 1. dense forward, every workload and method interleaved in each round
    runs = {(w, "encode_image"): (lambda x=x: plain(x)) for w, x in batches.items()}
    runs.update({(w, m): (lambda s=segs[m], x=x: s.encode_dense(x)) for w, x in batches.items() for m in methods})
    with torch.inference_mode():
        for fn in runs.values():
            fn()                                              # warm-up
        times = {k: [] for k in runs}
        for _ in range(args.rounds):
            for k, fn in runs.items():
                times[k].append(timed(fn, device))
    dense = {k: statistics.median(v) for k, v in times.items()}
    med = {m: dense[(workloads[0], m)] for m in ["encode_image", *methods]}
    print(f"\n## 1. Dense forward, batch of {args.crops} crops 224x224 (median of {args.rounds} rounds); "
          f"per workload: crops/s, time vs encode_image, time vs clip")
    print("| method | " + " | ".join(f"{w}: crops/s | vs encode_image | vs clip" for w in workloads) + " |")
    print("|---|" + "---|---|---|" * len(workloads))
    for m in ["encode_image", *methods]:
        cells = []
        for w in workloads:
            t, enc = dense[(w, m)], dense[(w, "encode_image")]
            ref = dense.get((w, "clip"), enc)
            cells.append(f"{args.crops / t:.2f} | {t / enc:.3f}x | {t / ref:.3f}x")
        print(f"| {m} | " + " | ".join(cells) + " |")
    paired = {}
    if "clip" in methods and args.rounds >= 2:
        # Each round runs every method once, in turn: the ratio within a round cancels the machine's slow
        # drifts, and the spread of those ratios over the rounds shows the noise left.
        print(f"\nTime vs clip, paired within each of the {args.rounds} rounds: median [quartiles] (min-max)")
        print("| method | " + " | ".join(workloads) + " |")
        print("|---|" + "---|" * len(workloads))
        for m in ["encode_image", *(m for m in methods if m != "clip")]:
            summaries = [paired_ratios(times[(w, m)], times[(w, "clip")]) for w in workloads]
            paired.update({f"{w}/{m}": r for w, r in zip(workloads, summaries)})
            print(f"| {m} | " + " | ".join(f"{r['median']:.3f}x [{r['q1']:.3f}-{r['q3']:.3f}] "
                                           f"({r['min']:.3f}-{r['max']:.3f})" for r in summaries) + " |")

    # 2. end to end at VOC settings
    e2e = {}
    if not args.skip_e2e:
        images = planted_images(args.images, 375, 500, any_seg.vit.patch, seed=1, **WORKLOADS[workloads[0]])
        for s in segs.values():
            s.predict_batch(images[:1])
        e2e_times = {m: [] for m in methods}
        for _ in range(max(1, args.rounds // 2)):
            for m in methods:
                e2e_times[m].append(timed(lambda s=segs[m]: s.predict_batch(images), device))
        e2e = {m: args.images / statistics.median(v) for m, v in e2e_times.items()}
        print(f"\n## 2. End to end, predict_batch of {args.images} images 500x375 at VOC settings "
              f"(short side 336, slide 224/112)")
        print("| method | images/s |")
        print("|---|---|")
        for m in methods:
            print(f"| {m} | {e2e[m]:.3f} |")
        if "rfclip" in e2e and "clip" in e2e:
            print(f"RF-CLIP / CLIP images/s ratio: {e2e['rfclip'] / e2e['clip']:.3f}")

    # 3. normalised cut solver
    n = (224 // any_seg.vit.patch) ** 2
    g = torch.Generator().manual_seed(0)
    k = torch.randn(args.crops, n, 64, generator=g).to(device)
    w = (k @ k.transpose(1, 2) / 8).softmax(-1)
    dis = torch.zeros(args.crops, n, dtype=torch.bool, device=device)
    dis[:, 0] = True
    solver_t = {}
    for label, (solver, iters, products, triton) in SOLVERS.items():
        if triton and not (device.type == "cuda" and kernels.available()):
            continue

        def cut():
            return refocus.defocused_tokens(w, dis, solver, iters, products=products, triton=triton)
        cut()
        solver_t[label] = statistics.median(timed(cut, device) for _ in range(args.rounds))
    layers = len(any_seg.vit.blocks) - 1
    print(f"\n## 3. Normalised cut, batch of {args.crops} graphs of N={n}")
    print("| solver | ms per batch | if run in all L-1 layers: share of the rfclip forward |")
    print("|---|---|---|")
    for solver, t in solver_t.items():
        share = t * layers / med["rfclip"] if "rfclip" in med else float("nan")
        print(f"| {solver} | {t * 1000:.2f} | {share:.1%} |")

    # 4. memory
    mem = {}
    if not args.skip_memory:
        for m in methods:
            if segs[m].plan == "graphed":
                continue                          # a graph's memory is its pool, set aside at capture
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                segs[m].encode_dense(crops)
                mem[m] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
            else:
                with torch.inference_mode():
                    mem[m] = peak_tensor_memory_cpu(lambda s=segs[m]: s.encode_dense(crops))
        kind = "max allocated above the model" if device.type == "cuda" else "peak tensor memory, torch profiler"
        print(f"\n## 4. Peak memory of one dense forward of {args.crops} crops ({kind})")
        print("| method | MiB |")
        print("|---|---|")
        for m in methods:
            print(f"| {m} | {mem[m]:.0f} |" if m in mem else f"| {m} | n/a (CUDA graph pool) |")

    # 5. host work
    ops = {}
    if not args.skip_ops:
        print(f"\n## 5. Host work: aten ops dispatched by one dense forward of {args.crops} crops, and how many "
              f"launch work (not views or no-ops); per workload")
        print("| method | " + " | ".join(f"{w}: ops | launching" for w in workloads) + " |")
        print("|---|" + "---|---|" * len(workloads))
        for m in ["encode_image", *methods]:
            cells = [op_counts(runs[(w, m)]) for w in workloads]
            ops.update({f"{w}/{m}": c for w, c in zip(workloads, cells)})
            print(f"| {m} | " + " | ".join(f"{c['ops']} | {c['launching']}" for c in cells) + " |")

    # 6. where the time goes
    for m in filter(None, args.profile.split(",")):
        print(f"\n## 6. Profile of one dense forward of {args.crops} crops: {m}")
        print(profile_table(lambda s=segs[m]: s.encode_dense(crops), device))

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "precision": args.precision, "crops": args.crops,
                       "dense_seconds": {f"{w}/{m}": t for (w, m), t in dense.items()},
                       "dense_vs_clip_paired": paired, "e2e_images_per_s": e2e, "ncut_seconds": solver_t,
                       "peak_mib": mem, "aten_ops": ops}, f, indent=1)


if __name__ == "__main__":
    main()
