"""Large corpora run in windows of shards: every image exactly once, across windows and a resume."""
from __future__ import annotations

import pytest

from conftest import pipeline_job_config, read_predictions, write_images

pytestmark = pytest.mark.slow


def test_shard_windows_group_whole_shards():
    from pipeline.job import shard_windows

    class S:
        def __init__(self, n):
            self.items = [0] * n

    shards = [S(2), S(2), S(2), S(1), S(5)]
    wins = shard_windows(shards, 4)
    assert [[len(s.items) for s in w] for w in wins] == [[2, 2], [2, 1], [5]]   # a big shard stands alone
    assert sum(len(w) for w in wins) == len(shards)


def test_job_in_windows_writes_every_image_once(ray_local, tiny_model, tmp_path):
    from pipeline.job import run

    write_images(tmp_path / "imgs", 7, seed=5)
    out = tmp_path / "out"
    summary = run(pipeline_job_config(tiny_model, input=str(tmp_path / "imgs"), output=str(out), shard_size=2,
                                      window_images=3))
    assert summary["ok"] == 7 and summary["shards_total"] == 4
    uris = read_predictions(str(out)).column("image_uri").to_pylist()
    assert len(uris) == len(set(uris)) == 7


def test_a_duplicate_row_of_a_committed_shard_is_dropped_not_fatal(monkeypatch):
    """An actor restart can deliver a row again after its shard was committed: it is counted and dropped."""
    import numpy as np

    from pipeline import cluster, job, shard_commits, sources
    from pipeline.job_config import JobConfig

    items = [{"image_uri": f"/x/{i}.png", "label_uri": None} for i in range(2)]
    shards = sources.make_shards(items, 2)

    def row(pos):
        return {"image_uri": np.array([items[pos]["image_uri"]]), "shard": np.array([0]), "pos": np.array([pos]),
                "decode_pid": np.array([1]), "model_pid": np.array([2])}

    class Rows:
        def iter_batches(self, **kw):
            yield from (row(0), row(1), row(1))            # row 1 again, after shard-00000 is committed

    committed = []
    monkeypatch.setattr(job, "_build_dataset", lambda *a, **k: Rows())
    monkeypatch.setattr(cluster, "model_workers", lambda cfg: (1, 0.0, 1.0))
    monkeypatch.setattr(cluster, "check_decode_memory", lambda cfg: None)     # no Ray here to ask
    monkeypatch.setattr(shard_commits, "commit_rows",
                        lambda cfg, shard, rows, *a: committed.append((shard.name, sorted(rows))))
    counts = {"ok": 0, "error": 0, "duplicates_dropped": 0, "decoded_in_model_process": 0}
    job._run_window(JobConfig(output="/unused", progress=False), shards, sources.Inputs(items, None, "x"),
                    {"num_classes": 2}, {}, "sha", counts, set(), 0, 2)
    assert committed == [("shard-00000", [0, 1])] and counts["duplicates_dropped"] == 1
