"""Shard commits, label PNGs, run.json helpers and credential redaction (pipeline/sinks.py, storage.py)."""
from __future__ import annotations

import json
import posixpath

import numpy as np

from pipeline.metrics import load_shard_confusions
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import sinks, storage
from rfclip.visualize import decode_label_png


def _row(i, ok=True):
    lab = np.full((3, 4), i % 2, np.int64)
    return {"image_uri": f"/x/{i}.jpg", "image_id": f"{i}-abc", "width": 4 if ok else None, "height": 3 if ok else None,
            "status": "ok" if ok else "error", "error": None if ok else "empty file (0 bytes)",
            "mask_png": sinks.encode_label_png(lab, 2) if ok else None,
            "class_pixels": np.bincount(lab.ravel(), minlength=2).tolist() if ok else None,
            "mean_confidence": 0.5 if ok else None, "elapsed_ms": 1.0}


@pytest.mark.parametrize("k,dtype", [(21, np.uint8), (300, np.uint16)])
def test_label_png_round_trip(k, dtype):
    lab = np.random.default_rng(0).integers(0, k, (17, 23))
    png = sinks.encode_label_png(lab, k)
    np.testing.assert_array_equal(decode_label_png(png), lab)
    np.testing.assert_array_equal(decode_label_png(sinks.palette_png(lab, k)), lab)


def test_commit_shard_is_atomic_readable_and_carries_confusion(tmp_path):
    out = str(tmp_path / "out")
    rows = [_row(0), _row(1), _row(2, ok=False)]
    conf = {"num_classes": 2, "ignore_index": 255, "images": 2, "matrix": [[5, 1], [0, 6]]}
    sinks.commit_shard(out, None, "shard-00000", rows, {"name": "shard-00000", "digest": "d"}, conf)
    sinks.commit_shard(out, None, "shard-00001", [_row(3)], {"name": "shard-00001"}, conf)
    files = sorted(p.name for p in (tmp_path / "out" / "predictions").iterdir())
    assert files == ["shard-00000.parquet", "shard-00001.parquet"]          # no temp files left behind
    t = pq.read_table(tmp_path / "out" / "predictions" / "shard-00000.parquet")
    assert t.schema.remove_metadata() == sinks.PREDICTION_SCHEMA
    assert t.column("status").to_pylist() == ["ok", "ok", "error"]
    assert t.column("mask_png").to_pylist()[2] is None
    assert sinks.committed_shard_names(out, None) == {"shard-00000", "shard-00001"}
    meta, c = sinks.parse_shard_metadata(t.schema.metadata)              # the footer, read with the rows
    assert meta["digest"] == "d" and c["matrix"] == [[5, 1], [0, 6]]
    np.testing.assert_array_equal(load_shard_confusions(out)["confusion"], [[10, 2], [0, 12]])


def test_committed_footers_are_read_and_damaged_shards_named(tmp_path):
    """read_committed_footers gives each readable shard's metadata (row count checked against the file) and
    names the shards whose footer can't be read: truncated, not Parquet, or not a shard of this job."""
    out = str(tmp_path / "out")
    sinks.commit_shard(out, None, "shard-00000", [_row(0), _row(1, ok=False)],
                       {"name": "shard-00000", "digest": "d0", "num_rows": 2, "ok": 1, "error": 1})
    sinks.commit_shard(out, None, "shard-00001", [_row(2)], {"name": "shard-00001", "digest": "d1", "num_rows": 1})
    sinks.commit_shard(out, None, "shard-00002", [_row(3)], {"name": "shard-00002", "num_rows": 2})  # rows differ
    folder = tmp_path / "out" / "predictions"
    whole = (folder / "shard-00001.parquet").read_bytes()
    (folder / "shard-00001.parquet").write_bytes(whole[:-9])                 # cut short
    (folder / "shard-00003.parquet").write_bytes(b"not parquet")
    pq.write_table(pa.table({"x": [1]}), folder / "shard-00004.parquet")     # Parquet, no shard metadata
    metas, damaged = sinks.read_committed_footers(out, None)
    assert metas == {"shard-00000": {"name": "shard-00000", "digest": "d0", "num_rows": 2, "ok": 1, "error": 1}}
    assert sorted(damaged) == ["shard-00001", "shard-00002", "shard-00003", "shard-00004"]
    assert "says 2 rows and the file holds 1" in damaged["shard-00002"]
    assert sinks.read_committed_footers(str(tmp_path / "none"), None) == ({}, {})


def test_config_differences_names_the_changed_keys():
    a = {"segmenter": {"method": "rfclip", "settings": {"prob_thd": 0.0}}, "shard_size": 10}
    b = {"segmenter": {"method": "sclip", "settings": {"prob_thd": 0.0}}, "shard_size": 10}
    d = sinks.config_differences(a, b)
    assert d == ['segmenter.method: "rfclip" -> "sclip"']
    assert sinks.config_differences(a, json.loads(json.dumps(a))) == []


def test_secrets_are_redacted_and_scrubbed():
    so = {"key": "AKIAEXAMPLEKEY", "secret": "verysecretvalue", "client_kwargs": {"endpoint_url": "http://h:1"},
          "config_kwargs": {"retries": {"max_attempts": 3}}}
    storage.register_secrets(so)
    r = storage.redact({"storage_options": so, "note": "failed with verysecretvalue in it"})
    text = json.dumps(r)
    assert "verysecretvalue" not in text and "AKIAEXAMPLEKEY" not in text
    assert r["storage_options"]["client_kwargs"]["endpoint_url"] == "http://h:1"   # not a secret
    assert r["storage_options"]["config_kwargs"]["retries"]["max_attempts"] == 3
    assert storage.scrub("x AKIAEXAMPLEKEY y") == "x *** y"
    url = "https://ann:pa55word@h/w.pt?v=2&X-Amz-Credential=AKIA%2F2026%2Fus&X-Amz-Signature=f00d"
    storage.register_url_secrets(url, None, "/local/a@b.pt")
    assert storage.scrub(url) == "https://ann:***@h/w.pt?v=2&X-Amz-Credential=***&X-Amz-Signature=***"
    assert storage.scrub("as a client quotes it: Credential=AKIA/2026/us") == "as a client quotes it: Credential=***"
    assert storage.scrub("/local/a@b.pt, ann, v=2") == "/local/a@b.pt, ann, v=2"      # names and plain values stay
    storage.register_url_secrets("https://h/c.csv?sv=2022&sig=Az%2fSigValue%3D", "https://bo:p%40ssw0rd@h/x")
    assert storage.scrub("c.csv?sv=2022&sig=Az%2fSigValue%3D or Az/SigValue=") == "c.csv?sv=2022&sig=*** or ***"
    assert storage.scrub("bo:p%40ssw0rd, p@ssw0rd") == "bo:***, ***"


def test_log_formatter_scrubs_messages_and_tracebacks_and_leaves_the_record_to_other_handlers():
    import io
    import logging

    storage.register_secrets({"secret": "t0p-s3cret-x"})
    ours, theirs = io.StringIO(), []
    h = logging.StreamHandler(ours)
    h.setFormatter(storage.ScrubbingFormatter("%(message)s"))

    class Keep(logging.Handler):
        def emit(self, record):
            theirs.append(record)

    log = logging.getLogger("test-scrub")
    log.propagate = False
    log.addHandler(h)
    log.addHandler(Keep())
    try:
        raise ValueError("bad key t0p-s3cret-x")
    except ValueError:
        log.error("failed with %s", "t0p-s3cret-x", exc_info=True)
    finally:
        log.handlers.clear()
    text = ours.getvalue()
    assert "t0p-s3cret-x" not in text and "failed with ***" in text and "ValueError: bad key ***" in text
    assert theirs[0].exc_info is not None and theirs[0].getMessage() == "failed with t0p-s3cret-x"


def test_storage_options_from_json_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("RFCLIP_STORAGE_OPTIONS", raising=False)
    assert storage.storage_options_arg(None) is None
    assert storage.storage_options_arg('{"anon": true}') == {"anon": True}
    f = tmp_path / "so.json"
    f.write_text('{"key": "k"}')
    assert storage.storage_options_arg(f"@{f}") == {"key": "k"}
    monkeypatch.setenv("RFCLIP_STORAGE_OPTIONS", f"@{f}")
    assert storage.storage_options_arg(None) == {"key": "k"}
    assert storage.storage_options_arg('{"anon": true}') == {"anon": True}      # the flag wins
    with pytest.raises(ValueError, match="JSON object"):
        storage.storage_options_arg("[1]")


def test_s3_retry_defaults_are_raised_and_user_wins():
    so = storage.with_retry_defaults("s3://b/k", {"config_kwargs": {"read_timeout": 5}})
    assert so["config_kwargs"]["read_timeout"] == 5
    assert so["config_kwargs"]["retries"]["max_attempts"] >= 10
    assert so["config_kwargs"]["connect_timeout"] > 5
    assert storage.with_retry_defaults("/local/path", None) == {}


@pytest.mark.parametrize("exc,transient", [
    (OSError("AccessDenied: s3://b/out/masks/frame_0500-1a2b3c.png"), False),      # a 500 in a key is no 5xx
    (OSError("Forbidden: s3://b/img-503.jpg"), False),
    (OSError(5, "Bad Request: s3://b/scan(500).png"), False),
    (OSError("An error occurred (503) when calling the PutObject operation: Slow"), True),
    (OSError("503, message='Service Unavailable', url='http://x/a.jpg'"), True),
    (OSError("An error occurred (SlowDown) when calling the GetObject operation"), True),
    (OSError("Read timed out."), True),
    (ConnectionError("reset"), True),
    (PermissionError("InternalError"), False),
])
def test_transient_errors_are_told_from_permanent_ones(exc, transient):
    assert storage.is_transient(exc) is transient


@pytest.mark.parametrize("code,status,transient", [("SlowDown", 503, True), ("InternalError", 500, True),
                                                    ("ServiceUnavailable", 503, True), ("AccessDenied", 403, False),
                                                    ("NoSuchKey", 404, False), ("InvalidRequest", 400, False)])
def test_s3fs_errors_are_classified_from_their_cause(code, status, transient):
    """What s3fs raises once botocore gives up: an OSError whose text is the server's message (no code)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    cause = ClientError({"Error": {"Code": code, "Message": "Please reduce your request rate."},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    exc = translate_boto_error(cause)
    assert "SlowDown" not in str(exc) and "503" not in str(exc)
    assert storage.is_transient(exc) is transient


def test_transient_errors_by_their_status_code():
    class Response(Exception):
        def __init__(self, status):
            super().__init__("failed for s3://b/frame_0503.png")
            self.status = status

    assert storage.is_transient(Response(503)) and storage.is_transient(Response(429))
    assert not storage.is_transient(Response(403)) and not storage.is_transient(Response(404))


def test_retry_call_retries_transient_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("Connection reset by peer")
        return "ok"

    assert storage.retry_call(flaky, "x", attempts=5, base_delay_s=0.001) == "ok" and len(calls) == 3
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        storage.retry_call(missing, "x", attempts=5, base_delay_s=0.001)
    assert len(calls) == 1


def test_clear_outputs_removes_what_the_job_wrote_and_nothing_else(tmp_path):
    """--overwrite: the job's files (also report, figures, metrics, temp files) go; a user's files stay."""
    ours = ["run.json", "summary.json", "report.md", "metrics.json", "metrics.md", "metrics/confusion.npy",
            "predictions/shard-00000.parquet", "predictions/shard-100000.parquet",
            "predictions/.tmp-0123456789ab-shard-00001.parquet",
            "masks/img_1-0123456789.png", "masks/rgb-0123456789abcdef0123.png", "figures/iou.png",
            "figures/confusion.png", "figures/samples.png", "figures/class_distribution.png", "figures/confidence.png",
            ".tmp-0123456789ab-run.json"]
    theirs = ["notes.md", "masks/mine.png", "masks/sub/x-0123456789.png", "figures/logo.png", "predictions/README",
              "metrics/extra.csv", "images/a-0123456789.png", "config.json"]
    out, only_ours = tmp_path / "out", tmp_path / "only_ours"
    for root, rels in ((out, ours + theirs), (only_ours, ours)):
        for rel in rels:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"x")
        sinks.clear_outputs(str(root), None)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(theirs)
    assert list(only_ours.iterdir()) == []                       # the job's folders, left empty, are gone too
    sinks.clear_outputs(str(tmp_path / "missing"), None)         # nothing to clear


def test_unwritable_output_fails_fast(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os
        if os.geteuid() == 0:
            target = "/proc/rfclip-out"      # root ignores permission bits; /proc refuses new files
        else:
            target = str(ro / "out")
        with pytest.raises(PermissionError, match="not writable"):
            storage.check_writable(target)
    finally:
        ro.chmod(0o700)


def test_an_atomic_write_over_a_folder_fails_and_leaves_nothing_inside_it(tmp_path):
    fs, _ = storage.get_fs(str(tmp_path))
    target = tmp_path / "mask.png"
    target.mkdir()
    with pytest.raises(OSError):
        storage.atomic_write_bytes(fs, str(target), b"data")
    assert list(target.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"]
    storage.atomic_write_bytes(fs, str(tmp_path / "ok.png"), b"data")
    assert (tmp_path / "ok.png").read_bytes() == b"data"


def test_atomic_writes_flush_to_disk_unless_told_not_to(tmp_path, monkeypatch):
    """Shards (durable, the default) are fsynced before their rename; masks (durable=False) are not. Both
    land whole, under their name, with no temp file left."""
    import os

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    fs, _ = storage.get_fs(str(tmp_path))
    storage.atomic_write_bytes(fs, str(tmp_path / "shard.parquet"), b"shard")
    assert len(synced) == 1
    storage.atomic_write_bytes(fs, str(tmp_path / "m" / "mask.png"), b"mask", durable=False)
    assert len(synced) == 1
    assert (tmp_path / "shard.parquet").read_bytes() == b"shard" and (tmp_path / "m" / "mask.png").read_bytes() == b"mask"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m", "mask.png", "shard.parquet"]


def test_a_footer_that_cant_be_read_is_retried_or_raised_never_counted_as_damage(tmp_path, monkeypatch):
    """Storage errors while reading footers are not damage: a transient one is retried, a lasting one or a
    refused access raises, naming the shard, and no shard is marked for redoing."""
    from fsspec.implementations.local import LocalFileOpener

    out = str(tmp_path / "out")
    for i in range(3):
        sinks.commit_shard(out, None, f"shard-{i:05d}", [_row(i)], {"name": f"shard-{i:05d}", "num_rows": 1})
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    real_read, failures = LocalFileOpener.read, {}

    def read(self, *args):
        for name, left in failures.items():
            if name in self.path and left:
                failures[name] = left - 1 if isinstance(left, int) else left
                raise (left if isinstance(left, BaseException) else ConnectionResetError("connection reset by peer"))
        return real_read(self, *args)

    monkeypatch.setattr(LocalFileOpener, "read", read)
    failures["shard-00001"] = 2                                   # two resets, then it reads
    metas, damaged = sinks.read_committed_footers(out, None)
    assert sorted(metas) == ["shard-00000", "shard-00001", "shard-00002"] and damaged == {}
    failures["shard-00001"] = 99                                  # an outage that outlasts the retries
    with pytest.raises(storage.StorageError, match=r"shard-00001\.parquet.*nothing was changed"):
        sinks.read_committed_footers(out, None)
    failures["shard-00001"] = PermissionError(13, "Access Denied")
    with pytest.raises(PermissionError, match=r"shard-00001\.parquet.*Access Denied"):
        sinks.read_committed_footers(out, None)
    failures["shard-00001"] = ValueError("InvalidURL")                # the storage stack's, not a parse error
    with pytest.raises(storage.StorageError, match=r"shard-00001\.parquet.*ValueError: InvalidURL"):
        sinks.read_committed_footers(out, None)


def test_an_outage_stops_the_footer_reads_after_one_shards_retries(tmp_path, monkeypatch):
    """Not every shard's retries: the reads not yet started are cancelled at the first lasting failure."""
    import time

    from fsspec.implementations.local import LocalFileOpener

    out = str(tmp_path / "out")
    for i in range(40):
        sinks.commit_shard(out, None, f"shard-{i:05d}", [_row(i)], {"name": f"shard-{i:05d}", "num_rows": 1})
    real_sleep = time.sleep                                    # storage.time is the time module: patched for all
    monkeypatch.setattr(storage.time, "sleep", lambda s: real_sleep(0.01))
    reads = []

    def read(self, *args):
        reads.append(self.path)
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(LocalFileOpener, "read", read)
    with pytest.raises(storage.StorageError, match=r"shard-00000\.parquet \(ConnectionResetError"):
        sinks.read_committed_footers(out, None)
    shards = {posixpath.basename(p) for p in reads}
    assert len(shards) <= 2 * sinks.FOOTER_READERS and len(reads) < 40 * 5 / 2, (len(shards), len(reads))


def test_reading_a_shard_tells_an_unreadable_one_from_a_damaged_one(tmp_path, monkeypatch):
    """read_shard (the metrics, the report, pipeline.outputs) retries transient errors; access or an outage
    is a storage error that never says to delete the file; only a file that can't be parsed is damage."""
    from fsspec.implementations.local import LocalFileOpener

    from pipeline.outputs import read_predictions

    out = str(tmp_path / "out")
    for i in range(2):
        sinks.commit_shard(out, None, f"shard-{i:05d}", [_row(i)], {"name": f"shard-{i:05d}", "num_rows": 1})
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    real_read, fail = LocalFileOpener.read, {"times": 0, "with": None}

    def read(self, *args):
        if fail["times"] and "shard-00001" in self.path:
            fail["times"] -= 1
            raise fail["with"]("x")
        return real_read(self, *args)

    monkeypatch.setattr(LocalFileOpener, "read", read)
    fail.update({"times": 2, "with": ConnectionResetError})                  # two resets: retried
    assert read_predictions(out, columns="image_id").column("image_id").to_pylist() == ["0-abc", "1-abc"]
    fail.update({"times": 99, "with": PermissionError})
    with pytest.raises(PermissionError, match=r"can't read committed shard .*shard-00001.*check access") as e:
        read_predictions(out, columns=["image_id"])
    assert "delete" not in str(e.value)
    fail.update({"times": 99, "with": ConnectionResetError})                 # an outage past the retries
    with pytest.raises(storage.StorageError, match="ConnectionResetError"):
        read_predictions(out)
    fail["times"] = 0
    (tmp_path / "out" / "predictions" / "shard-00001.parquet").write_bytes(b"PAR1 not a footer")
    with pytest.raises(ValueError, match="damaged after its commit: delete it"):
        read_predictions(out)
