"""run.json and the resume rule: a re-run into the same output finishes the job, or is refused.

run.json holds the run's ``config`` (its identity: what a resumed run must match), the package
``versions`` (and ``earlier_versions``: those of the runs it resumed, where they differed), and ``runtime`` details that may change between runs (workers, batch size, the device,
how the forward pass runs). :func:`start_or_resume` checks an output folder against a new identity,
writes run.json, and says which shards are left to do.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Optional

from rfclip.weights import public_spec

from . import sinks, sources, storage

log = logging.getLogger(__name__)

VERSION_PACKAGES = ("rfclip", "torch", "open_clip_torch", "ray", "pyarrow", "pillow", "numpy", "fsspec", "s3fs")

# Settings that pick how the forward pass runs, not what it computes (the plans and kernels agree to float
# rounding, tested): like the device, a resumed run may change them. What ran is recorded per shard.
EXECUTION_SETTINGS = ("plan", "attention_kernels", "ncut_kernels")


class ConfigMismatch(RuntimeError):
    """A resumed run whose configuration differs from the one in run.json."""


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    """Installed versions of the packages that decide the outputs, and ``rfclip.OUTPUT_REVISION``."""
    import rfclip

    out = {"python": platform.python_version(), "rfclip_output_revision": rfclip.OUTPUT_REVISION}
    for p in VERSION_PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def _version_changes(previous: dict, new: dict) -> list[str]:
    """``name old -> new`` for each version that differs between run.json ``previous`` and ``new``. A
    run.json from before the output revision was recorded is revision 2 if it records the image
    normalisation (both came with half-up rounding, revision 2's change), else revision 1."""
    weights = ((previous.get("config") or {}).get("segmenter") or {}).get("weights")
    inferred = 2 if isinstance(weights, dict) and "image_mean" in weights else 1
    old = {"rfclip_output_revision": inferred, **previous["versions"]}
    return [f"{k} {old.get(k)} -> {new[k]}" for k in new if old.get(k) != new[k]]


def without_execution(seg_config: dict) -> dict:
    """``seg.config()`` without the device and the execution settings (see EXECUTION_SETTINGS)."""
    out = {k: v for k, v in seg_config.items() if k != "device"}  # cpu vs cuda may differ on resume
    if isinstance(out.get("settings"), dict):
        out["settings"] = {k: v for k, v in out["settings"].items() if k not in EXECUTION_SETTINGS}
    return out


def _used_settings(seg: dict) -> dict:
    """``seg`` (a segmenter config) without the settings its method does not use
    (``rfclip.settings.METHOD_SPECIFIC_SETTINGS``): they leave its results alone, so a run that set one
    (``distraction_dims`` for ``clip``, as an evaluation over several methods did) resumes without it."""
    from rfclip.settings import unused_settings

    settings = seg.get("settings") if isinstance(seg, dict) else None
    if not isinstance(settings, dict) or not isinstance(seg.get("method"), str):
        return seg
    drop = set(unused_settings(seg["method"], settings))
    return {**seg, "settings": {k: v for k, v in settings.items() if k not in drop}}


def _with_normalisation(old: dict) -> dict:
    """run.json files from before the image normalisation was recorded: the one they used, OpenAI's."""
    from rfclip.weights import OPENAI_MEAN, OPENAI_STD

    w = old.get("weights")
    if isinstance(w, dict) and "image_mean" not in w:
        old = {**old, "weights": {**w, "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD)}}
    return old


def _respelled(old: dict, new: dict) -> dict:
    """``old`` (run.json's segmenter) with the model and weights spelled as in ``new`` where both name the
    same file: weights by their sha256, a model-config JSON by its contents. A path typed another way
    (``../model/x.pt``, relative under ``ray job submit --working-dir``) then resumes."""
    old = dict(old)
    ow, nw = old.get("weights"), new.get("weights")
    if (isinstance(ow, dict) and isinstance(nw, dict) and nw.get("kind") in ("file", "url") and nw.get("sha256")
            and (ow.get("kind"), ow.get("sha256")) == (nw.get("kind"), nw.get("sha256"))):
        old["weights"] = {**ow, "spec": nw.get("spec")}
    om, nm = old.get("model"), new.get("model")
    if (isinstance(om, str) and isinstance(nm, str) and om != nm and om.endswith(".json") and nm.endswith(".json")
            and os.path.isfile(om) and os.path.isfile(nm) and Path(om).read_bytes() == Path(nm).read_bytes()):
        old["model"] = nm
        old["arch"] = new.get("arch", old.get("arch"))     # open_clip names a config after its file's stem
    return old


def _with_background_name(old, new):
    """``old`` (run.json's labels) with class 0 named "background" where ``new`` names it so and nothing
    else differs. A benchmark's class file given as the vocabulary names its background line so
    (``rfclip.benchmarks.class_names``); older run.json files name it after its first word (``sky``), for
    the same labels and scores."""
    on = (old or {}).get("class_names") if isinstance(old, dict) else None
    nn = (new or {}).get("class_names") if isinstance(new, dict) else None
    if (isinstance(on, list) and isinstance(nn, list) and on and len(on) == len(nn) and on[0] != nn[0]
            and nn[0] == "background" and on[1:] == nn[1:]):
        return {**old, "class_names": ["background", *on[1:]]}
    return old


def identity(cfg, inputs: sources.Inputs, seg_config: dict) -> dict:
    """The part of a :class:`~pipeline.job_config.JobConfig` run that a resumed run must match.

    ``input`` names the root image ids are relative to (the input folder or the data root), else the
    manifest or image file; resolved (:func:`~pipeline.storage.canonical_uri`), so any spelling of the same
    input resumes, and without the credentials a URL may carry (``rfclip.weights.public_spec``), which
    run.json never holds. Items given without any input (the Python API) record ``"<items>"``.
    """
    recorded = storage.canonical_uri(cfg.input, cfg.storage_options) if cfg.input else "<items>"
    return {
        "input": public_spec(inputs.root or recorded),
        "num_inputs": len(inputs.items),
        "inputs_sha256": sources.items_digest(inputs.items),
        "shard_size": cfg.shard_size,
        "max_pixels": cfg.max_pixels,
        "save_masks": cfg.save_masks,
        "labels": cfg.labels.identity if cfg.labels else None,
        "segmenter": without_execution(seg_config),
    }


@dataclasses.dataclass
class Resume:
    """What :func:`start_or_resume` found under the output.

    ``pending``: the shards still to commit, in order. ``committed``: name -> the metadata of each shard
    already committed and kept (its footer's ``rfclip.shard``). ``redone``: name -> why, for each
    committed shard whose file was damaged after its commit, and is pending again. ``retried``: the names of
    the committed shards with error rows that ``--retry-errors`` runs again.
    """
    pending: list
    committed: dict
    redone: dict
    retried: list = dataclasses.field(default_factory=list)


def start_or_resume(cfg, shards: list, ident: dict, probe: dict) -> Resume:
    """Check ``cfg.output`` against ``ident``, write run.json, and say which shards are still to commit.

    ``--overwrite`` clears the job's outputs first, once: ``cfg.overwrite`` is then set to False, so the
    config describes a resume from there on (and the CLI knows the old outputs are gone).
    Raises :class:`ConfigMismatch` when run.json's identity differs (the differing keys listed) and shards
    were committed under it, when committed shards exist without a run.json, or when committed shards are
    not among ``shards`` or hold other images than the shard of that name. A committed shard whose footer
    can't be parsed (cut short after its commit) is redone, with a warning. A finished run's summary.json
    is removed, so a crash from here on never leaves an old "finished" summary behind.
    """
    so = cfg.storage_options
    if cfg.overwrite:
        sinks.clear_outputs(cfg.output, so)
        cfg.overwrite = False
    previous = sinks.read_json(cfg.output, so, sinks.RUN_JSON)
    committed = sinks.committed_shard_names(cfg.output, so)
    _check_identity(cfg, previous, ident, committed)
    metas, damaged = _check_committed(cfg, shards, committed)
    retried = sorted(n for n, m in metas.items() if int(m.get("error", 0)) > 0) if cfg.retry_errors else []
    if retried:
        log.info("--retry-errors: %d committed shards hold error rows and run again (%s%s)", len(retried),
                 ", ".join(retried[:5]), ", ..." if len(retried) > 5 else "")
        metas = {n: m for n, m in metas.items() if n not in retried}
    earlier = list(previous.get("earlier_versions") or []) if previous else []
    if previous and committed and isinstance(previous.get("versions"), dict):
        changes = _version_changes(previous, versions())
        if changes:
            log.warning("resuming shards written with other versions (%s): the committed shards are kept, so "
                        "the output mixes both; use --overwrite to redo them all", "; ".join(changes))
            earlier.append(previous["versions"])
    fs_out, root = storage.get_fs(cfg.output, so)
    summary_path = root.rstrip("/") + "/" + sinks.SUMMARY_JSON
    if fs_out.exists(summary_path):
        fs_out.rm(summary_path)
    run_doc = {"config": ident, "versions": versions(), "earlier_versions": earlier,
               "runtime": {"output": cfg.output, "storage_options": so, "batch_size": cfg.batch_size,
                           "execution_settings": {k: probe["config"]["settings"][k] for k in EXECUTION_SETTINGS},
                           "workers": cfg.workers, "num_gpus_per_worker": cfg.num_gpus_per_worker,
                           "class_names": probe["class_names"],
                           "started_at": (previous.get("runtime") or {}).get("started_at") or now()
                                          if previous else now(),
                           "resumed_at": now() if previous else None}}
    sinks.write_json(cfg.output, so, sinks.RUN_JSON, run_doc)
    return Resume(pending=[s for s in shards if s.name not in metas], committed=metas, redone=damaged,
                  retried=retried)


def _check_identity(cfg, previous: Optional[dict], ident: dict, committed: set) -> None:
    """Raise :class:`ConfigMismatch` unless run.json (``previous``) describes the run ``ident`` does, or no
    shard was committed under it (then the files that run wrote are removed: :func:`sinks.clear_outputs`).
    Older run.json files are read as the identity they meant."""
    so = cfg.storage_options
    if previous is None:
        if committed:
            raise ConfigMismatch(f"{storage.scrub(cfg.output)!r} holds {len(committed)} committed shards but no "
                                 f"run.json; use --overwrite to start over")
        return
    old = dict(previous.get("config", {}))
    if isinstance(old.get("segmenter"), dict):     # run.json files before EXECUTION_SETTINGS held them
        old["segmenter"] = _respelled(_with_normalisation(without_execution(old["segmenter"])), ident["segmenter"])
        old["segmenter"] = _used_settings(old["segmenter"])
        ident = {**ident, "segmenter": _used_settings(ident["segmenter"])}
    old["labels"] = _with_background_name(old.get("labels"), ident.get("labels"))
    old_input = old.get("input")
    if old_input not in (None, "<items>", ident["input"]):   # older run.json files hold --input as typed
        old["input"] = public_spec(storage.canonical_uri(old_input, so))
    diffs = sinks.config_differences(old, ident)
    if diffs and not committed:     # nothing was done under the old configuration: nothing to protect
        # What it wrote (masks of shards it never committed) was made under the other configuration: gone too.
        log.info("run.json of a run that committed no shard is replaced (%s); the files it wrote are removed",
                 "; ".join(diffs))
        sinks.clear_outputs(cfg.output, so)
        return
    if diffs:
        note = ("\nthis run.json is older than image ids relative to the input root for --labels, --limit "
                "and --data-root runs (it records the input as \"<items>\"): their ids differ now"
                if old_input == "<items>" != ident["input"] else "")
        if {"num_inputs", "inputs_sha256"} & {d.split(":", 1)[0] for d in diffs} and not note:
            note = ("\nthe input lists other images than the committed shards were made from (another --limit, "
                    "or files added or removed)")
        raise ConfigMismatch(
            f"refusing to resume into {storage.scrub(cfg.output)!r}: the configuration differs from its run.json:\n  "
            + "\n  ".join(diffs) + note + "\nuse --overwrite to start over, or write to another --output")


def _check_committed(cfg, shards: list, committed: set) -> tuple[dict, dict]:
    """``(metas, damaged)`` of the ``committed`` shard names (:func:`~pipeline.sinks.read_committed_footers`),
    after checking each is a shard of this input, holding the images this input puts in it."""
    by_name = {s.name: s for s in shards}
    stray = committed - set(by_name)
    if stray:
        raise ConfigMismatch(f"output holds shards that this input does not produce: {sorted(stray)[:5]}")
    metas, damaged = sinks.read_committed_footers(cfg.output, cfg.storage_options, committed)
    other = [n for n, m in sorted(metas.items()) if m.get("digest") != by_name[n].digest]
    if other:
        raise ConfigMismatch(f"committed shards hold other images than this input puts in them: {other[:5]}; "
                             f"use --overwrite to start over")
    for name, why in sorted(damaged.items()):
        log.warning("%s was committed but can't be read now (%s): it was damaged after its commit, and is "
                    "redone", name, why)
    return metas, damaged
