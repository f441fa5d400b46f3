"""Replaying a method's forward pass as CUDA graphs (the ``graphed`` plan, ``rfclip.Settings.plan``).

RF-CLIP launches a few hundred small kernels per block (distractor scores, the cut, the masked
updates). At GPU batch sizes the host cannot issue them as fast as the GPU runs them, so the GPU
waits. A CUDA graph records the launches of one forward pass once and replays them with one call.
That needs a forward pass without host synchronisation and with fixed shapes: the ``graphed`` plan
runs the fused plan without its host-side checks. Each input shape gets its own graph, and short
batches are padded to the full batch.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .methods.base import DenseOutput

Tensor = torch.Tensor


class CaptureFailed(RuntimeError):
    """CUDA could not capture the forward pass as a graph (it synchronised with the host, or called an
    op that graphs do not allow). ``reason`` is CUDA's or PyTorch's own message."""

    def __init__(self, reason: str):
        super().__init__(f"capturing the forward pass as a CUDA graph failed ({reason}); run with plan='fused' "
                         f"to skip graphs")
        self.reason = reason


class GraphedEncoder:
    """``encode(x) -> DenseOutput`` replayed from CUDA graphs.

    Args:
        encode: the method's forward pass on ``(B, 3, H, W)`` crops; it must not synchronise with the host.
        batch_size: batches smaller than this are zero-padded to it, so one graph serves a crop size.
        max_graphs: graphs kept (one per input shape, each with its activations' memory);
            shapes beyond these run eagerly.

    A capture that CUDA refuses raises :class:`CaptureFailed` (``rfclip.Segmenter`` answers it under
    ``plan="auto"`` by dropping this object and running the fused plan). Running out of memory while
    capturing raises ``torch.OutOfMemoryError`` as it is.
    """

    def __init__(self, encode: Callable[[Tensor], DenseOutput], batch_size: int, max_graphs: int = 4):
        self.encode, self.batch_size, self.max_graphs = encode, batch_size, max_graphs
        self._graphs: dict = {}
        self._pool = None

    def __call__(self, x: Tensor) -> DenseOutput:
        b = x.shape[0]
        if b < self.batch_size:
            x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.batch_size - b))
        key = (tuple(x.shape), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return _first(self.encode(x), b)
            entry = self._graphs[key] = self._capture(x)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return _first(static_out, b, copy=True)

    def _capture(self, x: Tensor):
        static_in = x.clone()
        current = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):                 # warm-up: kernels picked, lazy caches filled
            for _ in range(2):
                self.encode(static_in)
        current.wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                static_out = self.encode(static_in)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:      # CUDA's messages run on over lines of advice: the first line says it
            raise CaptureFailed((str(e).strip().splitlines() or [type(e).__name__])[0]) from e
        return graph, static_in, static_out


def _first(out: DenseOutput, b: int, copy: bool = False) -> DenseOutput:
    """The first ``b`` rows of ``out`` (copied out of the graph's static memory when ``copy``)."""
    take = (lambda t: t[:b].clone()) if copy else (lambda t: t[:b])
    return DenseOutput(take(out.features), None if out.cls is None else take(out.cls))
