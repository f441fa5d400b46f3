"""Segment an image corpus into Parquet shards with rfclip on Ray (embedded or on a cluster).

    python jobs/segment_dataset.py --input IMAGES --output OUT --vocabulary "sky; road; car"
    ray job submit --working-dir . -- python jobs/segment_dataset.py --input s3://b/imgs --output s3://b/out ...

In-process use (``jobs/evaluate.py``): ``run(JobConfig(...)) -> summary dict``. For evaluation,
pass ``items`` (``[{"image_uri", "label_uri"}]``) and ``labels`` (:class:`LabelSpec`); every shard
then also stores its ``K x K`` confusion matrix (summed by ``pipeline.metrics.load_shard_confusions``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python jobs/segment_dataset.py` from a checkout (no install)
    sys.path.insert(0, str(REPO_ROOT))

from pipeline import sinks, sources, storage  # noqa: E402
from pipeline.decode import DEFAULT_MAX_PIXELS  # noqa: E402
from rfclip.cli_args import parse_setting, parse_settings  # noqa: E402
from rfclip.weights import WeightsError  # noqa: E402

log = logging.getLogger("segment_dataset")

SETTING_FLAGS = {  # explicit CLI flags for the common settings -> Segmenter keyword
    "short_side": int, "slide_crop": int, "slide_stride": int, "prob_thd": float, "logit_scale": float,
}
VERSION_PACKAGES = ("rfclip", "torch", "open_clip_torch", "ray", "pyarrow", "pillow", "numpy", "fsspec", "s3fs")


class ConfigMismatch(RuntimeError):
    """A resumed run whose configuration differs from the one in run.json."""


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
    precision: Optional[str] = None
    settings: dict = field(default_factory=dict)
    shard_size: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS
    save_masks: bool = False
    overwrite: bool = False
    workers: Optional[int] = None
    num_gpus_per_worker: Optional[float] = None
    cpus_per_worker: float = 1.0
    batch_size: int = 8
    decode_batch_size: int = 16
    window_images: int = 100_000
    ray_address: Optional[str] = None
    progress: bool = True
    # Evaluation hook: pre-resolved inputs (instead of ``input``) and their ground truth.
    items: Optional[list] = None
    labels: Optional[LabelSpec] = None


# ------------------------------------------------------------------------------------ helpers

def versions() -> dict:
    """Installed versions of the packages that decide the outputs."""
    out = {"python": platform.python_version()}
    for p in VERSION_PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def labelled_job_inputs(src) -> tuple[list[dict], LabelSpec]:
    """``(items, LabelSpec)`` from a ``pipeline.datasets.LabelledSource`` (``pairs``, ``decode_label``...)."""
    items = [{"image_uri": i, "label_uri": l} for i, l in src.pairs]
    spec = LabelSpec(decode_label=src.decode_label, num_classes=int(src.num_classes),
                     ignore_index=int(src.ignore_index),
                     identity={"num_classes": int(src.num_classes), "ignore_index": int(src.ignore_index),
                               "class_names": list(src.class_names)})
    return items, spec


def _vocabulary(cfg: JobConfig) -> tuple[list, dict]:
    """The vocabulary and extra Segmenter kwargs, from exactly one of the three sources."""
    import rfclip

    given = [n for n, v in (("--vocabulary", cfg.vocabulary), ("--vocabulary-file", cfg.vocabulary_file),
                            ("--benchmark", cfg.benchmark)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one of --vocabulary, --vocabulary-file, --benchmark (got {given or 'none'})")
    if cfg.vocabulary:
        return rfclip.parse_vocabulary(cfg.vocabulary), {}
    if cfg.vocabulary_file:
        return rfclip.load_vocabulary(cfg.vocabulary_file, storage_options=cfg.storage_options), {}
    from rfclip.benchmarks import BENCHMARKS
    if cfg.benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {cfg.benchmark!r}; known: {sorted(BENCHMARKS)}")
    return None, {"benchmark": cfg.benchmark}  # Segmenter takes the preset's classes and settings


def segmenter_kwargs(cfg: JobConfig) -> dict:
    """Keyword arguments for ``rfclip.Segmenter`` (device left to each worker)."""
    vocab, extra = _vocabulary(cfg)
    settings = parse_settings(cfg.settings.items(), cfg.precision)
    kw = dict(model=cfg.model, weights=cfg.weights, method=cfg.method, vocabulary=vocab,
              weights_sha256=cfg.weights_sha256, storage_options=cfg.storage_options, **extra, **settings)
    return kw


def _probe(seg_kw: dict) -> dict:
    """Build one Segmenter on CPU in the driver and segment a blank image: fails fast on a bad
    model/weights/vocabulary/setting, and gives ``seg.config()`` for run.json (freed before the
    pipeline starts)."""
    import gc

    import rfclip
    from rfclip.benchmarks import BENCHMARKS
    from rfclip.vocabulary import normalize_vocabulary

    # The real vocabulary is checked and recorded, but encoded only by the workers: the probe's
    # Segmenter gets one word, so a CPU-only head node does not spend minutes on a 171-class
    # prompt ensemble that every worker computes again anyway.
    vocabulary = seg_kw.get("vocabulary")
    vocabulary = normalize_vocabulary(vocabulary if vocabulary is not None
                                      else BENCHMARKS[seg_kw["benchmark"]].vocabulary)
    seg = rfclip.Segmenter(**{**seg_kw, "vocabulary": [["object"]], "device": "cpu"})
    try:  # a setting that only fails at inference time (e.g. unknown distraction dims) fails here, once
        seg.segment_batch([np.full((40, 56, 3), 127, np.uint8)])
    except Exception as exc:
        raise ValueError(f"the segmenter can't segment a test image with this configuration: "
                         f"{type(exc).__name__}: {exc}") from exc
    config = {**seg.config(), "vocabulary": vocabulary}
    info = {"config": config, "num_classes": len(vocabulary),
            "short_side": int(seg.settings.short_side), "max_long_side": int(seg.settings.max_long_side),
            "class_names": [names[0] for names in vocabulary]}
    del seg
    gc.collect()
    return info


def _pinned_sha256(seg_config: dict) -> Optional[str]:
    """The weights' actual sha256 from ``seg.config()["weights"]["sha256"]`` (None if unknown)."""
    return (seg_config.get("weights") or {}).get("sha256")


# Settings that pick how the forward pass runs, not what it computes (the plans and kernels agree to float
# rounding, tested): like the device, a resumed run may change them. What ran is recorded per shard.
EXECUTION_SETTINGS = ("plan", "attention_kernels")


def _without_execution(seg_config: dict) -> dict:
    """``seg.config()`` without the device and the execution settings (see EXECUTION_SETTINGS)."""
    out = {k: v for k, v in seg_config.items() if k != "device"}  # cpu vs cuda may differ on resume
    if isinstance(out.get("settings"), dict):
        out["settings"] = {k: v for k, v in out["settings"].items() if k not in EXECUTION_SETTINGS}
    return out


def _identity(cfg: JobConfig, inputs: sources.Inputs, seg_config: dict) -> dict:
    """The part of the configuration a resumed run must match."""
    seg_cfg = _without_execution(seg_config)
    return {
        "input": cfg.input if cfg.items is None else "<items>",
        "num_inputs": len(inputs.items),
        "inputs_sha256": sources.items_digest(inputs.items),
        "shard_size": cfg.shard_size,
        "max_pixels": cfg.max_pixels,
        "save_masks": cfg.save_masks,
        "labels": cfg.labels.identity if cfg.labels else None,
        "segmenter": seg_cfg,
    }


def _init_ray(address: Optional[str]) -> bool:
    """Connect to ``address`` / ``$RAY_ADDRESS`` (``ray job submit`` sets it), else start an in-process
    local Ray. Returns True if this call started Ray (so the job shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # address="local": never attach to some other cluster found in /tmp/ray by accident.
        ray.init(address="local", runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    return True


def _default_workers(cfg: JobConfig) -> tuple[int, float]:
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    gpw = cfg.num_gpus_per_worker if cfg.num_gpus_per_worker is not None else (1.0 if gpus > 0 else 0.0)
    if cfg.workers is not None:
        return int(cfg.workers), gpw
    return (max(1, int(gpus // gpw)) if gpw > 0 else 1), gpw


def _to_parquet_row(r: dict) -> dict:
    ok = r["status"] == "ok"
    cp = r["class_pixels"]
    return {
        "image_uri": str(r["image_uri"]),
        "image_id": str(r["image_id"]),
        "width": int(r["width"]) if int(r["width"]) > 0 else None,
        "height": int(r["height"]) if int(r["height"]) > 0 else None,
        "status": "ok" if ok else "error",
        "error": None if ok else str(r["error"]),
        "mask_png": bytes(r["mask_png"]) if ok else None,
        "class_pixels": np.frombuffer(bytes(cp), np.int64).tolist() if ok else None,
        "mean_confidence": float(r["mean_confidence"]) if ok else None,
        "elapsed_ms": float(r["elapsed_ms"]),
    }


# ----------------------------------------------------------------------------------------- run

def run(cfg: JobConfig) -> dict:
    """Run the job end to end; returns the summary dict (also written as summary.json)."""
    t_start = time.time()
    storage.register_secrets(cfg.storage_options)
    if cfg.labels is not None:
        storage.register_secrets(cfg.labels.storage_options)

    # 1. inputs and output: fail fast, before any model or cluster work
    if cfg.items is not None:
        inputs = sources._dedupe_sorted([{"image_uri": it["image_uri"], "label_uri": it.get("label_uri")}
                                         for it in cfg.items], None, "items")
        if not inputs.items:
            raise ValueError("no input items given")
    else:
        if not cfg.input:
            raise ValueError("--input is required")
        inputs = sources.resolve_inputs(cfg.input, cfg.storage_options)
    storage.check_writable(cfg.output, cfg.storage_options)
    shards = sources.make_shards(inputs.items, cfg.shard_size)
    log.info("%d images in %d shards of up to %d", len(inputs.items), len(shards), cfg.shard_size)

    # 2. model identity (fails fast on bad model/weights/vocabulary)
    seg_kw = segmenter_kwargs(cfg)
    probe = _probe(seg_kw)
    if cfg.labels is not None and cfg.labels.num_classes != probe["num_classes"]:
        raise ValueError(f"labels have {cfg.labels.num_classes} classes but the vocabulary has {probe['num_classes']}")
    sha = _pinned_sha256(probe["config"])
    if sha and not seg_kw.get("weights_sha256"):
        seg_kw["weights_sha256"] = sha  # every worker must load exactly the weights recorded in run.json
    identity = _identity(cfg, inputs, probe["config"])

    # 3. resume or start
    so = cfg.storage_options
    if cfg.overwrite:
        sinks.clear_outputs(cfg.output, so)
    previous = sinks.read_json(cfg.output, so, sinks.RUN_JSON)
    committed = sinks.committed_shard_names(cfg.output, so)
    if previous is not None:
        old = dict(previous.get("config", {}))
        if isinstance(old.get("segmenter"), dict):     # run.json files before EXECUTION_SETTINGS held them
            old["segmenter"] = _without_execution(old["segmenter"])
        diffs = sinks.config_differences(old, identity)
        if diffs:
            raise ConfigMismatch(
                f"refusing to resume into {storage.scrub(cfg.output)!r}: the configuration differs from its run.json:\n  "
                + "\n  ".join(diffs) + "\nuse --overwrite to start over, or write to another --output")
    elif committed:
        raise ConfigMismatch(f"{storage.scrub(cfg.output)!r} holds {len(committed)} committed shards but no run.json; "
                             "use --overwrite to start over")
    fs_out, root = storage.get_fs(cfg.output, so)
    summary_path = root.rstrip("/") + "/" + sinks.SUMMARY_JSON
    if fs_out.exists(summary_path):
        fs_out.rm(summary_path)  # a crashed resume must not leave an old "finished" summary behind
    run_doc = {"config": identity, "versions": versions(),
               "runtime": {"output": cfg.output, "storage_options": so, "batch_size": cfg.batch_size,
                           "execution_settings": {k: probe["config"]["settings"][k] for k in EXECUTION_SETTINGS},
                           "workers": cfg.workers, "num_gpus_per_worker": cfg.num_gpus_per_worker,
                           "class_names": probe["class_names"],
                           "started_at": previous["runtime"]["started_at"] if previous else _now(),
                           "resumed_at": _now() if previous else None}}
    sinks.write_json(cfg.output, so, sinks.RUN_JSON, run_doc)

    known = {s.name for s in shards}
    stray = committed - known
    if stray:
        raise ConfigMismatch(f"output holds shards that this input does not produce: {sorted(stray)[:5]}")
    pending = [s for s in shards if s.name not in committed]
    skipped = sum(len(s.items) for s in shards if s.name in committed)
    log.info("%d shards already committed (%d images skipped), %d to do", len(shards) - len(pending), skipped, len(pending))

    counts = {"ok": 0, "error": 0, "duplicates_dropped": 0, "decoded_in_model_process": 0}
    executions: set[str] = set()           # JSON of each distinct Segmenter.execution() the workers reported
    t_pipe = time.time()
    if pending:
        # Pending shards run in windows of about ``window_images`` images, one Ray Data execution
        # each, so the driver and the object store hold one window's rows, not the whole corpus.
        total_images = skipped + sum(len(s.items) for s in pending)
        started_ray = _init_ray(cfg.ray_address)
        try:
            for window in shard_windows(pending, cfg.window_images):
                _run_pipeline(cfg, window, inputs, probe, seg_kw, identity, counts, executions,
                              skipped + counts["ok"] + counts["error"], total_images)
        finally:
            if started_ray:
                import ray
                ray.shutdown()
    wall = time.time() - t_start
    done = counts["ok"] + counts["error"]
    summary = {
        "images_total": len(inputs.items), "ok": counts["ok"], "error": counts["error"], "skipped": skipped,
        "shards_total": len(shards), "shards_committed_this_run": len(pending),
        "shards_skipped": len(shards) - len(pending),
        "duplicate_rows_dropped": counts["duplicates_dropped"],
        "duplicate_inputs_dropped": inputs.duplicates_dropped,
        "rows_decoded_in_model_process": counts["decoded_in_model_process"],
        "execution": [json.loads(e) for e in sorted(executions)],
        "wall_time_s": round(wall, 3), "pipeline_time_s": round(time.time() - t_pipe, 3),
        "images_per_second": round(done / wall, 3) if wall > 0 else None,
        "finished_at": _now(),
    }
    sinks.write_json(cfg.output, so, sinks.SUMMARY_JSON, summary)
    log.info("done: %s", json.dumps(summary))
    return summary


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def shard_windows(pending: list, window_images: int) -> list[list]:
    """Consecutive groups of shards with about ``window_images`` images each (at least one shard)."""
    windows, current, size = [], [], 0
    for shard in pending:
        if current and size + len(shard.items) > window_images:
            windows.append(current)
            current, size = [], 0
        current.append(shard)
        size += len(shard.items)
    if current:
        windows.append(current)
    return windows


def _run_pipeline(cfg: JobConfig, pending: list, inputs: sources.Inputs, probe: dict, seg_kw: dict,
                  identity: dict, counts: dict, executions: set, done_before: int, total: int) -> None:
    """One Ray Data execution over the shards in ``pending`` (Ray already initialised). Adds to ``counts``,
    and the distinct ``execution`` values of the workers' rows to ``executions``."""
    import ray
    import ray.data
    from tqdm import tqdm

    from pipeline.workers import SegmentWorker, decode_stage, encode_stage

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    workers, gpw = _default_workers(cfg)
    num_classes = probe["num_classes"]
    rows = []
    for s in pending:
        for pos, it in enumerate(s.items):
            rows.append({"image_uri": it["image_uri"], "label_uri": it.get("label_uri") or "",
                         "image_id": sources.image_id(it["image_uri"], inputs.root),
                         "shard": s.index, "pos": pos})
    n = len(rows)
    blocks = max(1, min(20000, math.ceil(n / cfg.decode_batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    # The decode tasks reserve heap memory for one worst-case image (RGB + float resize buffers).
    # That also keeps Ray Data from fusing decoding into the model actor (it fuses task->actor
    # maps whose remote args are equal): decoding must stay in CPU tasks so the model never waits
    # on it. summary["rows_decoded_in_model_process"] checks that it did.
    ds = ds.map_batches(decode_stage, batch_size=cfg.decode_batch_size, num_cpus=1,
                        memory=int(cfg.max_pixels) * 3 * 6,
                        fn_kwargs=dict(storage_options=cfg.storage_options, max_pixels=cfg.max_pixels,
                                       short_side=probe["short_side"], max_long_side=probe["max_long_side"]))
    ds = ds.map_batches(SegmentWorker, batch_size=cfg.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=workers),
                        num_gpus=gpw, num_cpus=cfg.cpus_per_worker,
                        fn_constructor_kwargs={"segmenter_kwargs": seg_kw})
    lab = cfg.labels
    ds = ds.map_batches(encode_stage, batch_size=cfg.decode_batch_size, num_cpus=1,
                        fn_kwargs=dict(num_classes=num_classes, output_uri=cfg.output,
                                       storage_options=cfg.storage_options, save_masks=cfg.save_masks,
                                       decode_label=lab.decode_label if lab else None,
                                       label_storage_options=(lab.storage_options if lab and lab.storage_options
                                                              is not None else cfg.storage_options),
                                       ignore_index=lab.ignore_index if lab else 255))
    log.info("pipeline: %d images, %d model workers (%s GPU each, batch %d)", n, workers, gpw, cfg.batch_size)

    config_sha256 = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    by_index = {s.index: s for s in pending}
    buffers: dict[int, dict[int, dict]] = {}
    done_shards: set[int] = set()
    bar = tqdm(total=total, initial=done_before, unit="img", desc="segmented", disable=not cfg.progress,
               mininterval=1.0 if sys.stderr.isatty() else 10.0, dynamic_ncols=True)
    t0 = time.time()
    processed_at_start = counts["ok"] + counts["error"]
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        keys = list(batch)
        for j in range(len(batch["image_uri"])):
            r = {k: batch[k][j] for k in keys}
            si, pos = int(r["shard"]), int(r["pos"])
            buf = buffers.setdefault(si, {})
            if si in done_shards or pos in buf:
                counts["duplicates_dropped"] += 1
                log.warning("duplicate row for %s (shard %d) dropped", r["image_uri"], si)
                continue
            buf[pos] = r
            bar.update(1)
            if int(r["decode_pid"]) == int(r["model_pid"]):
                counts["decoded_in_model_process"] += 1
            shard = by_index[si]
            if len(buf) == len(shard.items):
                _commit(cfg, shard, buffers.pop(si), config_sha256, num_classes, counts, executions)
                done_shards.add(si)
                in_window = counts["ok"] + counts["error"] - processed_at_start
                log.info("%s committed; %d/%d images done, %.2f img/s", shard.name, done_before + in_window,
                         total, in_window / max(time.time() - t0, 1e-9))
    bar.close()
    if buffers:
        missing = {by_index[si].name: len(by_index[si].items) - len(b) for si, b in buffers.items()}
        raise RuntimeError(f"pipeline ended with incomplete shards (missing rows): {missing}")
    never = [s.name for s in pending if s.index not in done_shards]
    if never:
        raise RuntimeError(f"pipeline produced no rows for shards {never[:10]}")


def _commit(cfg: JobConfig, shard, rows_by_pos: dict, config_sha256: str, num_classes: int, counts: dict,
            executions: set) -> None:
    rows = [rows_by_pos[p] for p in range(len(shard.items))]
    for p, r in enumerate(rows):  # the row must be the image the shard expects at that position
        if str(r["image_uri"]) != shard.items[p]["image_uri"]:
            raise RuntimeError(f"{shard.name}[{p}]: got {r['image_uri']!r}, expected {shard.items[p]['image_uri']!r}")
    out_rows = [_to_parquet_row(r) for r in rows]
    ran = sorted({str(r["execution"]) for r in rows})
    executions.update(ran)
    ok = sum(r["status"] == "ok" for r in out_rows)
    confusion = None
    if cfg.labels is not None:
        m = np.zeros((num_classes, num_classes), np.int64)
        for r in rows:
            if r["status"] == "ok" and len(r["confusion"]):
                m += np.frombuffer(bytes(r["confusion"]), np.int64).reshape(num_classes, num_classes)
        confusion = {"num_classes": num_classes, "ignore_index": cfg.labels.ignore_index,
                     "images": int(sum(1 for r in rows if r["status"] == "ok" and len(r["confusion"]))),
                     "matrix": m.tolist()}
    meta = {"name": shard.name, "index": shard.index, "digest": shard.digest, "num_rows": len(rows),
            "ok": ok, "error": len(rows) - ok,
            "config_sha256": config_sha256,
            # how the model ran for these rows: device, plan, kernels, and the fallbacks their worker had taken
            # so far (one entry per distinct state)
            "execution": [json.loads(e) for e in ran],
            "committed_at": _now()}
    sinks.commit_shard(cfg.output, cfg.storage_options, shard.name, out_rows, meta, confusion)
    counts["ok"] += ok
    counts["error"] += len(rows) - ok


# ----------------------------------------------------------------------------------------- CLI

def _storage_options_arg(text: Optional[str]) -> Optional[dict]:
    """JSON, or ``@path`` to a JSON file (keeps secrets off the command line and out of job listings)."""
    if not text:
        return None
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    so = json.loads(text)
    if not isinstance(so, dict):
        raise ValueError("--storage-options must be a JSON object")
    return so


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io_ = p.add_argument_group("inputs and outputs")
    io_.add_argument("--input", help="folder/prefix (local, s3://, any fsspec URL) or a .txt/.parquet manifest "
                     "(not needed with --data-root)")
    io_.add_argument("--output", required=True, help="output folder/prefix (local or object storage)")
    io_.add_argument("--storage-options",
                     help="fsspec options as JSON or @file.json (default: $RFCLIP_STORAGE_OPTIONS, else the standard "
                          "credential chain)")
    io_.add_argument("--save-masks", action="store_true", help="also write masks/<image_id>.png (palette PNG)")
    io_.add_argument("--overwrite", action="store_true", help="delete previous outputs and start over")
    io_.add_argument("--shard-size", type=int, default=1000)
    io_.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    e = p.add_argument_group("evaluation (optional): labelled data -> metrics.json, metrics.md, report.md")
    e.add_argument("--data-root", help="with --benchmark: the MMSegmentation-style data/ folder (local or fsspec)")
    e.add_argument("--labels", help="folder of label PNGs named by the images' stems (class index = vocabulary order)")
    e.add_argument("--ignore-index", type=int, default=255, help="label value ignored with --labels (default 255)")
    e.add_argument("--limit", type=int, help="use only the first N images (sorted / split-file order)")
    v = p.add_argument_group("vocabulary (exactly one)")
    v.add_argument("--vocabulary", help='"sky, cloud; road; car": ";" between classes, ", " between synonyms')
    v.add_argument("--vocabulary-file", help="cls_*.txt format, local or fsspec URL")
    v.add_argument("--benchmark", help="preset name (rfclip.benchmarks): its vocabulary and the method's settings")
    m = p.add_argument_group("model")
    m.add_argument("--method", default="rfclip")
    m.add_argument("--model", default="ViT-B-16")
    m.add_argument("--weights", default="openai")
    m.add_argument("--weights-sha256")
    m.add_argument("--precision", choices=["fp32", "fp16", "bf16"])
    for name, typ in SETTING_FLAGS.items():
        m.add_argument("--" + name.replace("_", "-"), type=typ)
    m.add_argument("--pamr", action=argparse.BooleanOptionalAction, default=None)
    m.add_argument("--setting", action="append", type=parse_setting, default=[], metavar="KEY=VALUE",
                   help="any other Segmenter setting (value parsed as JSON when possible); repeatable")
    r = p.add_argument_group("execution")
    r.add_argument("--workers", type=int, help="model actors (default: one per GPU, else 1)")
    r.add_argument("--num-gpus-per-worker", type=float, help="default 1 where GPUs exist, else 0")
    r.add_argument("--cpus-per-worker", type=float, default=1.0)
    r.add_argument("--batch-size", type=int, default=8, help="images per model call")
    r.add_argument("--decode-batch-size", type=int, default=16, help="images per CPU decode/encode task")
    r.add_argument("--window-images", type=int, default=100_000,
                   help="images per Ray Data execution window; bounds driver and object-store memory on huge corpora")
    r.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else an in-process local Ray)")
    r.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> JobConfig:
    settings = dict(args.setting)
    for name in SETTING_FLAGS:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.pamr is not None:
        settings["pamr"] = args.pamr
    return JobConfig(
        input=args.input, output=args.output, storage_options=_storage_options_arg(args.storage_options or os.environ.get("RFCLIP_STORAGE_OPTIONS")),
        vocabulary=args.vocabulary, vocabulary_file=args.vocabulary_file, benchmark=args.benchmark,
        method=args.method, model=args.model, weights=args.weights, weights_sha256=args.weights_sha256,
        precision=args.precision, settings=settings, shard_size=args.shard_size, max_pixels=args.max_pixels,
        save_masks=args.save_masks, overwrite=args.overwrite, workers=args.workers,
        num_gpus_per_worker=args.num_gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        batch_size=args.batch_size, decode_batch_size=args.decode_batch_size, window_images=args.window_images,
        ray_address=args.ray_address,
        progress=not args.no_progress)


_LOG_HANDLER: Optional[logging.Handler] = None


def setup_logging() -> None:
    """INFO logs to the current stderr, secrets scrubbed. Idempotent: a repeated call (jobs/evaluate.py,
    tests) replaces the handler instead of stacking one bound to an old stream."""
    global _LOG_HANDLER
    root = logging.getLogger()
    if _LOG_HANDLER is not None:
        root.removeHandler(_LOG_HANDLER)
    _LOG_HANDLER = logging.StreamHandler(sys.stderr)
    _LOG_HANDLER.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _LOG_HANDLER.addFilter(storage.ScrubFilter())
    root.addHandler(_LOG_HANDLER)
    root.setLevel(logging.INFO)


def attach_inputs(cfg: JobConfig, args: argparse.Namespace):
    """Resolve ``--data-root`` / ``--labels`` / ``--limit`` into ``cfg.items`` (and ``cfg.labels``).

    Returns the ``pipeline.datasets.LabelledSource`` for an evaluation, else None.
    """
    from pipeline.datasets import open_labelled_source

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    so = cfg.storage_options
    if args.data_root:
        if not cfg.benchmark:
            raise ValueError("--data-root needs --benchmark NAME (the layout and classes to read)")
        if cfg.input:
            raise ValueError("give --input or --data-root, not both")
        src = open_labelled_source(cfg.benchmark, data_root=args.data_root, storage_options=so, limit=args.limit)
    elif args.labels:
        if not cfg.input:
            raise ValueError("--labels needs --input (the images to pair with the labels)")
        import rfclip
        vocab, extra = _vocabulary(cfg)
        if vocab is None:
            vocab = rfclip.benchmarks.BENCHMARKS[extra["benchmark"]].vocabulary
        image_uris = [it["image_uri"] for it in sources.resolve_inputs(cfg.input, so).items]
        src = open_labelled_source(labels=args.labels, image_uris=image_uris, class_names=[c[0] for c in vocab],
                                   ignore_index=args.ignore_index, storage_options=so, limit=args.limit)
    else:
        if args.limit is not None:
            if not cfg.input:
                raise ValueError("--input is required")
            cfg.items = sources.resolve_inputs(cfg.input, so).items[:args.limit]
        return None
    cfg.items, cfg.labels = labelled_job_inputs(src)
    return src


def finish(cfg: JobConfig, src) -> dict:
    """After a run: metrics + report for an evaluation, the pseudo-label report otherwise."""
    from pipeline.evaluation import finish_evaluation, finish_pseudo_labels

    so = cfg.storage_options
    if src is not None:
        return finish_evaluation(cfg.output, src, so, extra={"method": cfg.method, "model": cfg.model,
                                                             "weights": cfg.weights})
    run_doc = sinks.read_json(cfg.output, so, sinks.RUN_JSON) or {}
    report = finish_pseudo_labels(cfg.output, run_doc.get("runtime", {}).get("class_names", []), so)
    return {"report": storage.scrub(report)}


def main(argv: Optional[list] = None) -> int:
    """CLI entry point; returns the process exit status (2 for a clear user-facing error)."""
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = config_from_args(args)
        src = attach_inputs(cfg, args)
        summary = run(cfg)
        result = finish(cfg, src)
    except (FileNotFoundError, ValueError, PermissionError, ConfigMismatch, WeightsError) as exc:
        print(f"error: {storage.scrub(str(exc))}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    if src is not None:
        print(f"mIoU {result['mIoU']:.2f}  mAcc {result['mAcc']:.2f}  aAcc {result['aAcc']:.2f} over "
              f"{result['images']} images -> {storage.scrub(cfg.output)}/metrics.md, report.md")
    else:
        print(f"report: {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
