"""Evaluate every benchmark x method pair and write one comparison table (papers' Table 2 layout).

    python jobs/evaluate.py --data-root data/ --benchmarks voc21,ade20k --methods rfclip,clearclip \
        --model ViT-B-16 --weights openai --output out/eval [--limit N]

Each pair is one in-process run of the segmentation job (``pipeline.job.run(JobConfig)``) fed with the
benchmark's (image, label) pairs (``pipeline.datasets``) and the method's published settings for
that benchmark (``benchmark=`` preset), written to ``OUT/<benchmark>/<method>/`` with its own
metrics.json / metrics.md / report.md; a re-run resumes each pair. Then ``OUT/comparison.md`` and
``OUT/comparison.json`` hold measured vs published mIoU with image counts. A pair that fails is
shown as failed (error in the JSON) and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import posixpath
import sys
from pathlib import Path
from typing import Optional, Sequence

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(_REPO))


from pipeline import cluster, storage  # noqa: E402
from rfclip.cli_args import (DefaultsHelpFormatter, add_model_arguments, non_negative_float,  # noqa: E402
                             positive_int)
from pipeline.comparison import build_comparison, comparison_markdown  # noqa: E402
from pipeline.datasets import open_labelled_source  # noqa: E402
from pipeline.evaluation import finish_evaluation  # noqa: E402
from pipeline.job import run  # noqa: E402
from pipeline.job_config import JobConfig, LabelError, labelled_job_inputs  # noqa: E402
from pipeline.run_record import EXECUTION_SETTINGS, ConfigMismatch  # noqa: E402
from rfclip.weights import WeightsError, public_spec  # noqa: E402
from pipeline.published import TABLE_ORDER  # noqa: E402

log = logging.getLogger("evaluate")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--data-root", required=True, help="MMSegmentation-style data/ folder (path or fsspec URI)")
    p.add_argument("--benchmarks", required=True, help=f"comma-separated, from {','.join(TABLE_ORDER)}")
    p.add_argument("--methods", required=True, help="comma-separated method names (rfclip, clearclip, ...)")
    p.add_argument("--output", required=True, help="output folder; pair B x M goes to OUTPUT/B/M")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images of each benchmark")
    add_model_arguments(p, method=False, device=False)          # --setting applies to every pair
    p.add_argument("--storage-options", default=None,
                   help="fsspec options for --data-root/--output as JSON or @file.json (default: "
                        "$RFCLIP_STORAGE_OPTIONS, else the standard credential chain)")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="images per Parquet shard (the unit of resume)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per model call")
    p.add_argument("--workers", type=positive_int, default=None, help="model actors (default: one per GPU, else 1)")
    p.add_argument("--num-gpus-per-worker", type=non_negative_float, default=None, help="default 1 where GPUs exist, else 0")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--overwrite", action="store_true", help="redo every pair from scratch")
    p.add_argument("--retry-errors", action="store_true",
                   help="run again each pair's committed shards that hold error rows; the others are kept")
    args = p.parse_args(argv)
    args.benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [b for b in args.benchmarks if b not in TABLE_ORDER]
    if unknown:
        p.error(f"unknown benchmarks {unknown}; choose from {','.join(TABLE_ORDER)}")
    from rfclip.methods import available_methods
    unknown = [m for m in args.methods if m not in available_methods()]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {','.join(available_methods())}")
    args.settings = dict(args.setting)
    return args


def evaluate_pair(args, benchmark: str, method: str, so: dict) -> dict:
    """Run one benchmark x method into OUT/benchmark/method; return its metrics.json content."""
    out = posixpath.join(args.output.rstrip("/"), benchmark, method)
    src = open_labelled_source(benchmark, data_root=args.data_root, storage_options=so, limit=args.limit)
    items, labels = labelled_job_inputs(src)
    cfg = JobConfig(output=out, storage_options=so or None, benchmark=benchmark, method=method,
                    model=args.model, weights=args.weights, weights_sha256=args.weights_sha256,
                    quick_gelu=args.quick_gelu, image_mean=args.image_mean, image_std=args.image_std,
                    precision=args.precision, settings=_settings_for(method, args.settings), shard_size=args.shard_size,
                    batch_size=args.batch_size, workers=args.workers, num_gpus_per_worker=args.num_gpus_per_worker,
                    ray_address=args.ray_address, overwrite=args.overwrite, retry_errors=args.retry_errors,
                    items=items, input_root=src.root, labels=labels)
    run(cfg)
    extra = {"method": method, "model": args.model, "weights": public_spec(args.weights), "limit": args.limit}
    result = finish_evaluation(out, src, so, extra=extra)    # its images_failed counts every committed shard
    if result["images_failed"]:
        log.warning("%s x %s: %d images could not be segmented and are not scored (see %s/metrics.md)",
                    benchmark, method, result["images_failed"], out)
    return result


def _settings_for(method: str, settings: dict) -> dict:
    """``--setting`` values for ``method``: those only other methods use (``distraction_dims`` for ``clip``)
    are left out, so one command can set them for the methods that use them, without a warning per
    worker of the others (main logs them once)."""
    from rfclip.settings import unused_settings

    unused = set(unused_settings(method, settings))
    return {k: v for k, v in settings.items() if k not in unused}


def _has_metrics(fs, root: str, benchmark: str, method: str) -> bool:
    """Whether the pair's folder holds metrics.md (False where the store can't say: the note is a hint)."""
    return _exists(fs, posixpath.join(root, benchmark, method, "metrics.md"))


def _exists(fs, path: str) -> bool:
    """``fs.exists(path)``, False where the store can't say."""
    try:
        return fs.exists(path)
    except storage.STORAGE_ERRORS:
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    storage.setup_logging()                               # secrets scrubbed, as in the segmentation job
    args = parse_args(argv)
    try:
        so = storage.storage_options_arg(args.storage_options) or {}
    except (OSError, ValueError) as exc:
        print(f"error: --storage-options: {exc}", file=sys.stderr)
        return 2
    storage.register_secrets(so)
    storage.register_url_secrets(args.data_root, args.output, args.weights)
    for b in args.benchmarks:              # every dataset is found before the first pair runs
        try:
            open_labelled_source(b, data_root=args.data_root, storage_options=so, limit=args.limit)
        except (*storage.STORAGE_ERRORS, ValueError) as exc:
            known = isinstance(exc, (OSError, ValueError))
            print(f"error: {'' if known else type(exc).__name__ + ': '}{storage.scrub(str(exc))}", file=sys.stderr)
            return 2
    import ray

    had_ray, fs, created = ray.is_initialized(), None, []
    try:
        try:          # the weights, the output and the cluster are checked once, before any pair runs
            fs, root = storage.get_fs(args.output.rstrip("/"), so)
            _check_weights(args, so)
            created = storage.check_writable(args.output, so)
            cluster.init_ray(args.ray_address)      # one Ray for every pair (a local one takes seconds to start)
        except (*storage.STORAGE_ERRORS, ValueError, TypeError, RuntimeError) as exc:  # ConnectionError: no cluster
            known = isinstance(exc, (OSError, ValueError, WeightsError))
            print(f"error: {'' if known else type(exc).__name__ + ': '}{storage.scrub(str(exc))}", file=sys.stderr)
            if created:
                storage.remove_empty_folders(fs, created)
            return 2
        for m in args.methods:
            unused = sorted(set(args.settings) - set(_settings_for(m, args.settings)))
            if unused:
                log.info("--setting %s: not used by %s, left out of its runs", ", ".join(unused), m)
        status, md = _evaluate_all(args, so, fs, root)
    except KeyboardInterrupt:
        if created:
            storage.remove_empty_folders(fs, created)         # only those still empty
        if args.overwrite:
            # Each pair clears its own outputs when it starts: the pairs this run finished, and the shards
            # committed so far, are this configuration's, and --overwrite again would redo them.
            print("interrupted: the pairs finished and the shards committed so far are kept; run the command "
                  "again without --overwrite to finish the rest (pairs this run had not reached still hold "
                  "their earlier outputs)", file=sys.stderr)
        else:
            print("interrupted: the shards committed so far are kept; run the same command again to finish the "
                  "rest (pairs already done are not redone)", file=sys.stderr)
        return 130
    finally:
        if not had_ray:                    # also a Ray that Ctrl-C stopped half-way through starting
            ray.shutdown()
    if md is not None:
        print(md)
    return status


def _check_weights(args, so: dict) -> None:
    """Load the model once before any pair runs, so weights that are missing, unreachable or of another
    architecture are one error, not one per pair (the pairs' warnings about the weights come later)."""
    import warnings

    from rfclip.model_factory import load_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_clip(args.model, args.weights, args.weights_sha256, so or None, quick_gelu=args.quick_gelu,
                  image_mean=args.image_mean, image_std=args.image_std)


def _evaluate_all(args, so: dict, fs, root: str) -> tuple[int, Optional[str]]:
    """Every pair, then OUT/comparison.md and .json; the exit status and the comparison's markdown (None
    where none was written)."""
    import rfclip.benchmarks as rb

    results, errors, kept = {}, {}, set()
    for b in args.benchmarks:
        for m in args.methods:
            log.info("evaluating %s x %s", b, m)
            had_metrics = _has_metrics(fs, root, b, m)          # before this run: a failed run may write them
            try:
                results[(b, m)] = evaluate_pair(args, b, m, so)
            except Exception as exc:  # noqa: BLE001 - one failed pair must not lose the others
                # A refusal (a changed configuration, a bad label, no weights) is said without a traceback
                # (at DEBUG level it is logged); anything else comes with its traceback.
                expected = isinstance(exc, (ConfigMismatch, LabelError, WeightsError, ValueError,
                                            *storage.STORAGE_ERRORS))
                errors[(b, m)] = storage.scrub(f"{type(exc).__name__}: {exc}")
                log.error("%s x %s failed: %s", b, m, errors[(b, m)], exc_info=not expected)
                if expected:
                    log.debug("%s x %s: the traceback", b, m, exc_info=True)
                if had_metrics and _has_metrics(fs, root, b, m):      # not cleared by an --overwrite
                    kept.add((b, m))
    if not results and not args.overwrite and _exists(fs, posixpath.join(root, "comparison.json")):
        # Every pair failed (a changed --limit, say): the comparison an earlier run wrote stays as it was.
        log.error("every pair failed; the earlier comparison.md and comparison.json under %s are kept",
                  storage.scrub(args.output))
        return 1, None
    val_images = {b: rb.BENCHMARKS[b].val_images for b in args.benchmarks}
    table = build_comparison(results, args.benchmarks, args.methods, val_images,
                             pamr=bool(args.settings.get("pamr", False)))
    for row in table["rows"]:
        for b, cell in row["cells"].items():
            cell["error"] = errors.get((b, row["method"]))
            r = results.get((b, row["method"]))
            cell["failed_images"] = None if r is None else r.get("images_failed")
    weights = public_spec(args.weights)
    table.update(limit=args.limit, model=args.model, weights=weights, settings=args.settings)
    md = comparison_markdown(table, f"mIoU comparison ({args.model}, {weights})")
    # What changes the numbers: settings some method used, not how the forward runs, and not pamr (the
    # published column then is the +PAMR one).
    used = {k: v for m in args.methods for k, v in _settings_for(m, args.settings).items()
            if k not in EXECUTION_SETTINGS and k != "pamr"}
    if used:
        given = ", ".join(f"{k}={v}" for k, v in sorted(used.items()))
        md += (f"\nSettings given with --setting, over each benchmark's preset: {given}. The published numbers "
               f"in parentheses were made with the presets.\n")
    if errors:
        # A failed pair's earlier metrics are left out of the table: they were made under another
        # configuration, or the run that failed would have resumed them.
        md += "\nFailed pairs:\n\n" + "\n".join(
            f"- {b} x {m}: {e}" + (f"\n  (an earlier run's metrics are kept in {b}/{m}/metrics.md)"
                                   if (b, m) in kept else "")
            for (b, m), e in errors.items()) + "\n"
    try:
        storage.atomic_write_bytes(fs, posixpath.join(root, "comparison.json"), json.dumps(table, indent=2).encode())
        storage.atomic_write_bytes(fs, posixpath.join(root, "comparison.md"), md.encode())
    except storage.STORAGE_ERRORS as exc:  # past the storage's retries, a full disk
        print(f"error: {type(exc).__name__}: {storage.scrub(str(exc))}; the pairs' results are kept: run the same "
              f"command again to write the comparison", file=sys.stderr)
        return 1, None
    return (1 if errors else 0), md


if __name__ == "__main__":
    sys.exit(main())
