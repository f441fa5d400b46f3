"""The segmentation job's driver: ``run(JobConfig) -> summary dict``.

1. Resolve the inputs and check the output is writable (before any model or cluster work).
2. Probe the Segmenter once on CPU (``job_config.probe_segmenter``): a bad model, weights file or
   setting fails here.
3. Resume or start (``run_record.start_or_resume``): run.json, and the shards left to do.
4. Run the pending shards through Ray Data in windows: read + decode (CPU tasks), segment (an actor
   pool of ``pipeline.workers.SegmentWorker``), encode (CPU tasks). The driver buffers each shard's rows
   and commits the shard, whole, once all of them arrived (``sinks.commit_shard``).
5. Write summary.json.

Why the driver writes, not ``Dataset.write_parquet``: Ray Data writes a file per block under names of
its own, and a failed task may leave a partial one. A shard here is a unit of resume: it is committed
whole, once, under a fixed name, with its confusion matrix in its footer, so a re-run can skip exactly
the shards that are done. The rows that reach the driver hold label PNGs and statistics, not pixels.

``jobs/segment_dataset.py`` is the CLI over this; ``jobs/evaluate.py`` calls :func:`run` in-process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from . import run_record, sinks, sources, storage
from .job_config import JobConfig, probe_segmenter, segmenter_kwargs

log = logging.getLogger("segment_dataset")

REPO_ROOT = Path(__file__).resolve().parent.parent
# Retries of a model batch whose actor died (Ray Data's default is to retry forever, so one image that
# always kills its process would stall the job).
MODEL_TASK_RETRIES = 2


def run(cfg: JobConfig) -> dict:
    """Run the job end to end; returns the summary dict (also written as summary.json)."""
    t_start = time.time()
    storage.register_secrets(cfg.storage_options)
    if cfg.labels is not None:
        storage.register_secrets(cfg.labels.storage_options)

    inputs = _resolve_inputs(cfg)
    storage.check_writable(cfg.output, cfg.storage_options)
    shards = sources.make_shards(inputs.items, cfg.shard_size)
    log.info("%d images in %d shards of up to %d", len(inputs.items), len(shards), cfg.shard_size)

    seg_kw = segmenter_kwargs(cfg)
    probe = probe_segmenter(seg_kw)
    if cfg.labels is not None:
        if cfg.labels.num_classes != probe["num_classes"]:
            raise ValueError(f"labels have {cfg.labels.num_classes} classes but the vocabulary has {probe['num_classes']}")
        check_first_label(cfg.labels, inputs.items, _label_storage_options(cfg))
    sha = (probe["config"].get("weights") or {}).get("sha256")
    if sha and not seg_kw.get("weights_sha256"):
        seg_kw["weights_sha256"] = sha  # every worker must load exactly the weights recorded in run.json
    identity = run_record.identity(cfg, inputs, probe["config"])

    resume = run_record.start_or_resume(cfg, shards, identity, probe)
    pending = resume.pending
    skipped = sum(len(s.items) for s in shards) - sum(len(s.items) for s in pending)
    log.info("%d shards already committed (%d images skipped), %d to do", len(shards) - len(pending), skipped, len(pending))

    counts = {"ok": 0, "error": 0, "duplicates_dropped": 0, "decoded_in_model_process": 0,
              "images_that_killed_a_worker": 0}
    executions: set[str] = set()           # JSON of each distinct Segmenter.execution() the workers reported
    t_pipe = time.time()
    if pending:
        # Pending shards run in windows of about ``window_images`` images, one Ray Data execution
        # each, so the driver and the object store hold one window's rows, not the whole corpus.
        config_sha256 = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
        total_images = skipped + sum(len(s.items) for s in pending)
        started_ray = _init_ray(cfg.ray_address)
        try:
            for window in shard_windows(pending, cfg.window_images):
                _run_window(cfg, window, inputs, probe, seg_kw, config_sha256, counts, executions,
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
        "shards_redone_damaged": sorted(resume.redone),
        # The whole output, committed before this run or by it: a resume that had nothing to do still says
        # what the output holds.
        "output": {"images": skipped + done,
                   "ok": counts["ok"] + sum(int(m.get("ok", 0)) for m in resume.committed.values()),
                   "error": counts["error"] + sum(int(m.get("error", 0)) for m in resume.committed.values())},
        "duplicate_rows_dropped": counts["duplicates_dropped"],
        "duplicate_inputs_dropped": inputs.duplicates_dropped,
        "rows_decoded_in_model_process": counts["decoded_in_model_process"],
        "images_that_killed_a_worker": counts["images_that_killed_a_worker"],
        "execution": [json.loads(e) for e in sorted(executions)],
        "wall_time_s": round(wall, 3), "pipeline_time_s": round(time.time() - t_pipe, 3),
        "images_per_second": round(done / wall, 3) if wall > 0 else None,
        "finished_at": run_record.now(),
    }
    sinks.write_json(cfg.output, cfg.storage_options, sinks.SUMMARY_JSON, summary)
    log.info("done: %s", json.dumps(summary))
    return summary


class PipelineError(RuntimeError):
    """A stage of the pipeline failed for a reason other than bad input; committed shards are kept."""


class LabelError(ValueError):
    """A ground-truth label that can't be scored: an evaluation stops rather than score fewer images."""


def check_first_label(labels, items: list[dict], storage_options: Optional[dict] = None) -> None:
    """Read and decode the first item's label in the driver and check its values, before any model
    work: a whole split decoded with the wrong ``--ignore-index`` fails in seconds, not after the run.

    Raises :class:`LabelError` for a label that can't be read or decoded, or that has values outside
    ``[0, K)`` other than the ignore index. ``storage_options``: fsspec options to read labels with.
    """
    from .storage import read_uris

    first = next((it for it in items if it.get("label_uri")), None)
    if first is None:
        return
    uri = str(first["label_uri"])
    data = read_uris([uri], storage_options)[0]
    try:
        if isinstance(data, BaseException):
            raise data
        gt = np.asarray(labels.decode_label(data))
    except Exception as exc:  # noqa: BLE001 - said with the file's name
        raise LabelError(f"label {storage.scrub(uri)} can't be scored ({type(exc).__name__}): {exc}") from exc
    k, ignore = labels.num_classes, labels.ignore_index
    bad = np.unique(gt[(gt != ignore) & ((gt < 0) | (gt >= k))])
    if bad.size:
        raise LabelError(f"label {storage.scrub(uri)} has values {bad[:10].tolist()} outside the {k} classes "
                         f"(0..{k - 1}) and not the ignore index {ignore}; if they mark unlabelled pixels, pass "
                         f"--ignore-index VALUE")


def _label_storage_options(cfg: JobConfig) -> Optional[dict]:
    """fsspec options for the labels: their own, else the job's."""
    if cfg.labels is not None and cfg.labels.storage_options is not None:
        return cfg.labels.storage_options
    return cfg.storage_options


def _resolve_inputs(cfg: JobConfig) -> sources.Inputs:
    """The sorted, de-duplicated inputs: ``cfg.items`` (evaluation) or the listing of ``cfg.input``."""
    if cfg.items is not None:
        inputs = sources.inputs_from_items([{"image_uri": it["image_uri"], "label_uri": it.get("label_uri"),
                                             **({"error": it["error"]} if it.get("error") else {})}
                                            for it in cfg.items], cfg.input_root)
        if not inputs.items:
            raise ValueError("no input items given")
        return inputs
    return list_input(cfg)


def list_input(cfg: JobConfig) -> sources.Inputs:
    """The images of ``cfg.input``; an output inside the input folder is not listed (see ``resolve_inputs``)."""
    if not cfg.input:
        raise ValueError("--input is required")
    return sources.resolve_inputs(cfg.input, cfg.storage_options, exclude=cfg.output)


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


def _ray_address(address: Optional[str]) -> Optional[str]:
    """The cluster to connect to: ``address`` (``--ray-address``), else ``$RAY_ADDRESS``; None: none."""
    return address or os.environ.get("RAY_ADDRESS") or None


def _init_ray(address: Optional[str]) -> bool:
    """Connect to ``address`` / ``$RAY_ADDRESS`` (``ray job submit`` sets it), else start an in-process
    local Ray. Returns True if this call started Ray (so the job shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = _ray_address(address)
    if address:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": never attach to some other cluster found in /tmp/ray by accident. The workers
        # import this repository's packages; the user's own PYTHONPATH entries follow.
        path = os.pathsep.join([str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        ray.init(address="local", runtime_env={"env_vars": {"PYTHONPATH": path}})
    return True


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds, naming the flag, when a ``host:port`` (or ``ray://host:port``) cluster address takes
    no connection: ray.init would retry the GCS for minutes. ``auto`` and other forms are left to Ray."""
    import socket

    if address.startswith(("http://", "https://")):
        raise ValueError(f"--ray-address / $RAY_ADDRESS {address} is a dashboard address (what `ray job submit` "
                         f"takes); the job connects to the cluster itself: give host:6379, ray://host:10001, or auto")
    hostport = address.split("://", 1)[1] if address.startswith("ray://") else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ValueError(f"can't reach the Ray cluster at {address} (--ray-address, else $RAY_ADDRESS): "
                              f"{exc.strerror or exc}") from None


def _default_workers(cfg: JobConfig) -> tuple[int, float, float]:
    """``(model actors, GPUs per actor, CPUs per actor)``: by default one actor per GPU, else one CPU actor;
    each reserves 1 CPU, or on a local Ray too small for that, what leaves one CPU to decode and encode."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    gpw = cfg.num_gpus_per_worker if cfg.num_gpus_per_worker is not None else (1.0 if gpus > 0 else 0.0)
    address = _ray_address(cfg.ray_address)
    if gpus == 0 and cfg.num_gpus_per_worker is None and address and address != "local":
        # The defaults count the GPUs up now; an autoscaler starts GPU nodes only for actors that ask.
        log.warning("the cluster has no GPU now, so the model runs on CPU; on an autoscaling cluster pass "
                    "--num-gpus-per-worker 1 --workers N to ask for N GPU nodes")
    workers = int(cfg.workers) if cfg.workers is not None else (max(1, int(gpus // gpw)) if gpw > 0 else 1)
    cpw = 1.0 if cfg.cpus_per_worker is None else float(cfg.cpus_per_worker)
    if address and address != "local":
        return workers, gpw, cpw
    # A local Ray has no autoscaler: actors asking for more than the machine has would wait forever, and
    # so would the decode and encode tasks (1 CPU each) if the actors held every CPU.
    cpus = float(ray.cluster_resources().get("CPU", 0))
    if workers * gpw > gpus:
        raise ValueError(f"{workers} workers x --num-gpus-per-worker {gpw:g} ask for {workers * gpw:g} GPUs, "
                         f"and this machine's Ray has {gpus:g}; pass fewer --workers, or "
                         f"--num-gpus-per-worker 0 to run the model on CPU")
    if cpus < 1:
        raise ValueError(f"this machine's Ray has {cpus:g} CPUs, and the decode and encode tasks need 1")
    if cfg.cpus_per_worker is None and workers * cpw > cpus - 1:
        cpw = (cpus - 1) / workers
        log.info("%d model workers reserve %.3g CPUs each, leaving one of this machine's %g to decode and encode",
                 workers, cpw, cpus)
    if workers * cpw > cpus - 1:
        raise ValueError(f"{workers} workers x --cpus-per-worker {cpw:g} ask for {workers * cpw:g} CPUs, and this "
                         f"machine's Ray has {cpus:g}, of which the decode and encode tasks need 1; pass fewer "
                         f"--workers or a smaller --cpus-per-worker (0 lets the actors share the CPUs)")
    return workers, gpw, cpw


def decode_memory(max_pixels: int) -> int:
    """Bytes a decode task reserves: one worst-case image, its file's bytes plus RGB and float resize buffers.
    The task holds the files of its whole batch at once; typical files are far smaller than the worst case."""
    from rfclip.decode import max_file_bytes
    return int(max_pixels) * 3 * 6 + max_file_bytes(max_pixels)


def _check_decode_memory(cfg: JobConfig) -> None:
    """Refuse, on a local Ray, a ``--max-pixels`` whose decode tasks no node could hold: they would wait
    forever. A cluster's autoscaler may still start a bigger node, so there it is a warning."""
    import ray

    need = decode_memory(cfg.max_pixels)
    biggest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if need <= biggest:
        return
    message = (f"--max-pixels {cfg.max_pixels} makes each decode task reserve {need / 2**30:.1f} GiB, and the "
               f"largest node has {biggest / 2**30:.1f} GiB for tasks; lower --max-pixels")
    address = _ray_address(cfg.ray_address)
    if address and address != "local":
        log.warning("%s, or the tasks wait for a node that large", message)
    else:
        raise ValueError(message)


def _build_dataset(cfg: JobConfig, rows: list[dict], probe: dict, seg_kw: dict, workers: int, gpw: float,
                   cpw: float):
    """The Ray Data chain over ``rows``: decode (CPU tasks) -> segment (actor pool) -> encode (CPU tasks)."""
    import ray.data

    from .workers import SegmentWorker, decode_stage, encode_stage

    blocks = max(1, min(20000, math.ceil(len(rows) / cfg.decode_batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    # The decode tasks reserve heap memory for one worst-case image (its file, RGB + float resize buffers).
    # That also keeps Ray Data from fusing decoding into the model actor (it fuses task->actor
    # maps whose remote args are equal): decoding must stay in CPU tasks so the model never waits
    # on it. summary["rows_decoded_in_model_process"] checks that it did.
    ds = ds.map_batches(decode_stage, batch_size=cfg.decode_batch_size, num_cpus=1,
                        memory=decode_memory(cfg.max_pixels),
                        fn_kwargs=dict(storage_options=cfg.storage_options, max_pixels=cfg.max_pixels,
                                       short_side=probe["short_side"], max_long_side=probe["max_long_side"]))
    with warnings.catch_warnings():
        # Ray 2.60 names no parameter for an actor's task retries, and warns of any ray_remote_args.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map_batches(SegmentWorker, batch_size=cfg.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=workers),
                            num_gpus=gpw, num_cpus=cpw, max_task_retries=MODEL_TASK_RETRIES,
                            fn_constructor_kwargs={"segmenter_kwargs": seg_kw})
    lab = cfg.labels
    return ds.map_batches(encode_stage, batch_size=cfg.decode_batch_size, num_cpus=1,
                          fn_kwargs=dict(num_classes=probe["num_classes"], output_uri=cfg.output,
                                         storage_options=cfg.storage_options, save_masks=cfg.save_masks,
                                         decode_label=lab.decode_label if lab else None,
                                         label_storage_options=_label_storage_options(cfg),
                                         ignore_index=lab.ignore_index if lab else 255))


def _run_window(cfg: JobConfig, pending: list, inputs: sources.Inputs, probe: dict, seg_kw: dict,
                config_sha256: str, counts: dict, executions: set, done_before: int, total: int) -> None:
    """Ray Data executions over the shards in ``pending`` (Ray already initialised).

    Commits each shard as soon as all its rows arrived. Adds to ``counts``, and the distinct
    ``execution`` values of the workers' rows to ``executions``.

    A batch whose model process keeps dying (the OOM killer, a native crash) is given up after
    :data:`MODEL_TASK_RETRIES` retries instead of Ray Data's endless ones, and the rest of the window
    goes on. Its images then run again one at a time; an image that still kills its process becomes an
    error row that says so, and its batch-mates are segmented.
    """
    import dataclasses

    import ray.data
    from tqdm import tqdm

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = cfg.progress
    workers, gpw, cpw = _default_workers(cfg)
    _check_decode_memory(cfg)
    rows = [{"image_uri": it["image_uri"], "label_uri": it.get("label_uri") or "",
             "image_id": sources.image_id(it["image_uri"], inputs.root), "shard": s.index, "pos": pos,
             "listing_error": it.get("error") or ""}
            for s in pending for pos, it in enumerate(s.items)]
    log.info("pipeline: %d images, %d model workers (%g GPU, %g CPU each, batch %d)", len(rows), workers, gpw, cpw,
             cfg.batch_size)

    by_index = {s.index: s for s in pending}
    buffers: dict[int, dict[int, dict]] = {}
    done_shards: set[int] = set()
    bar = tqdm(total=total, initial=done_before, unit="img", desc="segmented", disable=not cfg.progress,
               mininterval=1.0 if sys.stderr.isatty() else 10.0, dynamic_ncols=True)
    t0 = time.time()
    processed_at_start = counts["ok"] + counts["error"]

    def take(r: dict) -> None:
        """Buffer one row; commit its shard when the shard is whole."""
        si, pos = int(r["shard"]), int(r["pos"])
        if si in done_shards or pos in buffers.get(si, {}):
            counts["duplicates_dropped"] += 1
            log.warning("duplicate row for %s (shard %d) dropped", r["image_uri"], si)
            return
        buf = buffers.setdefault(si, {})
        buf[pos] = r
        bar.update(1)
        if int(r["decode_pid"]) == int(r["model_pid"]):
            counts["decoded_in_model_process"] += 1
        shard = by_index[si]
        if len(buf) == len(shard.items):
            _commit(cfg, shard, buffers.pop(si), config_sha256, probe["num_classes"], counts, executions)
            done_shards.add(si)
            in_window = counts["ok"] + counts["error"] - processed_at_start
            log.info("%s committed; %d/%d images done, %.2f img/s", shard.name, done_before + in_window,
                     total, in_window / max(time.time() - t0, 1e-9))

    def consume(run_cfg: JobConfig, run_rows: list) -> None:
        ds = _build_dataset(run_cfg, run_rows, probe, seg_kw, workers, gpw, cpw)
        # Closed in the finally, while Ray is up: an exception (Ctrl-C) leaving this frame keeps its locals
        # alive in the traceback past ray.shutdown(), and the generator's cleanup (executor shutdown, stats
        # update) must not run against no Ray, where a Ray call may start a new local one.
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
        try:
            for batch in batches:
                keys = list(batch)
                for j in range(len(batch["image_uri"])):
                    take({k: batch[k][j] for k in keys})
                causes.raise_on_exceptions()     # a stage's own exception stops the window now, not at its end
        finally:
            batches.close()

    def missing() -> list:
        return [r for r in rows if r["shard"] not in done_shards and r["pos"] not in buffers.get(r["shard"], {})]

    # A block whose task failed for good is skipped, and Ray Data logs why: `causes` reads those records.
    # Only a process that died (OOM killer, native crash) makes images "lost"; any other exception (a bug,
    # a failed write) stops the job as it did before, its shard uncommitted, so a re-run redoes it.
    errored_blocks = context.max_errored_blocks
    context.max_errored_blocks = -1
    causes = _BlockFailures()
    ray_data_log = logging.getLogger("ray.data")
    ray_data_log.addHandler(causes)
    try:
        consume(cfg, rows)
        lost = missing()
        causes.check(len(lost))
        if lost and not buffers and not done_shards:
            raise PipelineError(f"every batch of this window lost its process ({causes.deaths[0]}): the model "
                               f"may not fit the workers' memory; the shards committed so far are kept")
        if lost:
            log.warning("%d images were in batches whose process died on every try (out of memory? a crash?); "
                        "running them again one image per batch", len(lost))
            consume(dataclasses.replace(cfg, batch_size=1, decode_batch_size=1), lost)
            causes.check(len(missing()))
        for r in missing():
            log.error("%s: its process died on every try, alone in its batch; written as an error row",
                      r["image_uri"])
            counts["images_that_killed_a_worker"] += 1
            take(_lost_row(r, causes.deaths[-1]))
    finally:
        ray_data_log.removeHandler(causes)
        context.max_errored_blocks = errored_blocks
        bar.close()
    if buffers or len(done_shards) != len(pending):          # take() commits every shard that is whole
        raise RuntimeError(f"pipeline ended with incomplete shards: {sorted(set(by_index) - done_shards)[:10]}")


# What a process that died looks like in Ray: the OOM killer, a segfault, a lost node.
_PROCESS_DEATHS = ("RayActorError", "WorkerCrashedError", "OutOfMemoryError", "NodeDiedError",
                   "LocalRayletDiedError")


class _BlockFailures(logging.Handler):
    """Collects the failures Ray Data logs as it skips a block (``max_errored_blocks``): ``deaths`` (a
    process died) and ``others`` (any other exception, e.g. the UDF's own)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.deaths: list[str] = []
        self.others: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Ray Data reports a skipped block only in this log record (no API says why a block failed); the
        # tests that kill a model actor and make a stage raise (tests/test_job_resume.py) pin its wording.
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or "raised from a task of operator" not in record.getMessage():
            return
        names = {c.__name__ for c in type(exc).__mro__}
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        text = f"{type(cause).__name__}: {storage.scrub(str(cause))[:300]}"
        (self.deaths if names & set(_PROCESS_DEATHS) else self.others).append(text)

    def raise_on_exceptions(self) -> None:
        """Raise if a block was skipped for an exception other than its process dying."""
        if self.others:
            raise PipelineError(f"a pipeline stage failed ({self.others[0]}); the shards committed so far are "
                               f"kept, and running the same command again redoes the rest")

    def check(self, missing: int) -> None:
        """Raise unless every skipped block is explained by a process that died."""
        self.raise_on_exceptions()
        if missing and not self.deaths:
            raise PipelineError(f"the pipeline ended with {missing} images missing and no failure recorded; the "
                               f"shards committed so far are kept, and running the same command again redoes the rest")


def _lost_row(r: dict, cause: str) -> dict:
    """The error row of an image whose process died every time it was segmented, alone or not."""
    reason = (f"failed: the process handling this image died on every try, with it alone in its batch (killed "
              f"for memory? a native crash?), last as {cause}; see the Ray worker logs")
    return {**r, "width": 0, "height": 0, "status": "error", "error": r["listing_error"] or reason,
            "mask_png": b"", "class_pixels": b"", "confusion": b"", "mean_confidence": np.nan, "elapsed_ms": 0.0,
            "decode_pid": -1, "model_pid": -2, "execution": ""}


def _to_parquet_row(r: dict) -> dict:
    """A row of ``sinks.PREDICTION_SCHEMA`` from one row of the encode stage (numpy scalars and bytes)."""
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


def _commit(cfg: JobConfig, shard, rows_by_pos: dict, config_sha256: str, num_classes: int, counts: dict,
            executions: set) -> None:
    """Write one shard whole (its rows in input order, its metadata, and its confusion matrix when labelled)."""
    rows = [rows_by_pos[p] for p in range(len(shard.items))]
    for p, r in enumerate(rows):  # the row must be the image the shard expects at that position
        if str(r["image_uri"]) != shard.items[p]["image_uri"]:
            raise RuntimeError(f"{shard.name}[{p}]: got {r['image_uri']!r}, expected {shard.items[p]['image_uri']!r}")
    if cfg.labels is not None:
        for r in rows:
            if r["status"] != "ok" and str(r["error"]).startswith("label failed"):
                raise LabelError(
                    f"label {storage.scrub(str(r.get('label_uri')))} of {storage.scrub(str(r['image_uri']))}: "
                    f"{r['error']}. An evaluation stops here rather than leave the image out of the metrics. "
                    f"Fix the label file and run the same command again (the shards committed so far are "
                    f"kept, this one is not); a different --ignore-index needs --overwrite once shards are "
                    f"committed")
    out_rows = [_to_parquet_row(r) for r in rows]
    ran = sorted({str(r["execution"]) for r in rows if str(r["execution"])})   # "": a row no worker returned
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
            "committed_at": run_record.now()}
    sinks.commit_shard(cfg.output, cfg.storage_options, shard.name, out_rows, meta, confusion)
    counts["ok"] += ok
    counts["error"] += len(rows) - ok
