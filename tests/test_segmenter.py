"""Every method end to end on a tiny random model: shapes, determinism, label range, odd inputs."""
import argparse
import contextlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

import rfclip
from rfclip.benchmarks import BENCHMARKS, class_names, method_settings
from rfclip.segmenter import sliding_windows

from _tiny import PLANTED_DIMS, planted_crops, planted_files, planted_image  # noqa: F401

VOCAB = [["sky", "cloud"], ["road"], ["car", "vehicle"], ["tree"]]


def make_segmenter(files, method, **kw):
    cfg, weights = files
    if method.startswith("rfclip"):
        kw.setdefault("distraction_dims", PLANTED_DIMS)
    return rfclip.Segmenter(model=cfg, weights=weights, method=method, vocabulary=VOCAB, device="cpu", **kw)


@pytest.fixture(scope="module", params=rfclip.available_methods())
def segmenter(request, planted_files):
    return make_segmenter(planted_files, request.param, short_side=224)


def test_available_methods_cover_the_family():
    assert set(rfclip.available_methods()) == {"clip", "maskclip", "sclip", "clearclip", "naclip", "rfclip",
                                                "rfclip-release"}


def test_shapes_label_range_and_determinism(segmenter):
    img = planted_image(250, 330)
    a = segmenter.segment_batch([img])[0]
    b = segmenter.segment_batch([img])[0]
    assert a.labels.shape == (250, 330) and a.labels.dtype == np.int32
    assert a.confidence.shape == (250, 330) and a.confidence.dtype == np.float32
    assert a.labels.min() >= 0 and a.labels.max() < len(VOCAB)
    assert np.all((a.confidence > 0) & (a.confidence <= 1))
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.confidence, b.confidence)


def test_batch_across_images_matches_one_at_a_time(segmenter):
    imgs = [planted_image(250, 330, seed=1), planted_image(200, 180, seed=2), planted_image(300, 240, seed=3)]
    together = segmenter.segment_batch(imgs)
    for img, pred in zip(imgs, together):
        alone = segmenter.segment_batch([img])[0]
        np.testing.assert_allclose(pred.confidence, alone.confidence, atol=1e-4)
        assert (pred.labels != alone.labels).mean() < 1e-3


@pytest.mark.parametrize("shape", [(7, 5), (16, 16), (40, 500), (500, 30)])
def test_tiny_and_extreme_aspect_images(planted_files, shape):
    for short in (0, 224):
        seg = make_segmenter(planted_files, "rfclip", short_side=short)
        img = (np.random.default_rng(0).random((*shape, 3)) * 255).astype(np.uint8)
        assert seg.predict(img).shape == shape


def test_input_modes_and_exif_orientation(tiny_model):
    seg = make_segmenter(tiny_model, "clip", short_side=224)
    rgb = planted_image(120, 200)
    gray = Image.fromarray(rgb[:, :, 0], mode="L")
    rgba = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]), mode="RGBA")
    pal = Image.fromarray(rgb).convert("P")
    i16 = Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    for im in (gray, rgba, pal, i16, cmyk, rgb[:, :, 0], rgb.astype(np.float32) / 255):
        assert seg.predict(im).shape == (120, 200)
    # EXIF orientation 6 (rotate 90° clockwise): the label map is at the upright size.
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(buf, format="JPEG", exif=exif)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert seg.predict(im).shape == (200, 120)
    with pytest.raises(ValueError):
        seg.predict(np.zeros((0, 5, 3), np.uint8))


@pytest.mark.parametrize("h,w,crop,stride", [(336, 448, 224, 112), (224, 224, 224, 112), (100, 700, 224, 112),
                                             (561, 333, 448, 224), (50, 60, 224, 112), (300, 300, 0, 112)])
def test_sliding_windows_cover_every_pixel(h, w, crop, stride):
    cover = np.zeros((h, w), np.int32)
    wins = sliding_windows(h, w, crop, stride)
    for y1, y2, x1, x2 in wins:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert (y2 - y1) == min(crop, h) if crop else (y2 - y1) == h
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1
    if crop:
        ny = int(np.ceil(max(h - crop, 0) / stride)) + 1
        nx = int(np.ceil(max(w - crop, 0) / stride)) + 1
        assert len(wins) == ny * nx


def test_encode_dense_shape(segmenter):
    x = torch.randn(2, 3, 224, 160)
    feats = segmenter.encode_dense(x)
    assert feats.shape == (2, 14, 10, 32)
    with pytest.raises(ValueError, match="multiple of the patch"):
        segmenter.encode_dense(torch.randn(1, 3, 100, 100))
    with pytest.raises(ValueError, match=r"add a batch dimension: x\[None\]"):
        segmenter.encode_dense(torch.randn(3, 224, 160))
    with pytest.raises(ValueError, match="non-empty"):
        segmenter.encode_dense(torch.randn(0, 3, 224, 160))


def test_synonyms_take_the_max_and_prob_thd_sets_background(tiny_model):
    seg = make_segmenter(tiny_model, "clip", short_side=224)
    img = planted_image(128, 128)
    base = seg.segment_batch([img])[0]
    strict = make_segmenter(tiny_model, "clip", short_side=224, prob_thd=0.99).segment_batch([img])[0]
    assert np.all(strict.labels[base.confidence < 0.99] == 0)
    np.testing.assert_array_equal(strict.confidence, base.confidence)
    # The class probability is the max over its names: split "sky, cloud" into two classes and the
    # merged class's probability equals the larger of the two.
    split = rfclip.Segmenter(model=tiny_model[0], weights=tiny_model[1], method="clip", device="cpu", short_side=224,
                             vocabulary=[["sky"], ["cloud"], ["road"], ["car", "vehicle"], ["tree"]])
    p_split = split.segment_batch([img])[0]
    merged_label = np.where(p_split.labels <= 1, 0, p_split.labels - 1)
    np.testing.assert_array_equal(merged_label, base.labels)
    np.testing.assert_allclose(p_split.confidence, base.confidence, atol=1e-6)


def test_settings_resolve_from_method_benchmark_and_user(tiny_model):
    seg = rfclip.Segmenter(model=tiny_model[0], weights=tiny_model[1], method="sclip", benchmark="voc21",
                           device="cpu", batch_size=3)
    assert seg.num_classes == 21 and seg.class_names[:2] == ["background", "aeroplane"]
    assert BENCHMARKS["voc21"].vocabulary[0][0] == "sky"          # the stuff words that stand for background
    seg.set_vocabulary(["sky", "aeroplane"])                         # the user's own words keep their names
    assert seg.class_names == ["sky", "aeroplane"]
    assert class_names(BENCHMARKS["voc20"].vocabulary, "voc20")[0] == "aeroplane"
    with pytest.raises(ValueError, match="give a vocabulary or a benchmark, not both"):
        rfclip.Segmenter(model=tiny_model[0], weights=tiny_model[1], method="sclip", benchmark="voc21",
                         vocabulary="a; b")
    with pytest.raises(TypeError, match="quick_gelu is True, False or None"):
        rfclip.Segmenter(model=tiny_model[0], weights=tiny_model[1], method="clip", vocabulary="a", quick_gelu="false")
    assert class_names(BENCHMARKS["context60"].vocabulary, "context60")[0] == "background"
    assert class_names(BENCHMARKS["coco_object"].vocabulary, "coco_object")[0] == "background"
    voc = BENCHMARKS["voc21"].vocabulary                              # the class file given as a plain vocabulary
    assert class_names(voc)[:2] == ["background", "aeroplane"]
    assert class_names([tuple(c) for c in voc])[0] == "background"
    assert class_names(voc[:-1])[0] == "sky" and class_names(BENCHMARKS["ade20k"].vocabulary)[0] == "wall"
    assert seg.settings.logit_scale == 65.0 and seg.settings.area_thd == 0.1 and seg.settings.batch_size == 3
    assert method_settings("clearclip", "cityscapes")["slide_crop"] == 224
    assert method_settings("rfclip", "voc21")["slide_crop"] == 0
    assert method_settings("rfclip-release", "cityscapes")["global_from_crop"] is True
    with pytest.raises(TypeError, match="unknown setting"):
        make_segmenter(tiny_model, "clip", lamda=0.5)
    with pytest.raises(ValueError, match="unknown method"):
        make_segmenter(tiny_model, "sam")
    for method in ("rfclip", "rfclip-release"):         # refused at construction, not at the first image
        with pytest.raises(ValueError, match="distraction dimensions are unknown"):
            rfclip.Segmenter(model=tiny_model[0], weights=tiny_model[1], method=method, vocabulary=VOCAB,
                             device="cpu")
    assert all(len(p.vocabulary) == p.num_classes for p in BENCHMARKS.values())
    assert [BENCHMARKS[b].num_classes for b in ("voc21", "voc20", "context60", "context59", "coco_object",
                                                "coco_stuff164k", "cityscapes", "ade20k")] == \
        [21, 20, 60, 59, 81, 171, 19, 150]


def test_settings_are_checked_against_their_types_and_ranges(tiny_model):
    from rfclip.cli_args import parse_setting
    from rfclip.settings import make_settings

    # Command-line spellings become the setting's type; "off" is not a truthy string.
    assert parse_setting("pamr=off") == ("pamr", False) and parse_setting("pamr=False") == ("pamr", False)
    assert parse_setting("defocus_ncut=no") == ("defocus_ncut", False) and parse_setting("pamr=true") == ("pamr", True)
    assert parse_setting("tau=None") == ("tau", None) and parse_setting("tau=null") == ("tau", None)
    assert parse_setting("distraction_dims=0,1,2") == ("distraction_dims", (0, 1, 2))
    assert parse_setting("distraction_dims=[4, 162]") == ("distraction_dims", (4, 162))
    assert parse_setting("batch_size=8") == ("batch_size", 8) and parse_setting("lam=1") == ("lam", 1.0)
    for bad in ["pamr=maybe", "batch_size=2.5", "distraction_dims=[]", "short_side=big", "lam=NaN",
                "short_side=Infinity", "short_side=1e400"]:
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            parse_setting(bad)
    # The Python API checks the same way, and the ranges that would give NaN or nonsense.
    assert make_settings("clip", {"pamr": "off"}).pamr is False
    numpy = make_settings("rfclip", {"short_side": np.int64(448), "lam": np.float32(0.5), "pamr": np.bool_(True),
                                     "distraction_dims": np.array([4, 162]), "h_threshold": 1.5})
    assert (numpy.short_side, numpy.lam, numpy.pamr, numpy.distraction_dims) == (448, 0.5, True, (4, 162))
    assert type(numpy.short_side) is int and type(numpy.pamr) is bool
    assert make_settings("rfclip", {"distraction_dims": 4}).distraction_dims == (4,)
    assert make_settings("rfclip", {"distraction_dims": range(3)}).distraction_dims == (0, 1, 2)
    for kw, msg in [({"pamr": "no way"}, "true or false"), ({"batch_size": 2.5}, "integer"),
                    ({"batch_size": True}, "integer"), ({"short_side": "336"}, "integer"),
                    ({"distraction_dims": []}, "non-empty"), ({"naclip_sigma": 0}, "> 0"),
                    ({"prob_thd": 2}, r"\[0, 1\]"), ({"tau": -1}, ">= 0"), ({"release_keep": 5}, r"\[0, 1\]"),
                    ({"mean_vector_weight": 2}, r"\[0, 1\]"), ({"ncut_iters": 0}, ">= 1")]:
        with pytest.raises(ValueError, match=msg):
            make_settings("rfclip", kw)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        make_segmenter(tiny_model, "rfclip-release", distraction_dims=[0, 1], global_input_size=20)


def test_api_misuse_is_a_clear_error_not_a_wrong_result(tiny_model):
    import warnings

    seg = make_segmenter(tiny_model, "clip", short_side=64)
    img = np.zeros((48, 64, 3), np.uint8)
    for one in (img, Image.fromarray(img), "street.jpg", torch.zeros(3, 8, 8)):   # one image, not a list
        with pytest.raises(TypeError, match=r"takes a list of images.*segment_batch\(\[image\]\)"):
            seg.segment_batch(one)
    assert len(seg.segment_batch(iter([img, img]))) == 2                           # any iterable of images
    assert len(seg.segment_batch(np.stack([img, img]))) == 2                       # or a (B, H, W, C) array
    for sizes, msg in [([(0, 0)], "two positive whole numbers"), ([(-1, 5)], "positive"), ([(10, 4, 3)], r"\(H, W\)"),
                       ([(10.7, 4)], "whole"), ([(4, 4), (4, 4)], "one \\(H, W\\) per image: 2 for 1"),
                       ([(True, True)], "two positive whole numbers"), ([(64, 48)], "another aspect ratio")]:
        with pytest.raises(ValueError, match=msg):
            seg.segment_batch([img], original_sizes=sizes)
    assert seg.segment_batch([img], original_sizes=[(np.int64(24), 32.0)])[0].labels.shape == (24, 32)
    assert seg.segment_batch([img], original_sizes=[(481, 640)])[0].labels.shape == (481, 640)   # resize rounding
    with pytest.raises(TypeError, match="torch tensor"):
        seg.encode_dense(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(TypeError, match="normalised float images"):
        seg.encode_dense(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="hold no 16x16 patch"):
        seg.encode_dense(torch.zeros(1, 3, 0, 32))
    read_only = np.asarray(Image.fromarray(img))                                    # PIL's buffer: not writable
    assert not read_only.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                              # torch's non-writable warning
        seg.predict(read_only)
    cfg = seg.config()
    cfg["vocabulary"].append(["c"])
    cfg["vocabulary"][0].append("x")
    assert seg.config()["vocabulary"] == seg.vocabulary == VOCAB and seg.num_classes == 4
    with pytest.raises(TypeError, match="vocabulary is None"):
        seg.set_vocabulary(None)
    model, weights = tiny_model
    for kw, error, msg in [({"device": "gpu"}, ValueError, "unknown device 'gpu'"),
                           ({"device": "mps"}, ValueError, "runs on 'cpu' and 'cuda'"),
                           ({"device": True}, TypeError, "device is a string"),
                           ({"device": np.int64(0)}, ValueError, "CUDA is not available") if not
                           torch.cuda.is_available() else ({"device": "tpu"}, ValueError, "unknown device"),
                           ({"image_mean": (123.7, 116.3, 103.5), "image_std": (58.4, 57.1, 57.4)}, ValueError,
                            "0-1 scale"),
                           ({"slide_crop": 8, "slide_stride": 4}, ValueError, "at least the patch size 16"),
                           ({"weights": None}, TypeError, "weights is an open_clip tag")]:
        with pytest.raises(error, match=msg):
            rfclip.Segmenter(**{"model": model, "weights": weights, "method": "clip", "vocabulary": VOCAB, **kw})


def test_sclip_area_rule_drops_small_and_zero_area_classes(tiny_model):
    """VOC21's rule (METHODS.md §2, SCLIP): classes 1.. with area <= area_thd of the foreground get
    probability 0, zero-area ones too, so their pixels fall to what survives (here the background)."""
    seg = rfclip.Segmenter(model=tiny_model[0], weights=tiny_model[1], method="sclip",
                           vocabulary=["background", "small", "runner-up", "big"], device="cpu", area_thd=0.1)
    logits = torch.zeros(4, 10, 10)
    logits[0, :, :] = 1.0
    logits[3, :, 5:] = 2.0                  # "big" wins 50 pixels
    logits[1, 0, :3] = 3.0                  # "small" wins 3 pixels: 3 <= 0.1 * 53
    logits[2, 0, :3] = 2.5                  # "runner-up" is second there but wins no pixel anywhere
    image = torch.zeros(3, 10, 10, dtype=torch.uint8)
    labels = seg._labels(logits, (10, 10), image).labels
    assert (labels[0, :3] == 0).all() and (labels[:, 5:] == 3).all()
    assert int((labels == 2).sum()) == 0 and int((labels == 1).sum()) == 0
    seg_off = rfclip.Segmenter(model=tiny_model[0], weights=tiny_model[1], method="sclip",
                               vocabulary=["background", "small", "runner-up", "big"], device="cpu")
    assert (seg_off._labels(logits, (10, 10), image).labels[0, :3] == 1).all()    # area_thd None: kept


def test_vocabulary_parsing_and_files(tmp_path):
    assert rfclip.parse_vocabulary("sky, cloud; road ;car") == [["sky", "cloud"], ["road"], ["car"]]
    f = tmp_path / "cls.txt"
    f.write_text("\ufeffsky, cloud\nroad\ncar\n\n", encoding="utf-8")          # a BOM, blank lines at the end
    assert rfclip.load_vocabulary(str(f)) == [["sky", "cloud"], ["road"], ["car"]]
    f.write_text("sky, cloud\nroad\n\ncar\n")                           # label indices follow the lines
    with pytest.raises(ValueError, match="line 3 is blank"):
        rfclip.load_vocabulary(str(f))
    with pytest.raises(ValueError, match="empty"):
        rfclip.parse_vocabulary(" ; ")
    assert rfclip.parse_vocabulary("sky; road;") == [["sky"], ["road"]]
    with pytest.raises(ValueError, match="class 1 .between two ';'. has no name"):
        rfclip.parse_vocabulary("sky;;road")
    with pytest.raises(ValueError, match="names differing only in case are one to CLIP"):
        rfclip.parse_vocabulary("Sky; road; sky")
    with pytest.raises(TypeError, match="vocabulary class 0 is 1; give a name"):
        rfclip.Segmenter(vocabulary=[1, 2])
    from rfclip.vocabulary import normalize_vocabulary
    with pytest.raises(TypeError, match="not a set"):
        normalize_vocabulary({"sky", "road"})                  # its order changes with the hash seed
    with pytest.raises(TypeError, match="not a dict"):
        normalize_vocabulary({"sky": ["cloud"], "road": []})
    with pytest.raises(ValueError, match="classes 0 and 2 are both named 'sky'"):
        rfclip.parse_vocabulary("sky; road; sky, cloud")
    assert normalize_vocabulary(["bed", ["other", "bed"]]) == [["bed"], ["other", "bed"]]   # COCO-Object style


def test_text_embeddings_are_cached(tiny_model):
    seg = make_segmenter(tiny_model, "clip")
    calls = []
    original = seg.clip.encode_text
    seg.clip.encode_text = lambda t: calls.append(len(t)) or original(t)
    seg.set_vocabulary(VOCAB)
    assert calls == []
    seg.set_vocabulary(VOCAB + [["a name no other test uses 7f3a"]])
    assert calls == [80]                       # one new name, 80 templates


def test_pamr_runs_and_keeps_shapes(tiny_model):
    seg = make_segmenter(tiny_model, "clip", short_side=224, pamr=True)
    assert seg.predict(planted_image(100, 150)).shape == (100, 150)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_on_cpu_is_close_to_fp32(planted_files, precision, monkeypatch):
    """On painted crops, so that RF-CLIP's steps run in both precisions (the cut is counted)."""
    from rfclip import refocus

    cuts = []
    original = refocus.defocused_tokens
    monkeypatch.setattr(refocus, "defocused_tokens", lambda w, *a, **kw: cuts.append(w.dtype) or original(w, *a, **kw))
    fp32 = make_segmenter(planted_files, "rfclip", short_side=224)
    low = make_segmenter(planted_files, "rfclip", short_side=224, precision=precision)
    x = planted_crops(2, 224, 224, torch.float32)
    a = torch.nn.functional.normalize(fp32.encode_dense(x).float(), dim=-1)
    assert cuts
    cuts.clear()
    b = torch.nn.functional.normalize(low.encode_dense(x).float(), dim=-1)
    assert cuts
    cos = (a * b).sum(-1)
    assert cos.mean() > 0.99           # stated tolerance for 16-bit image towers: mean cosine > 0.99


def test_auto_plan_is_explicit_on_cpus_and_graphed_on_cuda_where_a_graph_can_hold_the_forward():
    from rfclip.plans import resolve_plan
    from rfclip.settings import make_settings

    cpu, cuda = torch.device("cpu"), torch.device("cuda")        # resolving a plan touches no device
    assert resolve_plan(make_settings("rfclip"), cpu) == "explicit"
    assert resolve_plan(make_settings("rfclip"), cuda) == "graphed"
    assert resolve_plan(make_settings("clip"), cuda) == "graphed"
    assert resolve_plan(make_settings("rfclip", {"slide_crop": 0}), cuda) == "fused"        # whole images: shapes vary
    assert resolve_plan(make_settings("rfclip", {"short_side": 0}), cuda) == "fused"        # images keep their size
    assert resolve_plan(make_settings("rfclip", {"short_side": 200}), cuda) == "fused"      # windows cut short
    assert resolve_plan(make_settings("rfclip", {"ncut_solver": "eigh"}), cuda) == "fused"  # cuSOLVER: not capturable
    assert resolve_plan(make_settings("rfclip", {"plan": "fused"}), cuda) == "fused"


def test_plans_and_kernels_that_cannot_run_are_refused_up_front(planted_files, monkeypatch):
    def build(**kw):
        return rfclip.Segmenter(model=planted_files[0], weights=planted_files[1], method="rfclip", vocabulary=VOCAB,
                                device="cpu", distraction_dims=list(range(8)), **kw)
    with pytest.raises(ValueError, match="plan must be one of"):
        build(plan="fast")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        build(plan="graphed")
    with pytest.raises(ValueError, match="cuSOLVER"):
        build(plan="graphed", ncut_solver="eigh")
    with pytest.raises(ValueError, match="attention_kernels must be one of"):
        build(attention_kernels="cuda")
    with pytest.raises(ValueError, match="not 'explicit'"):
        build(attention_kernels="triton", plan="explicit")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="attention_kernels='triton' needs a CUDA device"):
        build(attention_kernels="triton")
    assert build().plan == "explicit"


def test_a_failed_graph_capture_under_auto_falls_back_to_the_fused_plan_and_says_so(planted_files, monkeypatch):
    """plan="auto" chose "graphed" (as on a CUDA device; here the plan is forced and the capture refused):
    one warning, the fused plan from then on, the same labels as a fused segmenter, and execution() says
    what ran. A named "graphed" raises instead."""
    import gc
    import warnings
    import weakref

    from rfclip import graphs, segmenter as segmenter_module

    fused = make_segmenter(planted_files, "rfclip", batch_size=4, plan="fused")
    captures = []

    def refuse(self, x):
        captures.append(tuple(x.shape))
        raise graphs.CaptureFailed("operation not permitted when stream is capturing")
    monkeypatch.setattr(graphs.GraphedEncoder, "_capture", refuse)
    monkeypatch.setattr(segmenter_module, "resolve_plan", lambda settings, device: "graphed")
    auto = make_segmenter(planted_files, "rfclip", batch_size=4)
    assert auto.plan == "graphed" and isinstance(auto._graphed, graphs.GraphedEncoder)
    images = [planted_image(250, 330), planted_image(300, 200)]
    with pytest.warns(RuntimeWarning, match="plan='auto': capturing .* failed .* Running the 'fused' plan") as said:
        got = auto.predict_batch(images)
    assert [w.filename for w in said] == [__file__]                           # the caller's line, not rfclip's
    assert captures == [(4, 3, 224, 224)] and auto._graphed is None
    for a, b in zip(got, fused.predict_batch(images)):
        np.testing.assert_array_equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = auto.predict_batch(images)                                    # no second capture, no warning
    assert captures == [(4, 3, 224, 224)]
    for a, b in zip(again, got):
        np.testing.assert_array_equal(a, b)
    run = auto.execution()
    assert run["plan"] == "fused" and auto.method.settings.plan == "fused" and auto.settings.plan == "auto"
    assert run["fallbacks"] == ["graphed plan: CUDA graph capture failed (operation not permitted when stream "
                                "is capturing); ran the fused plan"]
    assert run["attention_kernels"] == "torch" and run["device"] == "cpu"
    ref = weakref.ref(auto)
    gc.disable()                                     # no reference cycle keeps a dropped segmenter (and its GPU memory)
    try:
        del auto
        assert ref() is None
    finally:
        gc.enable()

    named = make_segmenter(planted_files, "rfclip", batch_size=4, plan="graphed")
    with pytest.raises(graphs.CaptureFailed, match="operation not permitted"):
        named.predict(images[0])


def test_execution_reports_the_resolved_plan_and_kernels(planted_files):
    run = make_segmenter(planted_files, "rfclip").execution()
    assert run == {"device": "cpu", "plan": "explicit", "attention_kernels": "torch", "ncut_kernels": "torch",
                   "distractors": {"dims": list(range(8)), "tau": 5 / 64, "min_received_attention": None},
                   "fallbacks": []}
    assert make_segmenter(planted_files, "clip").execution() == {"device": "cpu", "plan": "explicit",
                                                                 "fallbacks": []}


def test_release_embeds_each_whole_image_once_and_no_text(planted_files):
    """rfclip-release's global CLS costs one forward row per image, not one per crop, and images of one
    size share that forward; the text embeddings are computed before, so segmenting encodes no text."""
    seg = make_segmenter(planted_files, "rfclip-release", short_side=224)
    shapes, texts = [], []
    encode, encode_text = seg.method.encode, seg.clip.encode_text
    seg.method.encode = lambda x: shapes.append(tuple(x.shape)) or encode(x)
    seg.clip.encode_text = lambda t: texts.append(len(t)) or encode_text(t)
    images = [planted_image(250, 330, seed=1), planted_image(300, 240, seed=3), planted_image(250, 330, seed=2)]
    seg.segment_batch(images)
    crop = (seg.settings.slide_crop,) * 2
    crop_rows = sum(s[0] for s in shapes if s[2:] == crop)
    whole = sorted((s[0], s[2:]) for s in shapes if s[2:] != crop)
    assert crop_rows == 2 + 2 + 2                              # 224x296 and 280x224 images: 2 windows each
    assert whole == [(1, (288, 224)), (2, (224, 304))]         # each image once, padded to the patch; same size, one batch
    assert texts == []


def test_bilinear_row_bands_resize_as_interpolate_does_a_band_at_a_time():
    from rfclip.images import bilinear_row_bands

    g = torch.Generator().manual_seed(0)
    for (h, w), (H, W) in [((21, 28), (375, 500)), ((336, 448), (300, 400)), ((5, 7), (5, 7)), ((1, 1), (4, 3))]:
        x = torch.randn(6, h, w, generator=g)
        want = torch.nn.functional.interpolate(x[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        for rows in (1, 7, H):
            bands = list(bilinear_row_bands(x, (H, W), max_bytes=6 * W * 4 * rows))
            assert [r1 - r0 for r0, r1, _ in bands][:-1] == [rows] * (len(bands) - 1)
            got = torch.cat([b for _, _, b in bands], dim=1)
            if rows == H:
                assert torch.equal(got, want)                     # one band: PyTorch's own kernel
            else:   # source positions within an ulp of PyTorch's, times a slope of a few units
                torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method,preset", [("sclip", "voc21"), ("clearclip", None)])
def test_labels_in_row_bands_match_the_whole_image(planted_files, method, preset, monkeypatch):
    """A band budget of a few rows (the area rule's class probabilities kept, then made again) gives the
    labels and confidences of the whole image in one band; VOC21's area rule and prob_thd included."""
    import rfclip.segmenter as segmenter_module

    kw = {"benchmark": preset} if preset else {"vocabulary": VOCAB}
    seg = rfclip.Segmenter(model=planted_files[0], weights=planted_files[1], method=method, device="cpu", **kw)
    img = planted_image(250, 330)
    size = (3 * 250, 3 * 330)                                  # predictions at 3x: a real resize
    small = rfclip.images.resize_short_side(img, seg.settings.short_side, seg.settings.max_long_side)
    t = seg._normalise(torch.from_numpy(small).permute(2, 0, 1))
    model_logits = seg._image_logits([t])[0]
    # cosine-sized noise, whose labels change from pixel to pixel; its slopes are steeper than the model's,
    # so the float rounding of the resize (about 1e-6) moves its confidences more
    noise = 0.1 * torch.randn(model_logits.shape, generator=torch.Generator().manual_seed(0))
    for logits in (model_logits, noise):
        monkeypatch.undo()
        whole = seg._labels(logits, size, t)
        q, k = logits.shape[0], seg.num_classes
        for budget in (k * size[0] * size[1], 5 * q * size[1] * 4):   # kept for the area rule; made again
            monkeypatch.setattr(segmenter_module, "LABEL_BAND_BYTES", budget)
            banded = seg._labels(logits, size, t)
            assert (banded.labels == whole.labels).mean() > 0.9999
            np.testing.assert_allclose(banded.confidence, whole.confidence, atol=1e-5 if logits is model_logits else 1e-4)
        assert len(np.unique(whole.labels)) >= (3 if logits is noise else 1)   # the tiny model's may be one class


def test_pamr_labels_in_row_bands_match_the_whole_image(planted_files, monkeypatch):
    """With PAMR, bands of rows refined with a halo (here 160 rows each, so 4 bands) give the labels of the
    whole image refined at once."""
    import rfclip.pamr as pamr_module

    seg = rfclip.Segmenter(model=planted_files[0], weights=planted_files[1], method="clearclip", device="cpu",
                           vocabulary=VOCAB, pamr=True)
    img = planted_image(250, 330)
    small = rfclip.images.resize_short_side(img, seg.settings.short_side, seg.settings.max_long_side)
    t = seg._normalise(torch.from_numpy(small).permute(2, 0, 1))
    logits = seg._image_logits([t])[0]
    logits = logits + 0.1 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    size = (600, 400)
    whole = seg._labels(logits, size, t)
    bands = []
    original = pamr_module.pamr_row_bands
    monkeypatch.setattr(rfclip.segmenter, "pamr_row_bands",
                        lambda *a, **kw: (bands.append(b[:2]) or b for b in original(*a, max_bytes=1, **kw)))
    banded = seg._labels(logits, size, t)
    assert bands == [(0, 160), (160, 320), (320, 480), (480, 600)]
    assert (banded.labels == whole.labels).mean() > 0.9999
    np.testing.assert_allclose(banded.confidence, whole.confidence, atol=1e-4)
    assert len(np.unique(whole.labels)) >= 2


class _SettingsRecorder:
    """Settings that remember which fields were read."""

    def __init__(self, settings):
        object.__setattr__(self, "_s", settings)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name):
        if name in rfclip.settings.SETTING_NAMES:
            self.read.add(name)
        return getattr(self._s, name)


@pytest.mark.parametrize("method", rfclip.available_methods())
def test_a_method_reads_no_other_methods_setting_and_a_given_one_warns(planted_files, method, monkeypatch):
    """METHOD_SPECIFIC_SETTINGS is what the code reads: a forward (RF-CLIP's steps running, PAMR on) reads
    no specific setting outside its method's set, so the warning for one never says so wrongly."""
    from rfclip.settings import METHOD_SPECIFIC_SETTINGS, unused_settings

    seg = make_segmenter(planted_files, method, short_side=224, pamr=True, global_semantics_weight=0.25,
                         mean_vector_weight=0.03) if method == "rfclip-release" else \
        make_segmenter(planted_files, method, short_side=224, pamr=True)
    recorder = _SettingsRecorder(seg.settings)
    seg.settings = seg.method.settings = recorder
    # The plan (how a forward runs, not what it computes) is resolved from the kernel and solver settings
    # for every method: not counted.
    import rfclip.methods.rfclip as rf
    plan = rf.resolve_plan
    monkeypatch.setattr(rf, "resolve_plan", lambda st, device: plan(getattr(st, "_s", st), device))
    seg.method.__dict__.pop("_distraction_setup", None)
    seg.predict(planted_image())
    specific = frozenset().union(*METHOD_SPECIFIC_SETTINGS.values())
    assert recorder.read & specific <= METHOD_SPECIFIC_SETTINGS.get(method, frozenset()), recorder.read & specific
    if method in ("rfclip", "rfclip-release"):                  # its steps ran: its own settings were read
        assert {"tau", "distraction_dims"} <= recorder.read
    with pytest.warns(UserWarning, match=r"does not use the setting\(s\) \['lam'\]") if method != "rfclip" else \
            contextlib.nullcontext():
        make_segmenter(planted_files, method, lam=0.5)
    assert unused_settings("clip", ["lam", "logit_scale", "naclip_sigma"]) == ["lam", "naclip_sigma"]


def test_known_distraction_dims_on_other_weights_warn(planted_files, monkeypatch):
    """The known channels were found on OpenAI's weights (§3a): with other weights the dimensions left
    at their default warn and name the tool that finds theirs; passed dimensions, OpenAI's weights and
    methods that do not use them stay quiet."""
    import warnings

    import rfclip.settings
    import rfclip.weights
    from rfclip.model_factory import register_model

    cfg, weights = planted_files
    arch = register_model(cfg)
    monkeypatch.setitem(rfclip.settings.DISTRACTION_DIMS, arch, tuple(PLANTED_DIMS))
    make = lambda method, **kw: rfclip.Segmenter(model=cfg, weights=weights, method=method,  # noqa: E731
                                                 vocabulary=VOCAB, device="cpu", **kw)
    for method in ("rfclip", "rfclip-release"):
        with pytest.warns(UserWarning, match=r"found on OpenAI's .*rfclip.find_distraction_dims"):
            make(method)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make("rfclip", distraction_dims=PLANTED_DIMS)
        make("clip")
        monkeypatch.setitem(rfclip.weights.OPENAI_SHA256, rfclip.weights.file_sha256(weights), arch)
        seg = make("rfclip", quick_gelu=True)
    assert seg.weights.openai and seg.method.settings.distraction_dims is None
    # config() records the settings as given (None), execution() the channels that ran
    assert seg.config()["settings"]["distraction_dims"] is None
    assert seg.execution()["distractors"]["dims"] == sorted(PLANTED_DIMS)
    assert "distractors" not in make("clip").execution()


def test_public_helpers_refuse_what_they_would_get_wrong(tiny_model, tmp_path):
    """``sliding_windows`` with a stride that leaves pixels uncovered, ``resize_short_side`` on a float or
    grey array, and a ``model``/``weights_sha256`` of the wrong type or a broken model JSON: clear errors."""
    from rfclip.images import resize_short_side
    from rfclip.segmenter import sliding_windows

    for stride in (0, 500):
        with pytest.raises(ValueError, match="stride must lie in 1..crop"):
            sliding_windows(1000, 300, 224, stride)
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb.setflags(write=False)                                    # np.asarray(PIL image) is read-only: no warning
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resize_short_side(rgb, 15).shape == (15, 20, 3)
    for bad in (np.zeros((30, 40, 3), np.float32), np.zeros((30, 40), np.uint8)):
        with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB array.*rfclip.to_rgb_array"):
            resize_short_side(bad, 15)
    cfg, weights = tiny_model
    from pathlib import Path
    seg = rfclip.Segmenter(model=Path(cfg), weights=Path(weights), method="clip", vocabulary="a; b", device="cpu")
    assert seg.config()["model"] == cfg
    with pytest.raises(TypeError, match="model is an open_clip architecture name"):
        rfclip.Segmenter(model=None, weights=weights, method="clip", vocabulary="a; b")
    with pytest.raises(TypeError, match="weights_sha256 is a string of 64 hex digits, not 123"):
        rfclip.Segmenter(model=cfg, weights=weights, weights_sha256=123, method="clip", vocabulary="a; b")
    broken = tmp_path / "broken.json"
    broken.write_text("{embed_dim: 1}")
    with pytest.raises(ValueError, match=f"model config {broken} is not valid JSON"):
        rfclip.Segmenter(model=str(broken), weights=weights, method="clip", vocabulary="a; b")
