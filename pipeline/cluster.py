"""The Ray cluster the job runs on: connecting to it, and sizing the work to it.

- :func:`init_ray`: attach to ``--ray-address`` / ``$RAY_ADDRESS`` (what ``ray job submit`` sets), else
  start a local Ray for this process;
- :func:`model_workers`: how many model actors, and the GPUs and CPUs each reserves;
- :func:`decode_memory` and :func:`check_decode_memory`: the heap a decode task reserves, and a refusal
  of a ``--max-pixels`` no node could hold.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from .job_config import JobConfig

log = logging.getLogger("segment_dataset")

REPO_ROOT = Path(__file__).resolve().parent.parent


def ray_address(address: Optional[str]) -> Optional[str]:
    """The cluster to connect to: ``address`` (``--ray-address``), else ``$RAY_ADDRESS``; None: none."""
    return address or os.environ.get("RAY_ADDRESS") or None


def init_ray(address: Optional[str]) -> bool:
    """Connect to ``address`` / ``$RAY_ADDRESS`` (``ray job submit`` sets it), else start an in-process
    local Ray. Returns True if this call started Ray (so the job shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_address(address)
    if address:
        check_reachable(address)
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": never attach to some other cluster found in /tmp/ray by accident. The workers
        # import this repository's packages; the user's own PYTHONPATH entries follow.
        path = os.pathsep.join([str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        ray.init(address="local", runtime_env={"env_vars": {"PYTHONPATH": path}})
    return True


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
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


def model_workers(cfg: JobConfig) -> tuple[int, float, float]:
    """``(model actors, GPUs per actor, CPUs per actor)``: by default one actor per GPU, else one CPU actor;
    each reserves 1 CPU, or on a local Ray too small for that, what leaves one CPU to decode and encode."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    gpw = cfg.num_gpus_per_worker if cfg.num_gpus_per_worker is not None else (1.0 if gpus > 0 else 0.0)
    address = ray_address(cfg.ray_address)
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


def check_decode_memory(cfg: JobConfig) -> None:
    """Refuse, on a local Ray, a ``--max-pixels`` whose decode tasks no node could hold: they would wait
    forever. A cluster's autoscaler may still start a bigger node, so there it is a warning."""
    import ray

    need = decode_memory(cfg.max_pixels)
    biggest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if need <= biggest:
        return
    message = (f"--max-pixels {cfg.max_pixels} makes each decode task reserve {need / 2**30:.1f} GiB, and the "
               f"largest node has {biggest / 2**30:.1f} GiB for tasks; lower --max-pixels")
    address = ray_address(cfg.ray_address)
    if address and address != "local":
        log.warning("%s, or the tasks wait for a node that large", message)
    else:
        raise ValueError(message)
