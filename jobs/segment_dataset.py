"""Segment an image corpus into Parquet shards with rfclip on Ray (embedded or on a cluster): the CLI.

    python jobs/segment_dataset.py --input IMAGES --output OUT --vocabulary "sky; road; car"
    ray job submit --working-dir . -- python jobs/segment_dataset.py --input s3://b/imgs --output s3://b/out ...

This file maps flags to a ``pipeline.job_config.JobConfig``, resolves labelled inputs (``--data-root``,
``--labels``), runs the job (``pipeline.job.run``, also the in-process entry point), and writes the
metrics or the pseudo-label report after.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python jobs/segment_dataset.py` from a checkout (no install)
    sys.path.insert(0, str(REPO_ROOT))

from pipeline import sinks, storage  # noqa: E402
from rfclip.decode import DEFAULT_MAX_PIXELS  # noqa: E402
from pipeline.job import PipelineError, list_input, run  # noqa: E402
from pipeline.job_config import JobConfig, job_vocabulary, labelled_job_inputs  # noqa: E402
from pipeline.run_record import ConfigMismatch  # noqa: E402
from rfclip.cli_args import (DefaultsHelpFormatter, add_model_arguments, non_negative_float,  # noqa: E402
                             positive_int)
from rfclip.weights import WeightsError, public_spec  # noqa: E402

log = logging.getLogger("segment_dataset")

SETTING_FLAGS = {  # explicit CLI flags for the common settings -> Segmenter keyword
    "short_side": int, "slide_crop": int, "slide_stride": int, "prob_thd": float, "logit_scale": float,
}


# ----------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    io_ = p.add_argument_group("inputs and outputs")
    io_.add_argument("--input", help="folder/prefix (local, s3://, any fsspec URL) or a .txt/.csv/.tsv/.parquet manifest "
                     "(not needed with --data-root)")
    io_.add_argument("--output", required=True, help="output folder/prefix (local or object storage)")
    io_.add_argument("--storage-options",
                     help="fsspec options as JSON or @file.json (default: $RFCLIP_STORAGE_OPTIONS, else the standard "
                          "credential chain)")
    io_.add_argument("--save-masks", action="store_true", help="also write masks/<image_id>.png (palette PNG)")
    io_.add_argument("--overwrite", action="store_true", help="delete previous outputs and start over")
    io_.add_argument("--retry-errors", action="store_true",
                     help="run again the committed shards that hold error rows (once what made them is fixed: "
                          "replaced files, storage access); the others are kept")
    io_.add_argument("--shard-size", type=positive_int, default=1000, help="images per Parquet shard (the unit of resume)")
    io_.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                     help="larger images become error rows, from their header")
    e = p.add_argument_group("evaluation (optional): labelled data -> metrics.json, metrics.md, report.md")
    e.add_argument("--data-root", help="with --benchmark: the MMSegmentation-style data/ folder (local or fsspec)")
    e.add_argument("--labels", help="folder of label PNGs laid out as the images (<labels>/<sub>/<stem>.png), or "
                                    "named by unique stems (values: see --label-encoding)")
    e.add_argument("--labels-from-manifest", action="store_true",
                   help="score against the label_uri column of a Parquet/CSV/TSV --input manifest (label PNGs; "
                        "values: see --label-encoding)")
    e.add_argument("--ignore-index", type=int, default=255,
                   help="label value ignored with --labels or --labels-from-manifest")
    e.add_argument("--label-encoding", choices=("indices", "benchmark"),
                   help="what --labels / manifest label values are: class indices in vocabulary order, or, with "
                        "--benchmark, that benchmark's own annotation encoding (ADE20K, VOC20, Context59: 0 "
                        "ignored and the rest shifted down; COCO-Object: COCO-Stuff trainIds). Needed with a "
                        "--benchmark whose encoding differs from class indices")
    e.add_argument("--limit", type=positive_int, help="use only the first N images (sorted / split-file order)")
    v = p.add_argument_group("vocabulary (exactly one)")
    v.add_argument("--vocabulary", help='"sky, cloud; road; car": ";" between classes, ", " between synonyms')
    v.add_argument("--vocabulary-file", help="cls_*.txt format, local or fsspec URL")
    v.add_argument("--benchmark", help="preset name (rfclip.benchmarks): its vocabulary and the method's settings")
    m = add_model_arguments(p, device=False)
    for name, typ in SETTING_FLAGS.items():
        m.add_argument("--" + name.replace("_", "-"), type=typ, help="the Segmenter setting; default: the method's")
    m.add_argument("--pamr", action=argparse.BooleanOptionalAction, default=None)
    r = p.add_argument_group("execution")
    r.add_argument("--workers", type=positive_int, help="model actors (default: one per GPU, else 1)")
    r.add_argument("--num-gpus-per-worker", type=non_negative_float, help="default 1 where GPUs exist, else 0")
    r.add_argument("--cpus-per-worker", type=non_negative_float,
                   help="CPUs each model actor reserves (default 1; on a local Ray with fewer than workers + 1 "
                        "CPUs, what leaves one CPU to the decode and encode tasks)")
    r.add_argument("--batch-size", type=positive_int, default=8, help="images per model call")
    r.add_argument("--decode-batch-size", type=positive_int, default=16, help="images per CPU decode/encode task")
    r.add_argument("--window-images", type=positive_int, default=100_000,
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
        input=args.input, output=args.output, storage_options=storage.storage_options_arg(args.storage_options),
        vocabulary=args.vocabulary, vocabulary_file=args.vocabulary_file, benchmark=args.benchmark,
        method=args.method, model=args.model, weights=args.weights, weights_sha256=args.weights_sha256,
        quick_gelu=args.quick_gelu, image_mean=args.image_mean, image_std=args.image_std, precision=args.precision,
        settings=settings, shard_size=args.shard_size, max_pixels=args.max_pixels, save_masks=args.save_masks,
        overwrite=args.overwrite, retry_errors=args.retry_errors, workers=args.workers,
        num_gpus_per_worker=args.num_gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        batch_size=args.batch_size, decode_batch_size=args.decode_batch_size, window_images=args.window_images,
        ray_address=args.ray_address,
        progress=not args.no_progress)


def attach_inputs(cfg: JobConfig, args: argparse.Namespace):
    """Resolve ``--data-root`` / ``--labels`` / ``--limit`` into ``cfg.items`` (and ``cfg.labels``).

    ``cfg.input_root`` is set to the folder the items come from (the data root, or the ``--input`` folder;
    None for a manifest), so image ids are the same as a plain ``--input`` run's, with or without ``--limit``.
    Returns the ``pipeline.datasets.LabelledSource`` for an evaluation, else None.
    """
    from pipeline.datasets import open_labelled_source

    so = cfg.storage_options
    if args.label_encoding and not (args.labels or args.labels_from_manifest):
        raise ValueError("--label-encoding says how --labels or --labels-from-manifest labels are encoded; "
                         "give one of those (--data-root reads a benchmark's own files as it encodes them)")
    if args.data_root and (args.labels or args.labels_from_manifest):
        raise ValueError("--data-root reads the benchmark's own labels: drop --labels / --labels-from-manifest")
    if args.data_root:
        if not cfg.benchmark:
            raise ValueError("--data-root needs --benchmark NAME (the layout and classes to read)")
        if cfg.input:
            raise ValueError("give --input or --data-root, not both")
        src = open_labelled_source(cfg.benchmark, data_root=args.data_root, storage_options=so, limit=args.limit)
        root = src.root
    elif args.labels and args.labels_from_manifest:
        raise ValueError("give --labels or --labels-from-manifest, not both")
    elif args.labels_from_manifest:
        src, root = _manifest_labels(cfg, args), None
    elif args.labels:
        if not cfg.input:
            raise ValueError("--labels needs --input (the images to pair with the labels)")
        listed = list_input(cfg)
        labels_at = storage.canonical_uri(args.labels, so).rstrip("/") + "/"
        if listed.root is not None and (listed.root.rstrip("/") + "/").startswith(labels_at):
            raise ValueError(f"--labels {args.labels} holds the --input images: every file under it counts as a "
                             f"label. Put the label PNGs in a folder of their own (mirroring the images' "
                             f"sub-folders), or list image and label pairs in a manifest (Parquet or CSV) and pass "
                             f"--labels-from-manifest")
        images = [it for it in listed.items if not it["image_uri"].startswith(labels_at)]
        if len(images) < len(listed.items):
            log.info("%d files under --labels %s are labels, not input images", len(listed.items) - len(images),
                     args.labels)
        images = sorted(images, key=lambda it: it["image_uri"])
        chosen = images[:args.limit]                               # only these need a label
        unreadable = [it for it in chosen if it.get("error")]     # error rows: no label to pair
        if not chosen:
            raise ValueError(f"no input images under {storage.scrub(args.input)} beside the labels")
        if len(unreadable) == len(chosen):
            raise ValueError(f"none of the {len(chosen)} images to score can be read, e.g. "
                             f"{storage.scrub(unreadable[0]['image_uri'])}: {unreadable[0]['error']}")
        src = open_labelled_source(labels=args.labels, image_uris=[it["image_uri"] for it in images
                                                                   if not it.get("error")],
                                   class_names=_class_names(cfg), ignore_index=args.ignore_index,
                                   storage_options=so, image_root=listed.root, transform=_label_transform(cfg, args),
                                   limit=len(chosen) - len(unreadable))
        cfg.items, cfg.labels = labelled_job_inputs(src)
        cfg.items = sorted(cfg.items + unreadable, key=lambda it: it["image_uri"])
        cfg.input_root = listed.root
        return src
    else:
        if args.limit is not None:
            listed = list_input(cfg)
            cfg.items, cfg.input_root = listed.items[:args.limit], listed.root
        return None
    cfg.items, cfg.labels = labelled_job_inputs(src)
    cfg.input_root = root
    return src


def _class_names(cfg: JobConfig) -> list[str]:
    """Each class's first name, in label order, from the job's vocabulary option."""
    import rfclip

    vocab, extra = job_vocabulary(cfg)
    if vocab is None:
        vocab = rfclip.benchmarks.BENCHMARKS[extra["benchmark"]].vocabulary
    return rfclip.benchmarks.class_names(vocab, cfg.benchmark)


def _manifest_labels(cfg: JobConfig, args: argparse.Namespace):
    """The ``LabelledSource`` of a table manifest's (image_uri, label_uri) rows (``--labels-from-manifest``)."""
    from pipeline.datasets import LabelledSource

    if not cfg.input:
        raise ValueError("--labels-from-manifest needs --input MANIFEST.parquet (or .csv) with a label_uri column")
    listed = list_input(cfg)
    if listed.kind != "manifest":
        raise ValueError(f"--labels-from-manifest needs a Parquet or CSV manifest as --input, not a {listed.kind}")
    items = listed.items[:args.limit]
    if not any(it.get("label_uri") for it in listed.items):
        raise ValueError("--labels-from-manifest: the manifest has no label_uri values (it needs a "
                         "label_uri column, in Parquet or CSV)")
    unlabelled = [it["image_uri"] for it in items if not it.get("label_uri")]
    if unlabelled:
        raise FileNotFoundError(f"{len(unlabelled)} of {len(items)} manifest entries have no label_uri, "
                                f"e.g. {[storage.scrub(u) for u in unlabelled[:3]]}")
    pairs = [(it["image_uri"], it["label_uri"]) for it in items]
    return LabelledSource("manifest", pairs, _class_names(cfg), args.ignore_index, _label_transform(cfg, args),
                          cfg.storage_options or {})


def _label_transform(cfg: JobConfig, args: argparse.Namespace) -> str:
    """How ``--labels`` / manifest labels are decoded (``--label-encoding``): as class indices, or as
    ``--benchmark`` decodes its own annotation files (ADE20K's and VOC20's reduce_zero_label, COCO-Object's
    mapping from COCO-Stuff), so its files score as they do under ``--data-root``. Where the two differ,
    the flag is required: either guess would score the other kind of file wrong, with no error."""
    from pipeline.datasets import BENCHMARK_LAYOUTS

    encoding = args.label_encoding
    if encoding == "benchmark" and not cfg.benchmark:
        raise ValueError("--label-encoding benchmark needs --benchmark NAME (whose encoding to read)")
    if encoding == "benchmark" and args.ignore_index != 255:
        raise ValueError(f"--label-encoding benchmark reads {cfg.benchmark}'s own encoding, which ignores 255; "
                         f"--ignore-index {args.ignore_index} does not apply")
    own = BENCHMARK_LAYOUTS[cfg.benchmark].transform if cfg.benchmark in BENCHMARK_LAYOUTS else "identity"
    if own == "identity":
        return "identity"                     # the benchmark's files hold class indices: both read alike
    if encoding is None:
        raise ValueError(f"--benchmark {cfg.benchmark} encodes its own label files otherwise than as class "
                         f"indices ({own}): say which your labels are, --label-encoding benchmark (copies of "
                         f"{cfg.benchmark}'s annotation files) or --label-encoding indices (values are indices "
                         f"into its classes)")
    if encoding == "indices":
        return "identity"
    log.info("labels decoded as %s's annotation files are (%s)", cfg.benchmark, own)
    return own


def finish(cfg: JobConfig, src) -> dict:
    """After a run: metrics + report for an evaluation, the pseudo-label report otherwise."""
    from pipeline.evaluation import finish_evaluation, finish_pseudo_labels

    so = cfg.storage_options
    if src is not None:
        return finish_evaluation(cfg.output, src, so, extra={"method": cfg.method, "model": cfg.model,
                                                             "weights": public_spec(cfg.weights)})
    run_doc = sinks.read_json(cfg.output, so, sinks.RUN_JSON) or {}
    report = finish_pseudo_labels(cfg.output, run_doc.get("runtime", {}).get("class_names", []), so)
    return {"report": storage.scrub(report)}


def main(argv: Optional[list] = None) -> int:
    """CLI entry point; returns the process exit status: 0 when done, 1 when every image in the output is an
    error row, or a stage or the storage failed (committed shards kept), 2 for a clear user-facing error, 130 after
    Ctrl-C."""
    args = build_parser().parse_args(argv)
    storage.setup_logging()
    # Before anything reads them: an error about an input names it without the password in its URL.
    storage.register_url_secrets(args.input, args.output, args.weights, args.vocabulary_file, args.labels,
                                 args.data_root)
    cfg, started = None, False
    try:
        cfg = config_from_args(args)
        src = attach_inputs(cfg, args)
        started = True
        summary = run(cfg)
        result = finish(cfg, src)
    except (FileNotFoundError, ValueError, PermissionError, ConfigMismatch, WeightsError) as exc:
        print(f"error: {storage.scrub(str(exc))}", file=sys.stderr)
        return 2
    except (PipelineError, storage.StorageError) as exc:
        print(f"error: {storage.scrub(str(exc))}", file=sys.stderr)
        return 1
    except storage.STORAGE_ERRORS as exc:   # storage past its retries (a write, a listing), a full disk, a folder
        if not started:             # reading the command's own files: the command must change
            print(f"error: {type(exc).__name__}: {storage.scrub(str(exc))}", file=sys.stderr)
            return 2
        print(f"error: {type(exc).__name__}: {storage.scrub(str(exc))}; the shards committed so far are kept: "
              f"run the same command again to finish", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # --overwrite is spent once the old outputs are cleared (cfg.overwrite is False from then on)
        cleared = args.overwrite and cfg is not None and not cfg.overwrite
        again = "the same command again without --overwrite" if cleared else "the same command again"
        print(f"interrupted: the shards committed so far are kept; run {again} to finish the rest", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    if src is not None:
        pct = {k: "n/a" if result[k] is None else f"{result[k]:.2f}" for k in ("mIoU", "mAcc", "aAcc")}
        print(f"mIoU {pct['mIoU']}  mAcc {pct['mAcc']}  aAcc {pct['aAcc']} over {result['images']} images "
              f"-> {storage.scrub(cfg.output)}/metrics.md, report.md")
        if result["images_failed"]:
            print(f"warning: {result['images_failed']} images could not be segmented and are not scored; "
                  f"metrics.md lists examples", file=sys.stderr)
    else:
        print(f"report: {result['report']}")
    if summary["error"] and src is None:
        print(f"warning: {summary['error']} of {summary['ok'] + summary['error']} images segmented in this run are "
              f"error rows (the predictions' error column says why)", file=sys.stderr)
    if summary["output"]["error"] and not summary["output"]["ok"]:
        print("error: no image in the output could be segmented", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
