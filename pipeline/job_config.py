"""What the segmentation job is asked to do, and the Segmenter that follows from it.

- :class:`JobConfig`: every option of ``jobs/segment_dataset.py`` (one CLI flag, one field);
- :class:`LabelSpec`: the ground truth of an evaluation run (:class:`LabelError`: a label that can't be scored);
- :func:`segmenter_kwargs`: the ``rfclip.Segmenter`` keyword arguments a config asks for;
- :func:`probe_segmenter`: builds that Segmenter once, on CPU, in the driver, to fail fast and to
  learn its identity (``seg.config()``) before any cluster work.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from rfclip.cli_args import parse_settings

from rfclip.decode import DEFAULT_MAX_PIXELS


class LabelError(ValueError):
    """A ground-truth label that can't be scored: an evaluation stops rather than score fewer images."""


@dataclass
class LabelSpec:
    """Ground truth for evaluation. ``decode_label(bytes) -> (H, W) int64`` in class-index space,
    ignored pixels equal to ``ignore_index``; ``identity`` is recorded in run.json."""

    decode_label: Callable[[bytes], np.ndarray]
    num_classes: int
    ignore_index: int = 255
    storage_options: Optional[dict] = None
    identity: dict = field(default_factory=dict)


@dataclass
class JobConfig:
    """Everything the job needs; the CLI maps one flag to one field."""

    output: str
    input: Optional[str] = None
    storage_options: Optional[dict] = None
    vocabulary: Optional[str] = None
    vocabulary_file: Optional[str] = None
    benchmark: Optional[str] = None
    method: str = "rfclip"
    model: str = "ViT-B-16"
    weights: str = "openai"
    weights_sha256: Optional[str] = None
    quick_gelu: Optional[bool] = None           # None: inferred from the weights (rfclip.model_factory.load_clip)
    image_mean: Optional[tuple] = None
    image_std: Optional[tuple] = None
    precision: Optional[str] = None
    settings: dict = field(default_factory=dict)
    shard_size: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS
    save_masks: bool = False
    overwrite: bool = False
    retry_errors: bool = False                  # run again the committed shards that hold error rows
    workers: Optional[int] = None
    num_gpus_per_worker: Optional[float] = None
    cpus_per_worker: Optional[float] = None     # None: 1, or on a small local Ray what leaves a CPU to decode
    batch_size: int = 8
    decode_batch_size: int = 16
    window_images: int = 100_000
    ray_address: Optional[str] = None
    progress: bool = True
    # Evaluation hook: pre-resolved inputs (instead of ``input``), the folder they were listed from
    # (``--input`` or the data root: image ids are relative to it) and their ground truth.
    items: Optional[list] = None
    input_root: Optional[str] = None
    labels: Optional[LabelSpec] = None


def labelled_job_inputs(src) -> tuple[list[dict], LabelSpec]:
    """``(items, LabelSpec)`` from a ``pipeline.datasets.LabelledSource`` (``pairs``, ``decode_label``...)."""
    from .datasets import BENCHMARK_LAYOUTS

    items = [{"image_uri": i, "label_uri": l} for i, l in src.pairs]
    identity = {"num_classes": int(src.num_classes), "ignore_index": int(src.ignore_index),
                "class_names": list(src.class_names)}
    if src.name not in BENCHMARK_LAYOUTS and src.transform != "identity":
        # Your labels decoded as a benchmark's (--benchmark with --labels): recorded, so a run that read
        # them as class indices does not resume. A benchmark's own source implies its decoding by its name.
        identity["label_transform"] = src.transform
    spec = LabelSpec(decode_label=src.decode_label, num_classes=int(src.num_classes),
                     ignore_index=int(src.ignore_index), identity=identity)
    return items, spec


def job_vocabulary(cfg: JobConfig) -> tuple[Optional[list], dict]:
    """``(vocabulary, extra Segmenter kwargs)`` from exactly one of the three vocabulary options.

    For ``--benchmark`` the vocabulary is None and the extra kwargs name the preset, whose classes and
    settings the Segmenter applies.
    """
    import rfclip
    from rfclip.benchmarks import BENCHMARKS

    given = [n for n, v in (("--vocabulary", cfg.vocabulary), ("--vocabulary-file", cfg.vocabulary_file),
                            ("--benchmark", cfg.benchmark)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of --vocabulary, --vocabulary-file, --benchmark (got {given or 'none'})")
    if cfg.vocabulary is not None:
        return rfclip.parse_vocabulary(cfg.vocabulary), {}
    if cfg.vocabulary_file:
        return rfclip.load_vocabulary(cfg.vocabulary_file, storage_options=cfg.storage_options), {}
    if cfg.benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {cfg.benchmark!r}; known: {sorted(BENCHMARKS)}")
    return None, {"benchmark": cfg.benchmark}


def segmenter_kwargs(cfg: JobConfig) -> dict:
    """Keyword arguments for ``rfclip.Segmenter`` (device left to each worker)."""
    vocab, extra = job_vocabulary(cfg)
    settings = parse_settings(cfg.settings.items(), cfg.precision)
    return dict(model=cfg.model, weights=cfg.weights, method=cfg.method, vocabulary=vocab,
                weights_sha256=cfg.weights_sha256, storage_options=cfg.storage_options, quick_gelu=cfg.quick_gelu,
                image_mean=cfg.image_mean, image_std=cfg.image_std, **extra, **settings)


def probe_segmenter(seg_kw: dict) -> dict:
    """Build one Segmenter on CPU in the driver and segment a blank image.

    Fails fast on a bad model, weights file, vocabulary or setting. Returns ``{"config": seg.config()
    with the full vocabulary, "num_classes", "short_side", "max_long_side", "class_names"}``; the model
    is freed before the pipeline starts.
    """
    import rfclip
    from rfclip.benchmarks import BENCHMARKS, class_names, method_settings
    from rfclip.vocabulary import normalize_vocabulary

    # The real vocabulary is checked and recorded, but encoded only by the workers: the probe's
    # Segmenter gets one word, so a CPU-only head node does not spend minutes on a 171-class
    # prompt ensemble that every worker computes again anyway.
    vocabulary = seg_kw.get("vocabulary")
    vocabulary = normalize_vocabulary(vocabulary if vocabulary is not None
                                      else BENCHMARKS[seg_kw["benchmark"]].vocabulary)
    benchmark = seg_kw.get("benchmark")
    # The benchmark's settings as explicit ones (the user's still win): a Segmenter takes a benchmark or a
    # vocabulary, and the probe's one word is not the benchmark's classes.
    preset = method_settings(seg_kw["method"], benchmark) if benchmark else {}
    seg = rfclip.Segmenter(**{**preset, **seg_kw, "benchmark": None, "vocabulary": [["object"]], "device": "cpu"})
    try:  # a setting that only fails at inference time (e.g. unknown distraction dims) fails here, once
        seg.segment_batch([np.full((40, 56, 3), 127, np.uint8)])
    except Exception as exc:
        raise ValueError(f"the segmenter can't segment a test image with this configuration: "
                         f"{type(exc).__name__}: {exc}") from exc
    config = {**seg.config(), "vocabulary": vocabulary, "benchmark": benchmark}
    info = {"config": config, "num_classes": len(vocabulary),
            "short_side": int(seg.settings.short_side), "max_long_side": int(seg.settings.max_long_side),
            "class_names": class_names(vocabulary, benchmark)}
    del seg
    gc.collect()
    return info
