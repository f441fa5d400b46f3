"""`ray job submit` against a `ray start --head` cluster on loopback runs the job to completion."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

from conftest import REPO_ROOT, free_ports, kill_group, pipeline_cli_args, read_predictions, write_images

pytestmark = pytest.mark.slow


_TOKEN = uuid.uuid4().hex + uuid.uuid4().hex


def ray_cli_env() -> dict:
    """Environment for `ray start` / `ray job submit`: Ray's token auth with a per-test token
    (so nothing is read from or written to ~/.ray), and no inherited RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_TOKEN)
    return env


@pytest.fixture(scope="module")
def ray_head():
    """A `ray start --head --block` cluster on 127.0.0.1 (own ports, own temp dir, own process group)."""
    ray_bin = shutil.which("ray")
    if ray_bin is None:
        pytest.skip("the `ray` CLI is not installed")
    p = free_ports(9)
    tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={p[0]}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={p[1]}", f"--ray-client-server-port={p[2]}",
           f"--dashboard-agent-listen-port={p[3]}", f"--dashboard-agent-grpc-port={p[4]}",
           f"--metrics-export-port={p[5]}", f"--node-manager-port={p[6]}", f"--object-manager-port={p[7]}",
           f"--runtime-env-agent-port={p[8]}", "--num-cpus=2", "--num-gpus=0",
           f"--object-store-memory={300 * 1024 * 1024}", f"--temp-dir={tmp}", "--include-dashboard=true"]
    env = ray_cli_env()
    log = open(os.path.join(tmp, "head.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    dash = f"http://127.0.0.1:{p[1]}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(open(os.path.join(tmp, "head.log")).read()[-3000:])
            try:
                with urllib.request.urlopen(dash + "/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:
                break                      # the dashboard answers (401 without the token): it is up
            except OSError:
                time.sleep(1)
        else:
            raise RuntimeError("ray head's dashboard did not come up")
        yield dash
    finally:
        kill_group(proc, grace_s=20)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_ray_job_submit_runs_to_completion(ray_head, tiny_model, tmp_path):
    inputs = tmp_path / "in"
    write_images(inputs, 6, seed=9)
    out = tmp_path / "out"
    env = ray_cli_env()
    cmd = [shutil.which("ray"), "job", "submit", "--address", ray_head, "--working-dir", str(REPO_ROOT),
           "--", "python", "jobs/segment_dataset.py", "--input", str(inputs), "--output", str(out),
           "--shard-size", "4"] + pipeline_cli_args(tiny_model)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=str(REPO_ROOT))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "succeeded" in (res.stdout + res.stderr).lower()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 6 and summary["shards_total"] == 2
    t = read_predictions(str(out))
    assert t.num_rows == 6 and len(set(t.column("image_uri").to_pylist())) == 6


@pytest.mark.parametrize("gpus, address, gpw, want", [
    (0, "ray://head:10001", None, (1, 0.0, 1.0, True)),      # a cluster with its GPU nodes down: CPU, and a warning
    (0, None, None, (1, 0.0, 1.0, False)),                   # a laptop: CPU, nothing to say
    (0, "local", None, (1, 0.0, 1.0, False)),                # a local Ray, named: the same
    (0, "ray://head:10001", 1.0, (3, 1.0, 1.0, False)),      # asked for GPU actors: the autoscaler's business
    (4, "ray://head:10001", None, (4, 1.0, 1.0, False)),     # one actor per GPU
])
def test_default_workers_and_the_cpu_warning_on_a_cluster(gpus, address, gpw, want, tiny_model, monkeypatch, caplog):
    import ray

    from conftest import pipeline_job_config
    from pipeline.cluster import model_workers

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": float(gpus)} if gpus else {"CPU": 8.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = pipeline_job_config(tiny_model, input="x", output="y", ray_address=address, num_gpus_per_worker=gpw,
                              workers=3 if gpw else None)
    assert model_workers(cfg) == want[:3]                  # (actors, GPUs each, CPUs each)
    assert ("--num-gpus-per-worker 1 --workers N" in caplog.text) == want[3]
