"""Segmentation scores straight from label maps, for checking the confusion-matrix reducer."""
from __future__ import annotations

import numpy as np


def direct_scores(maps, num_classes: int, ignore_index: int = 255):
    """Per-class IoU and Acc (percent, NaN where undefined), mIoU, mAcc and aAcc from ``(pred, gt)`` pairs
    of ``(H, W)`` integer maps: TP / FP / FN counted with boolean masks, MMSegmentation-style means."""
    tp, fp, fn = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    total = 0
    for pred, gt in maps:
        keep = gt != ignore_index
        p, g = pred[keep], gt[keep]
        total += int(keep.sum())
        for c in range(num_classes):
            tp[c] += np.sum((p == c) & (g == c))
            fp[c] += np.sum((p == c) & (g != c))
            fn[c] += np.sum((p != c) & (g == c))
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        acc = tp / (tp + fn)
    return iou * 100, acc * 100, np.nanmean(iou) * 100, np.nanmean(acc) * 100, tp.sum() / total * 100
