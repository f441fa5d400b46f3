"""The eight OVSS benchmarks (METHODS.md §5) and each method's published settings on them (§2-§4).

Tables here are data: class files ship in ``rfclip/vocab/``; ``METHOD_BENCHMARK_SETTINGS`` holds
what differs per (method, benchmark) from the method's defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .vocabulary import load_vocabulary

VOCAB_DIR = Path(__file__).parent / "vocab"


@dataclass(frozen=True)
class BenchmarkPreset:
    """One benchmark.

    Attributes:
        name: preset name (``voc21``, ...).
        class_file: path of the class-name file shipped with the package.
        reduce_zero_label: ground-truth label 0 is ignored and every other label shifted down by 1.
        ignore_index: ground-truth value that is ignored (after the shift, 255 stays 255).
        has_background: class 0 is a background class (``prob_thd`` applies).
        val_images: size of the standard val split.
    """

    name: str
    class_file: str
    reduce_zero_label: bool
    ignore_index: int
    has_background: bool
    val_images: int

    @property
    def vocabulary(self) -> list[list[str]]:
        return load_vocabulary(self.class_file)

    @property
    def num_classes(self) -> int:
        return len(self.vocabulary)


def _preset(name, file, reduce_zero, background, n) -> BenchmarkPreset:
    return BenchmarkPreset(name, str(VOCAB_DIR / file), reduce_zero, 255, background, n)


BENCHMARKS: dict[str, BenchmarkPreset] = {p.name: p for p in (
    _preset("voc21", "cls_voc21.txt", False, True, 1449),
    _preset("voc20", "cls_voc20.txt", True, False, 1449),
    _preset("context60", "cls_context60.txt", False, True, 5105),
    _preset("context59", "cls_context59.txt", True, False, 5105),
    _preset("coco_object", "cls_coco_object.txt", False, True, 5000),
    _preset("coco_stuff164k", "cls_coco_stuff.txt", False, False, 5000),
    _preset("cityscapes", "cls_city_scapes.txt", False, False, 500),
    _preset("ade20k", "cls_ade20k.txt", True, False, 2000),
)}
def class_names(vocabulary: list, benchmark: str | None = None) -> list[str]:
    """Each class's first name, in label order. Class 0 of a benchmark with a background class, given its
    own vocabulary, is called "background": VOC21, Context60 and COCO-Object list stuff words (``sky,
    wall, tree, ...``) on that line, and naming the class after the first would mislabel it. Without
    ``benchmark`` that holds for a vocabulary equal to such a benchmark's (its class file, say)."""
    names = [c[0] if isinstance(c, (list, tuple)) else str(c) for c in vocabulary]
    given = [[str(s) for s in c] if isinstance(c, (list, tuple)) else [str(c)] for c in vocabulary]
    presets = [BENCHMARKS[benchmark]] if benchmark in BENCHMARKS else [] if benchmark else list(BENCHMARKS.values())
    if any(p.has_background and given == p.vocabulary for p in presets):
        names[0] = "background"
    return names


BENCHMARK_ORDER = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff164k", "cityscapes", "ade20k")

_BG = ("voc21", "context60", "coco_object")


def _family_table(prob: dict, logit: dict | None = None, short: dict | None = None,
                  slide: dict | None = None, extra: dict | None = None) -> dict[str, dict]:
    table = {}
    for b in BENCHMARKS:
        s: dict = {"prob_thd": prob.get(b, 0.0)}
        if logit and b in logit:
            s["logit_scale"] = logit[b]
        if short and b in short:
            s["short_side"] = short[b]
        if slide and b in slide:
            s["slide_crop"], s["slide_stride"] = slide[b]
        if extra and b in extra:
            s.update(extra[b])
        table[b] = s
    return table


# name -> benchmark -> settings (§2 table; §3 evaluation settings; §4 release table).
METHOD_BENCHMARK_SETTINGS: dict[str, dict[str, dict]] = {
    "clip": _family_table({b: 0.2 for b in _BG}, short={"cityscapes": 560}),
    "maskclip": _family_table({b: 0.1 for b in _BG}, short={"cityscapes": 560}),
    "sclip": _family_table({b: 0.1 for b in _BG}, logit={"voc21": 65.0, "context60": 50.0, "coco_object": 50.0},
                           short={"coco_stuff164k": 448, "cityscapes": 560}, extra={"voc21": {"area_thd": 0.1}}),
    "clearclip": _family_table({"voc21": 0.5, "context60": 0.15, "coco_object": 0.4},
                               slide={"cityscapes": (224, 224)}),
    "naclip": _family_table({b: 0.1 for b in _BG}, short={"cityscapes": 560},
                            slide={"voc21": (0, 112), "voc20": (0, 112)}),
    "rfclip": _family_table({b: 0.1 for b in _BG}, short={"cityscapes": 560}, slide={"voc21": (0, 112)}),
}

# rfclip-release: short side / slide / prob_thd / global_semantics_weight / mean_vector_weight / h_threshold
_RELEASE_ROWS = {
    "voc21": (336, None, 0.1, 0.10, 0.03, 0.10),
    "voc20": (336, (224, 112), 0.0, 0.40, 0.02, 0.10),
    "context60": (336, (224, 112), 0.1, 0.25, 0.04, 0.09),
    "context59": (336, (224, 112), 0.0, 0.25, 0.04, 0.09),
    "coco_object": (336, (224, 112), 0.1, 0.25, 0.01, 0.10),
    "coco_stuff164k": (336, (224, 112), 0.0, 0.20, 0.02, 0.02),
    "cityscapes": (560, (224, 112), 0.0, 0.10, 0.03, 0.14),
    "ade20k": (336, (224, 112), 0.0, 0.30, 0.05, 0.06),
}
METHOD_BENCHMARK_SETTINGS["rfclip-release"] = {
    b: {"short_side": s, "slide_crop": sl[0] if sl else 0, "slide_stride": sl[1] if sl else 112, "prob_thd": p,
        "global_semantics_weight": g, "mean_vector_weight": m, "h_threshold": h, "logit_scale": 40.0,
        "global_from_crop": b == "cityscapes"}
    for b, (s, sl, p, g, m, h) in _RELEASE_ROWS.items()
}


def method_settings(method: str, benchmark: str) -> dict:
    """Settings that ``method`` uses on ``benchmark`` (on top of the method's defaults)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; available: {list(BENCHMARK_ORDER)}")
    if method not in METHOD_BENCHMARK_SETTINGS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHOD_BENCHMARK_SETTINGS)}")
    return dict(METHOD_BENCHMARK_SETTINGS[method][benchmark])
