"""The segmentation job's driver: ``run(JobConfig) -> summary dict``.

1. Resolve the inputs and check the output is writable (before any model or cluster work).
2. Probe the Segmenter once on CPU (``job_config.probe_segmenter``): a bad model, weights file or
   setting fails here.
3. Resume or start (``run_record.start_or_resume``): run.json, and the shards left to do.
4. Run the pending shards through Ray Data in windows: read + decode (CPU tasks), segment (an actor
   pool of ``pipeline.workers.SegmentWorker``), encode (CPU tasks). The driver buffers each shard's rows
   and commits the shard, whole, once all of them arrived (``pipeline.shard_commits.ShardAssembler``).
5. Write summary.json.

Why the driver writes, not ``Dataset.write_parquet``: Ray Data writes a file per block under names of
its own, and a failed task may leave a partial one. A shard here is a unit of resume: it is committed
whole, once, under a fixed name, with its confusion matrix in its footer, so a re-run can skip exactly
the shards that are done. The rows that reach the driver hold label PNGs and statistics, not pixels.

``pipeline.cluster`` connects to Ray and sizes the actors and tasks. ``jobs/segment_dataset.py`` is the CLI over this; ``jobs/evaluate.py`` calls :func:`run` in-process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sys
import time
import warnings
from typing import Optional

import numpy as np
from rfclip.visualize import first_is_background

from . import cluster, run_record, sinks, sources, storage
from .job_config import JobConfig, LabelError, probe_segmenter, segmenter_kwargs
from .shard_commits import ShardAssembler, lost_row

log = logging.getLogger("segment_dataset")
# Retries of a model batch whose actor died (Ray Data's default is to retry forever, so one image that
# always kills its process would stall the job).
MODEL_TASK_RETRIES = 2


def run(cfg: JobConfig) -> dict:
    """Run the job end to end; returns the summary dict (also written as summary.json)."""
    t_start = time.time()
    storage.register_secrets(cfg.storage_options)
    storage.register_url_secrets(cfg.weights, cfg.input, cfg.output, cfg.vocabulary_file)
    if cfg.labels is not None:
        storage.register_secrets(cfg.labels.storage_options)

    inputs = _resolve_inputs(cfg)
    created = storage.check_writable(cfg.output, cfg.storage_options)
    try:
        return _run(cfg, inputs, t_start)
    except BaseException:
        # A run refused before it wrote anything (a bad model or setting, a label check, Ctrl-C) leaves no
        # empty output folder behind.
        storage.remove_empty_folders(storage.get_fs(cfg.output, cfg.storage_options)[0], created)
        raise


def _run(cfg: JobConfig, inputs: sources.Inputs, t_start: float) -> dict:
    """:func:`run` once the inputs are listed and the output is known to be writable."""
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

    counts = {"ok": 0, "error": 0, "duplicates_dropped": 0, "decoded_in_model_process": 0,
              "images_that_killed_a_worker": 0}
    executions: set[str] = set()           # JSON of each distinct Segmenter.execution() the workers reported
    started_ray = False
    try:
        if cfg.overwrite and shards:
            # Every shard runs again: the cluster is checked before the old outputs go, so a run it refuses
            # (no cluster there, workers it can't hold, too large a --max-pixels) leaves them as they were.
            started_ray = cluster.init_ray(cfg.ray_address)
            cluster.model_workers(cfg)
            cluster.check_decode_memory(cfg)
        resume = run_record.start_or_resume(cfg, shards, identity, probe)
        pending = resume.pending
        skipped = sum(len(s.items) for s in shards) - sum(len(s.items) for s in pending)
        log.info("%d shards already committed (%d images skipped), %d to do", len(shards) - len(pending), skipped,
                 len(pending))
        t_pipe = time.time()
        if pending:
            # Pending shards run in windows of about ``window_images`` images, one Ray Data execution
            # each, so the driver and the object store hold one window's rows, not the whole corpus.
            config_sha256 = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
            total_images = skipped + sum(len(s.items) for s in pending)
            started_ray = cluster.init_ray(cfg.ray_address) or started_ray
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
        "shards_retried_for_errors": resume.retried,
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
    log.info("done: %d ok, %d error rows, %d images skipped as already done, in %.1f s (%s written)",
             counts["ok"], counts["error"], skipped, wall, sinks.SUMMARY_JSON)
    return summary


class PipelineError(RuntimeError):
    """A stage of the pipeline failed for a reason other than bad input; committed shards are kept."""


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
                        memory=cluster.decode_memory(cfg.max_pixels),
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
                                         ignore_index=lab.ignore_index if lab else 255,
                                         background_first=first_is_background(probe["class_names"])))


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
    import ray.data
    from tqdm import tqdm

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = cfg.progress
    workers, gpw, cpw = cluster.model_workers(cfg)
    cluster.check_decode_memory(cfg)
    rows = _window_rows(pending, inputs)
    log.info("pipeline: %d images, %d model workers (%g GPU, %g CPU each, batch %d)", len(rows), workers, gpw, cpw,
             cfg.batch_size)

    bar = tqdm(total=total, initial=done_before, unit="img", desc="segmented", disable=not cfg.progress,
               mininterval=1.0 if sys.stderr.isatty() else 10.0, dynamic_ncols=True)
    t0 = time.time()
    processed_at_start = counts["ok"] + counts["error"]

    def committed(shard) -> None:
        in_window = counts["ok"] + counts["error"] - processed_at_start
        log.info("%s committed; %d/%d images done, %.2f img/s since this window started", shard.name,
                 done_before + in_window, total, in_window / max(time.time() - t0, 1e-9))

    shards = ShardAssembler(cfg, pending, config_sha256, probe["num_classes"], counts, executions,
                            on_row=lambda: bar.update(1), on_commit=committed)

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
                    shards.take({k: batch[k][j] for k in keys})
                causes.raise_on_exceptions()     # a stage's own exception stops the window now, not at its end
        finally:
            batches.close()

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
        _rerun_lost(cfg, shards.missing(rows), shards, causes, consume, counts)
    finally:
        ray_data_log.removeHandler(causes)
        context.max_errored_blocks = errored_blocks
        bar.close()
    if shards.incomplete():                                  # take() commits every shard that is whole
        raise RuntimeError(f"pipeline ended with incomplete shards: {shards.incomplete()[:10]}")


def _window_rows(pending: list, inputs: sources.Inputs) -> list[dict]:
    """One row per image of the shards in ``pending``, in shard order: its URIs, ``image_id``, ``shard`` and
    ``pos`` (its index in the shard), and the listing's error for it ("" if none)."""
    return [{"image_uri": it["image_uri"], "label_uri": it.get("label_uri") or "",
             "image_id": inputs.ids[it["image_uri"]], "shard": s.index, "pos": pos,
             "listing_error": it.get("error") or ""}
            for s in pending for pos, it in enumerate(s.items)]


def _rerun_lost(cfg: JobConfig, lost: list, shards: ShardAssembler, causes: _BlockFailures, consume,
                counts: dict) -> None:
    """After a window's pass: the images ``lost`` with a batch whose process died on every try run again one
    per batch (``consume(cfg, rows)``); those that still kill their process become error rows.

    Raises PipelineError where a block failed for another reason, where rows are missing with no death
    recorded, or where every batch of the window died (the model may not fit the workers' memory)."""
    import dataclasses

    causes.check(len(lost))
    if lost and not shards.any_arrived():
        raise PipelineError(f"every batch of this window lost its process ({causes.deaths[0]}): the model "
                            f"may not fit the workers' memory; the shards committed so far are kept")
    if not lost:
        return
    log.warning("%d images were in batches whose process died on every try (out of memory? a crash?); "
                "running them again one image per batch", len(lost))
    consume(dataclasses.replace(cfg, batch_size=1, decode_batch_size=1), lost)
    causes.check(len(shards.missing(lost)))
    for r in shards.missing(lost):
        log.error("%s: its process died on every try, alone in its batch; written as an error row",
                  r["image_uri"])
        counts["images_that_killed_a_worker"] += 1
        shards.take(lost_row(r, causes.deaths[-1]))


# What a process that died looks like in Ray: the OOM killer, a segfault, a lost node.
_PROCESS_DEATHS = ("RayActorError", "WorkerCrashedError", "OutOfMemoryError", "NodeDiedError",
                   "LocalRayletDiedError")


# The last line of a Python traceback: "module.Name: message".
_TRACEBACK_ERROR = re.compile(r"^((?:[A-Za-z_]\w*\.)*)([A-Za-z_]\w*): (.+)$")


def own_error_text(exc: BaseException) -> str:
    """``"Name: message"`` of the first exception in ``exc``'s chain that is not Ray's wrapper of it (a task's
    RayTaskError, Ray Data's UserCodeException). A wrapper from another process carries its causes only as
    the text of their traceback: there it is the last error line not from ``ray.``."""
    current, seen = exc, 0
    while current is not None and seen < 8:
        if not type(current).__module__.startswith("ray."):
            return f"{type(current).__name__}: {current}"
        nxt = current.__cause__ or getattr(current, "cause", None)
        current, seen = (nxt if isinstance(nxt, BaseException) else None), seen + 1
    lines = [m for m in map(_TRACEBACK_ERROR.match, str(exc).splitlines())
             if m and not m.group(1).startswith("ray.") and m.group(2)[0].isupper()]
    return f"{lines[-1].group(2)}: {lines[-1].group(3)}" if lines else f"{type(exc).__name__}: {exc}"


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
        text = storage.scrub(own_error_text(exc))[:300]
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
