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
