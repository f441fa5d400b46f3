"""Time of the squaring cut per batch of graphs: PyTorch's float32 and float16 products against the Triton
kernels (rfclip.kernels.squaring_cut_half) at several tile sizes, each replayed as a CUDA graph (as the
``graphed`` plan runs it), side by side in one process. Needs a CUDA device.

    python bench/cut_tiles.py [--crops 128] [--tokens 197] [--rounds 50] [--json out.json]

The graphs are softmax affinities of random keys (like bench_methods.py's table 3). Each row also gives the
lowest cosine between its Fiedler vectors and PyTorch's float32 ones (sign and scale removed).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from rfclip import kernels, refocus

TILES = [(32, 32, 4), (64, 32, 4), (64, 64, 4), (64, 32, 8), (64, 64, 8), (128, 32, 8), (128, 64, 8)]


def graphed(fn, rounds: int) -> tuple[float, torch.Tensor]:
    """Median seconds of one replay of ``fn`` captured as a CUDA graph (after warm-up), and its output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 10 / 1000)
    return statistics.median(times), out.clone()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--crops", type=int, default=128)
    p.add_argument("--tokens", type=int, default=197, help="T; the graphs have N = T - 1 nodes")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available() or not kernels.available():
        raise SystemExit("needs a CUDA device and triton")
    n = args.tokens - 1
    g = torch.Generator().manual_seed(0)
    k = torch.randn(args.crops, n, 64, generator=g).cuda()
    w = (k @ k.transpose(1, 2) / 8).softmax(-1)
    steps = refocus.SQUARING_STEPS
    start = refocus._start_vector(n, w.device, torch.float32).view(-1)
    rows = {
        "PyTorch, float32 products": lambda: refocus.fiedler_vector(w + w.transpose(1, 2), "squaring", steps),
        "PyTorch, float16 products": lambda: refocus.fiedler_vector(w + w.transpose(1, 2), "squaring", steps,
                                                                   products=torch.float16),
    }
    for tiles in TILES:
        rows[f"Triton, BLOCK {tiles[0]}, BLOCK_K {tiles[1]}, {tiles[2]} warps"] = (
            lambda tiles=tiles: kernels.squaring_cut_half(w, refocus.squaring_count(steps), start,
                                                          refocus._HALF_TRACE, tiles))
    print(f"# squaring cut, {refocus.squaring_count(steps)} squarings, {args.crops} graphs of N = {n}, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| cut | ms per batch (CUDA graph) | min cosine to float32 |")
    print("|---|---|---|")
    figures, reference = {}, None
    for label, fn in rows.items():
        try:
            t, y = graphed(fn, args.rounds)
        except RuntimeError as e:           # tiles larger than this GPU's shared memory (kernels._run)
            if "cannot hold" not in str(e):
                raise
            print(f"| {label} | does not fit: {e} | |")
            continue
        y = F.normalize(y.float(), dim=-1)
        reference = y if reference is None else reference
        cos = (y * reference).sum(-1).abs().min().item()
        figures[label] = {"ms": t * 1000, "min_cosine": cos}
        print(f"| {label} | {t * 1000:.3f} | {cos:.6f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "crops": args.crops, "n": n, "rows": figures}, f,
                      indent=1)


if __name__ == "__main__":
    main()
