"""The planted workloads of bench/bench_methods.py (isolated, clustered, dense) do what the README says they do."""
import sys
from pathlib import Path

import pytest
import torch

import rfclip
from rfclip import kernels
from rfclip.testing import make_tiny_model_files

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_methods  # noqa: E402


@pytest.fixture(scope="module")
def planted_rfclip(tmp_path_factory):
    """rfclip on a tiny ViT (4 layers) with distractors planted in channels 0-7, detecting the pattern
    that ``bench_methods.planted_images`` paints (pattern seed 0)."""
    cfg, weights = make_tiny_model_files(tmp_path_factory.mktemp("planted4"), plant=True, seed=0, layers=4)
    return rfclip.Segmenter(model=cfg, weights=weights, method="rfclip", vocabulary=["a", "b"], device="cpu",
                            distraction_dims=list(range(8)))


def counts(seg, workload):
    images = bench_methods.planted_images(4, 224, 224, 16, **bench_methods.WORKLOADS[workload])
    return bench_methods.distractor_counts(seg, bench_methods.to_batch(images, "cpu", torch.float32))


def test_isolated_distractors_are_smoothed_away_after_the_first_block(planted_rfclip):
    plain, found = counts(planted_rfclip, "isolated")
    assert all(c > 0 for c in plain)                   # the plain model keeps them in every block input
    assert found[0] > 0 and found[1] > 0               # block 1 input and output
    assert found[2:] == [0] * (len(found) - 2)         # step (d) removed them: no work in later blocks


def test_clustered_distractors_survive_smoothing(planted_rfclip):
    plain, found = counts(planted_rfclip, "clustered")
    iso_plain, _ = counts(planted_rfclip, "isolated")
    assert all(c > i for c, i in zip(plain, iso_plain))
    block_inputs = found[0::2]
    assert len(block_inputs) == 3 and all(c > 0 for c in block_inputs)   # steps (a)-(c) run in every block


def test_dense_distractors_outnumber_clustered_ones_in_every_block(planted_rfclip):
    _, dense = counts(planted_rfclip, "dense")
    _, clustered = counts(planted_rfclip, "clustered")
    assert all(d > c > 0 for d, c in zip(dense[0::2], clustered[0::2]))     # block inputs on rfclip's path


def test_op_counts_count_launches_not_views():
    x = torch.ones(3, 4)
    c = bench_methods.op_counts(lambda: (x.t(), x * 2, x.float(), x.clone().add_(1)))
    assert c == {"ops": 5, "launching": 3}             # t, to (x.float() hands back x) | mul, clone, add_
    assert bench_methods.op_counts(lambda: x.double()) == {"ops": 1, "launching": 1}           # a copy
    assert bench_methods.op_counts(lambda: x.t().contiguous()) == {"ops": 2, "launching": 1}   # view, copy
    assert bench_methods.op_counts(lambda: x.contiguous())["launching"] == 0                 # already is


def test_rfclip_dispatches_more_host_work_than_clip(planted_rfclip):
    x = bench_methods.to_batch(bench_methods.planted_images(2, 224, 224, 16, **bench_methods.WORKLOADS["clustered"]),
                               "cpu", torch.float32)
    ours = bench_methods.op_counts(lambda: planted_rfclip.encode_dense(x))
    plain = bench_methods.op_counts(lambda: planted_rfclip.clip.visual(x))
    assert plain["launching"] < ours["launching"] < ours["ops"]


def test_variant_names_set_the_settings_they_name(tiny_model):
    seg = bench_methods.build(tiny_model[0], tiny_model[1], "clip+fused+iters256", "cpu", "fp32")
    assert seg.settings.plan == "fused" and seg.settings.ncut_iters == 256 and seg.method_name == "clip"


@pytest.mark.skipif(not kernels.interpreted(), reason="the Triton cut on a CPU needs Triton's interpreter")
def test_the_cut_triton_variant_sets_ncut_kernels(tiny_model):
    seg = bench_methods.build(tiny_model[0], tiny_model[1], "clip+squaring+cut-triton", "cpu", "fp16")
    assert seg.settings.ncut_kernels == "triton" and seg.settings.ncut_solver == "squaring"


def test_paired_ratios_summarise_round_by_round_ratios():
    r = bench_methods.paired_ratios([2.0, 3.0, 4.4, 1.1, 2.2], [2.0, 2.0, 4.0, 1.0, 2.0])   # 1, 1.5, 1.1, 1.1, 1.1
    assert r["median"] == pytest.approx(1.1) and r["min"] == pytest.approx(1.0) and r["max"] == pytest.approx(1.5)
    assert r["q1"] == pytest.approx(1.1) and r["q3"] == pytest.approx(1.1)
    with pytest.raises(ValueError, match="same rounds"):
        bench_methods.paired_ratios([1.0, 2.0], [1.0])
