"""Faults: the driver killed after some shards (then resumed), and a model actor killed mid-run."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import (REPO_ROOT, kill_group, pipeline_cli_args, pipeline_job_config, read_predictions,
                      start_local_ray, write_images)

pytestmark = pytest.mark.slow
N_IMAGES, SHARD = 24, 4


def _committed(out: Path) -> list[Path]:
    d = out / "predictions"
    return sorted(d.glob("shard-*.parquet")) if d.exists() else []


def _check_exactly_once(out: Path, inputs: Path) -> None:
    t = read_predictions(str(out))
    uris = t.column("image_uri").to_pylist()
    want = sorted(str(p) for p in inputs.rglob("*") if p.is_file())
    assert len(uris) == len(set(uris)) == len(want)            # no image duplicated
    assert sorted(uris) == want                                 # no image missing
    assert set(t.column("status").to_pylist()) == {"ok"}


def _interrupt_mid_run(tiny_model, tmp_path, seed: int, shards_first: int, sig: int, wait_s: float):
    """Run the CLI on ``N_IMAGES`` new images (slowed down by a worker delay), send ``sig`` to its process
    group once ``shards_first`` shards are committed, and wait up to ``wait_s`` for it to end.

    Returns ``(cmd, env without the delay, inputs, out, exit status, log text)``."""
    inputs = tmp_path / "in"
    write_images(inputs, N_IMAGES, seed=seed)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO_ROOT / "jobs" / "segment_dataset.py"), "--input", str(inputs), "--output", str(out),
           "--shard-size", str(SHARD)] + pipeline_cli_args(tiny_model)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log_path = tmp_path / "first.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, env={**env, "RFCLIP_TEST_WORKER_DELAY_S": "1.0"}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(_committed(out)) < shards_first and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        os.killpg(proc.pid, sig)
        try:
            rc = proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the driver still runs {wait_s:.0f} s after signal {sig}:\n" + log_path.read_text()[-3000:])
    finally:
        kill_group(proc)
        log.close()
    return cmd, env, inputs, out, rc, log_path.read_text()


def test_killed_driver_resumes_without_recomputing_or_duplicating(tiny_model, tmp_path):
    # SIGKILL to the group: the driver and its embedded Ray, at once
    cmd, env, inputs, out, _, _ = _interrupt_mid_run(tiny_model, tmp_path, 5, 2, signal.SIGKILL, 30)
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in _committed(out)}
    assert 2 <= len(first) < N_IMAGES // SHARD, "the kill must land mid-run"

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == len(first) * SHARD
    assert summary["ok"] == N_IMAGES - len(first) * SHARD
    for p in _committed(out):                                   # committed shards were not recomputed
        if p.name in first:
            assert (p.stat().st_mtime_ns, p.read_bytes()) == first[p.name]
    assert len(_committed(out)) == N_IMAGES // SHARD
    assert not list(out.rglob(".tmp-*"))
    _check_exactly_once(out, inputs)


def _descendants(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid``, from /proc (no psutil here)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _segment_worker_pids() -> list[int]:
    """PIDs of this test process's own Ray model actors (descendants only: never another session's)."""
    pids = []
    for p in _descendants(os.getpid()):
        try:
            if b"SegmentWorker" in open(f"/proc/{p}/cmdline", "rb").read():
                pids.append(p)
        except OSError:
            continue
    return pids


def test_killed_model_actor_every_image_exactly_once(tiny_model, tmp_path):
    import ray
    from pipeline.job import run

    tmp = start_local_ray({"RFCLIP_TEST_WORKER_DELAY_S": "1.0"})
    try:
        inputs = tmp_path / "in"
        write_images(inputs, N_IMAGES, seed=6)
        out = tmp_path / "out"
        cfg = pipeline_job_config(tiny_model, input=str(inputs), output=str(out), shard_size=SHARD)
        result: dict = {}

        def target():
            result["summary"] = run(cfg)

        th = threading.Thread(target=target, daemon=True)
        th.start()
        deadline = time.time() + 240
        while len(_committed(out)) < 1 and time.time() < deadline and th.is_alive():
            time.sleep(0.1)
        pids = _segment_worker_pids()
        assert pids and th.is_alive(), "no model actor found mid-run"
        before = len(_committed(out))
        os.kill(pids[0], signal.SIGKILL)
        th.join(timeout=300)
        assert not th.is_alive()
        assert before < N_IMAGES // SHARD                        # it died with work left
        assert result["summary"]["ok"] == N_IMAGES and result["summary"]["duplicate_rows_dropped"] == 0
        _check_exactly_once(out, inputs)
        assert pids[0] not in _segment_worker_pids()             # that process is really gone
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_an_image_that_kills_its_model_process_every_time_becomes_an_error_row(tiny_model, tmp_path):
    """An image whose model process always dies (as the OOM killer would do it) ends the job's retries: Ray
    Data's own would go on forever. Its batch-mates, run again one per batch, are segmented; it becomes an
    error row that says so; every other shard commits as usual."""
    import ray
    from pipeline.job import run

    tmp = start_local_ray({"RFCLIP_TEST_WORKER_CRASH_ON": "poison"})
    try:
        inputs = tmp_path / "in"
        write_images(inputs, 7, seed=8)
        shutil.copy(next(inputs.rglob("*.png")), inputs / "b" / "poison.png")
        out = tmp_path / "out"
        cfg = pipeline_job_config(tiny_model, input=str(inputs), output=str(out), shard_size=SHARD)
        result: dict = {}
        th = threading.Thread(target=lambda: result.update(summary=run(cfg)), daemon=True)
        th.start()
        th.join(timeout=400)
        assert not th.is_alive(), "the job did not end"
        summary = result["summary"]
        assert (summary["ok"], summary["error"], summary["images_that_killed_a_worker"]) == (7, 1, 1)
        t = read_predictions(str(out))
        rows = {Path(u).name: (st, e) for u, st, e in zip(t.column("image_uri").to_pylist(),
                                                         t.column("status").to_pylist(), t.column("error").to_pylist())}
        assert len(rows) == t.num_rows == 8
        status, error = rows.pop("poison.png")
        assert status == "error" and "died on every try, with it alone in its batch" in error
        assert re.search(r"last as \w*Actor\w*Error", error), error            # Ray's own word for it
        assert {st for st, _ in rows.values()} == {"ok"}
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_window_where_every_batch_loses_its_process_stops_the_job_and_commits_nothing(tiny_model, tmp_path):
    """When no image of a window comes back (say, a model too big for the workers' memory), the images are
    not written off as error rows: the job stops, and a re-run on a better machine does them."""
    import ray
    from pipeline.job import PipelineError, run

    tmp = start_local_ray({"RFCLIP_TEST_WORKER_CRASH_ON": "img"})
    try:
        inputs = tmp_path / "in"
        write_images(inputs, 2, seed=10)
        out = tmp_path / "out"
        with pytest.raises(PipelineError, match="every batch of this window lost its process"):
            run(pipeline_job_config(tiny_model, input=str(inputs), output=str(out), shard_size=SHARD))
        assert not _committed(out)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_stage_that_raises_stops_the_job_with_its_shard_uncommitted_and_a_rerun_redoes_it(
        tiny_model, tmp_path, capsys):
    """Only a process that died makes an image an error row for good: an exception (here --save-masks
    writing where a file blocks the folder) stops the job, exit status 1, and the re-run does the work."""
    from jobs.segment_dataset import main

    inputs, out = tmp_path / "in", tmp_path / "out"
    write_images(inputs, 3, seed=9)
    out.mkdir()
    (out / "masks").write_text("a file where the masks folder goes")
    args = ["--input", str(inputs), "--output", str(out), "--save-masks"] + pipeline_cli_args(tiny_model)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "a pipeline stage failed" in err and "running the same command again redoes the rest" in err
    assert not _committed(out)
    (out / "masks").unlink()
    assert main(args) == 0
    _check_exactly_once(out, inputs)


def test_storage_that_cant_be_read_stops_the_job_instead_of_writing_error_rows(tiny_model, tmp_path, capsys):
    """An image on storage that can't be reached (retries spent) is not a bad image: the job stops, exit
    status 1, with the storage's error in one line and nothing committed, so a re-run reads it again."""
    from jobs.segment_dataset import main

    inputs = tmp_path / "in"
    write_images(inputs, 2, seed=4)
    manifest = tmp_path / "images.txt"
    manifest.write_text("\n".join([*(str(p) for p in sorted(inputs.iterdir())), "s3://bkt/a.jpg"]) + "\n")
    dead = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}, "key": "k", "secret": "s",
            "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    out = tmp_path / "out"
    args = ["--input", str(manifest), "--output", str(out), "--storage-options", json.dumps(dead)]
    assert main(args + pipeline_cli_args(tiny_model)) == 1
    err = capsys.readouterr().err
    assert ("error: a pipeline stage failed (StorageError: can't read s3://bkt/a.jpg, retries spent: "
            "EndpointConnectionError") in err and "running the same command again redoes the rest" in err, err
    assert not _committed(out)


def test_a_stage_exception_stops_the_window_early_not_at_its_end(tiny_model, tmp_path):
    """One image's mask can't be written (a folder holds its name): the job stops with the next batch that
    arrives, long before the other images of its window (one shard each, 0.5 s a model batch) are done."""
    import ray

    from pipeline import sources
    from pipeline.job import PipelineError, run

    inputs, out = tmp_path / "in", tmp_path / "out"
    write_images(inputs, 16, seed=4)
    first = sorted(str(p) for p in inputs.rglob("*.png"))[0]
    (out / "masks" / f"{sources.image_id(first, str(inputs))}.png" / "blocker").mkdir(parents=True)
    cfg = dict(input=str(inputs), output=str(out), shard_size=1, batch_size=1, decode_batch_size=1, save_masks=True)
    tmp = start_local_ray({"RFCLIP_TEST_WORKER_DELAY_S": "0.5"})
    try:
        with pytest.raises(PipelineError, match="a pipeline stage failed"):
            run(pipeline_job_config(tiny_model, **cfg))
        assert len(_committed(out)) <= 8, len(_committed(out))      # of the 15 that could be written
        shutil.rmtree(out / "masks" / f"{sources.image_id(first, str(inputs))}.png")
        run(pipeline_job_config(tiny_model, **cfg))
        _check_exactly_once(out, inputs)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_ctrl_c_stops_the_driver_promptly_and_a_rerun_finishes(tiny_model, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group: the driver and its local Ray) mid-run: the driver
    exits within a minute with status 130 and says how to resume; nothing half-written is left, and
    the same command run again finishes every image exactly once."""
    cmd, env, inputs, out, rc, text = _interrupt_mid_run(tiny_model, tmp_path, 7, 1, signal.SIGINT, 60)
    assert rc == 130, text[-3000:]
    assert "run the same command again" in text
    assert len(_committed(out)) < N_IMAGES // SHARD, "Ctrl-C must land mid-run"
    assert not list(out.rglob(".tmp-*"))

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    _check_exactly_once(out, inputs)


def test_an_interrupted_run_ends_ray_data_iteration_before_ray_shuts_down(tiny_model, tmp_path, monkeypatch):
    """An exception in the driver's loop ends Ray Data's iteration (its executor shutdown and stats update)
    while Ray is still up, and Ray is down after: cleanup that ran after ray.shutdown() could make a Ray
    call auto-start a new local Ray and hang the driver."""
    import gc

    import ray
    from ray.data.iterator import DataIterator

    from pipeline import job, shard_commits

    ended_with_ray_up = []
    end = DataIterator._on_iteration_end

    def spy(self, executor):
        ended_with_ray_up.append(ray.is_initialized())
        return end(self, executor)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DataIterator, "_on_iteration_end", spy)
    monkeypatch.setattr(shard_commits, "commit_rows", interrupt)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    inputs = tmp_path / "in"
    write_images(inputs, 4, seed=8)
    cfg = pipeline_job_config(tiny_model, input=str(inputs), output=str(tmp_path / "out"), shard_size=2)
    assert not ray.is_initialized()
    with pytest.raises(KeyboardInterrupt):
        job.run(cfg)
    gc.collect()
    assert ended_with_ray_up == [True]
    assert not ray.is_initialized()
