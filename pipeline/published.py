"""Published ViT-B/16 mIoU (OpenAI weights, no PAMR unless named) of the training-free methods.

Data from METHODS.md §2 (the RF-CLIP paper's Table 2). ``PUBLISHED[row][benchmark]`` in percent;
``METHOD_ROW`` maps this project's method names to the table's rows.
"""
from __future__ import annotations

from rfclip.benchmarks import BENCHMARK_ORDER as TABLE_ORDER     # the paper's column order
COLUMN_TITLES = {"voc21": "VOC21", "context60": "Ctx60", "coco_object": "Obj", "voc20": "VOC20",
                 "context59": "Ctx59", "coco_stuff164k": "Stuff", "cityscapes": "City", "ade20k": "ADE"}

_ROWS = {
    "CLIP": (18.6, 7.8, 6.5, 49.1, 11.2, 7.2, 6.7, 3.2, 13.8),
    "MaskCLIP": (38.3, 23.6, 20.6, 74.9, 26.4, 16.4, 12.6, 9.8, 27.9),
    "SCLIP": (59.1, 30.4, 30.5, 80.4, 34.1, 22.4, 32.2, 16.1, 38.2),
    "ClearCLIP": (51.8, 32.6, 33.0, 80.9, 35.9, 23.9, 30.0, 16.7, 38.1),
    "NACLIP": (58.9, 32.2, 33.2, 79.7, 35.2, 23.3, 35.5, 17.4, 39.4),
    "RF-CLIP": (64.8, 36.4, 37.9, 87.0, 39.8, 26.3, 41.3, 20.4, 44.2),
    "RF-CLIP + PAMR": (67.2, 37.9, 39.1, 87.0, 41.4, 27.5, 43.0, 21.0, 45.5),
}
PUBLISHED: dict[str, dict[str, float]] = {
    row: {**dict(zip(TABLE_ORDER, vals[:8])), "avg": vals[8]} for row, vals in _ROWS.items()
}
METHOD_ROW = {"clip": "CLIP", "maskclip": "MaskCLIP", "sclip": "SCLIP", "clearclip": "ClearCLIP",
              "naclip": "NACLIP", "rfclip": "RF-CLIP", "rfclip-release": "RF-CLIP"}


def published(method: str, benchmark: str, pamr: bool = False):
    """The published mIoU for ``method`` on ``benchmark`` (``"avg"`` allowed), or None if none."""
    row = METHOD_ROW.get(method)
    if row == "RF-CLIP" and pamr:
        row = "RF-CLIP + PAMR"
    return PUBLISHED[row][benchmark] if row else None
