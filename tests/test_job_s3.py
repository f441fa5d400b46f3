"""End to end against a real S3 server (SeaweedFS on loopback): S3 in, S3 out, no leaked credentials."""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from conftest import pipeline_job_config, plant_bad_and_odd_images, read_predictions, write_images

pytestmark = pytest.mark.slow


def test_s3_to_s3_rows_masks_statuses_and_no_secret_leaks(seaweedfs_s3, ray_local, tiny_model, tmp_path, caplog, capfd):
    from pipeline.job import run

    local = tmp_path / "corpus"
    write_images(local / "good", 5, seed=11)
    expect = plant_bad_and_odd_images(local / "odd")
    fs = seaweedfs_s3.fs()
    prefix = f"{seaweedfs_s3.bucket}/corpus"
    fs.put(str(local) + "/", prefix + "/", recursive=True)
    so = seaweedfs_s3.storage_options
    out = f"s3://{seaweedfs_s3.bucket}/out"
    caplog.set_level(logging.INFO)
    summary = run(pipeline_job_config(tiny_model, input=f"s3://{prefix}", output=out, storage_options=so,
                                      save_masks=True))
    n = 5 + len(expect)
    t = read_predictions(out, so)
    assert t.num_rows == n and len(set(t.column("image_uri").to_pylist())) == n
    assert all(u.startswith(f"s3://{prefix}/") for u in t.column("image_uri").to_pylist())
    rows = {u.rsplit("/", 1)[1]: r for u, r in zip(t.column("image_uri").to_pylist(), t.to_pylist())}
    for name, (status, _) in expect.items():
        assert rows[name]["status"] == status, (name, rows[name]["error"])
    for r in rows.values():
        if r["status"] == "ok":
            lab = np.asarray(Image.open(io.BytesIO(r["mask_png"])))
            assert lab.shape == (r["height"], r["width"])
            assert fs.exists(f"{seaweedfs_s3.bucket}/out/masks/{r['image_id']}.png")
    assert summary["ok"] == sum(1 for r in rows.values() if r["status"] == "ok")
    fs.invalidate_cache()
    run_doc = json.loads(fs.cat_file(f"{seaweedfs_s3.bucket}/out/run.json"))
    summ = json.loads(fs.cat_file(f"{seaweedfs_s3.bucket}/out/summary.json"))
    assert summ["images_total"] == n
    assert run_doc["runtime"]["storage_options"]["secret"] == "***"
    assert run_doc["runtime"]["storage_options"]["client_kwargs"]["endpoint_url"] == seaweedfs_s3.endpoint_url
    # credentials appear in no output object and in no log line
    blobs = [fs.cat_file(p) for p in fs.find(f"{seaweedfs_s3.bucket}/out")]
    captured = capfd.readouterr()
    text = caplog.text + captured.out + captured.err
    for secret in (seaweedfs_s3.secret, seaweedfs_s3.key):
        assert all(secret.encode() not in b for b in blobs)
        assert secret not in text
    # A re-run reads the shards' footers from the store: one cut short after its commit is redone, alone.
    shards = sorted(fs.find(f"{seaweedfs_s3.bucket}/out/predictions"))
    fs.pipe_file(shards[0], fs.cat_file(shards[0])[:100])
    kept = {p: fs.cat_file(p) for p in shards[1:]}
    again = run(pipeline_job_config(tiny_model, input=f"s3://{prefix}", output=out, storage_options=so,
                                    save_masks=True))
    assert again["shards_redone_damaged"] == [shards[0].rsplit("/", 1)[1][: -len(".parquet")]]
    assert again["shards_committed_this_run"] == 1 and again["output"] == summary["output"]
    fs.invalidate_cache()
    assert {p: fs.cat_file(p) for p in shards[1:]} == kept and read_predictions(out, so).num_rows == n


def test_s3_reads_stop_at_the_limit(seaweedfs_s3):
    """A ranged GET: an object longer than the limit costs the limit, a shorter one comes whole."""
    from pipeline.storage import read_uris

    fs = seaweedfs_s3.fs()
    blob = bytes(range(256)) * 400
    fs.pipe_file(f"{seaweedfs_s3.bucket}/limit/a.bin", blob)
    fs.pipe_file(f"{seaweedfs_s3.bucket}/limit/b[1].bin", blob)      # read literally, through cat_file
    uris = [f"s3://{seaweedfs_s3.bucket}/limit/a.bin", f"s3://{seaweedfs_s3.bucket}/limit/b[1].bin"]
    so = seaweedfs_s3.storage_options
    assert read_uris(uris, so, limit=1001) == [blob[:1001], blob[:1001]]
    assert read_uris(uris, so, limit=len(blob) + 5) == [blob, blob]
    assert read_uris(uris, so) == [blob, blob]
    fs.pipe_file(f"{seaweedfs_s3.bucket}/limit/empty.jpg", b"")          # a range on no bytes: 416 on S3
    assert read_uris([f"s3://{seaweedfs_s3.bucket}/limit/empty.jpg"], so, limit=1001) == [b""]


def test_an_empty_object_read_with_a_range_is_an_empty_file_not_a_range_error(tmp_path):
    """AWS (and moto) answer a ranged GET of a 0-byte object with 416 InvalidRange; the decode stage's
    error row must still say the file is empty."""
    moto_server = pytest.importorskip("moto.server")
    import boto3
    import numpy as np

    from conftest import free_ports
    from pipeline.storage import read_uris
    from pipeline.workers import decode_stage

    port = free_ports(1)[0]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                     region_name="us-east-1").create_bucket(Bucket="bkt")
        so = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        import s3fs
        fs = s3fs.S3FileSystem(**so, skip_instance_cache=True)
        fs.pipe_file("bkt/empty.jpg", b"")
        fs.pipe_file("bkt/a.bin", b"abc")
        assert read_uris(["s3://bkt/empty.jpg", "s3://bkt/a.bin"], so, limit=100) == [b"", b"abc"]
        out = decode_stage({"image_uri": np.array(["s3://bkt/empty.jpg"], dtype=object)}, storage_options=so,
                           max_pixels=1000, short_side=10, max_long_side=20)
        assert list(out["error"]) == ["empty file (0 bytes)"]
    finally:
        server.stop()


def test_s3_missing_prefix_fails_fast(seaweedfs_s3, tiny_model, capsys):
    from jobs.segment_dataset import main

    from conftest import pipeline_cli_args
    rc = main(["--input", f"s3://{seaweedfs_s3.bucket}/no/such/prefix", "--output", f"s3://{seaweedfs_s3.bucket}/o2",
               "--storage-options", json.dumps(seaweedfs_s3.storage_options)] + pipeline_cli_args(tiny_model))
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and seaweedfs_s3.secret not in err


def test_s3_evaluation_with_labels_on_s3(seaweedfs_s3, ray_local, tiny_model, tmp_path, capsys):
    """Images and labels on S3, nested alike (a/0.png, b/0.png: one stem, so only the layout pairs them);
    the driver's first-label check reads with the job's storage options."""
    from jobs.segment_dataset import main

    from conftest import pipeline_cli_args
    fs, bucket = seaweedfs_s3.fs(), seaweedfs_s3.bucket
    rng = np.random.default_rng(3)
    for sub in ("a", "b"):
        for kind, arr in (("img", (rng.random((30, 40, 3)) * 255).astype(np.uint8)),
                          ("lab", rng.integers(0, 4, (30, 40)).astype(np.uint8))):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            fs.pipe(f"{bucket}/eval/{kind}/{sub}/0.png", buf.getvalue())
    args = pipeline_cli_args(tiny_model)
    i = args.index("--vocabulary")
    args[i + 1] = "sky; road; car"
    out = f"s3://{bucket}/eval-out"
    rc = main(["--input", f"s3://{bucket}/eval/img", "--labels", f"s3://{bucket}/eval/lab", "--ignore-index", "3",
               "--output", out, "--storage-options", json.dumps(seaweedfs_s3.storage_options)] + args)
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads(fs.cat_file(f"{bucket}/eval-out/metrics.json"))
    assert metrics["images"] == 2 and metrics["images_failed"] == 0
    rows = read_predictions(out, seaweedfs_s3.storage_options).to_pylist()
    assert sorted(r["image_uri"] for r in rows) == [f"s3://{bucket}/eval/img/{sub}/0.png" for sub in ("a", "b")]
