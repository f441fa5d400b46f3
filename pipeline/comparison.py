"""The cross-method comparison table (rows methods, columns benchmarks + avg), Markdown and JSON.

    build_comparison(results, benchmarks, methods) -> dict
        results: {(benchmark, method): metrics.json dict (needs "mIoU", "images")}
    comparison_markdown(table) -> str

Each cell holds the measured mIoU, the published one (pipeline.published) and the image count.
The measured "avg" is only over the benchmarks that were run; the published avg beside it is
recomputed over the same benchmarks so the two are comparable (the paper's 8-benchmark avg is
kept in JSON as ``published_avg_all``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .published import COLUMN_TITLES, TABLE_ORDER, published


def build_comparison(results: dict, benchmarks: Sequence[str], methods: Sequence[str],
                     val_images: Optional[dict] = None, pamr: bool = False) -> dict:
    """JSON-able table; ``val_images`` ({benchmark: full val size}) marks partial evaluations;
    ``pamr`` compares RF-CLIP with its published "+ PAMR" row."""
    cols = [b for b in TABLE_ORDER if b in benchmarks] + [b for b in benchmarks if b not in TABLE_ORDER]
    rows = []
    for m in methods:
        cells = {}
        for b in cols:
            r = results.get((b, m))
            cells[b] = {
                "mIoU": None if r is None else r["mIoU"],
                "images": None if r is None else r["images"],
                "val_images": (val_images or {}).get(b),
                "published": published(m, b, pamr) if b in TABLE_ORDER else None,
            }
        measured = [c["mIoU"] for c in cells.values() if c["mIoU"] is not None]
        complete = len(measured) == len(cols)
        pubs = [cells[b]["published"] for b in cols]
        rows.append({
            "method": m,
            "cells": cells,
            "avg": {
                "mIoU": float(np.mean(measured)) if complete and measured else None,
                "benchmarks": len(measured),
                "published": float(np.mean(pubs)) if all(p is not None for p in pubs) and pubs else None,
                "published_avg_all": published(m, "avg", pamr),
            },
        })
    return {"benchmarks": cols, "methods": list(methods), "rows": rows}


def _cell(c: dict) -> str:
    meas = ("failed" if c.get("error") else "–") if c["mIoU"] is None else f"**{c['mIoU']:.1f}**"
    pub = "" if c["published"] is None else f" ({c['published']:.1f})"
    if c["images"] is None:
        n = ""
    elif c.get("val_images"):
        n = f" n={c['images']}" + ("" if c["images"] == c["val_images"] else f"/{c['val_images']}")
    else:
        n = f" n={c['images']}"
    failed = c.get("failed_images") or 0
    return meas + pub + n + (f" ({failed} failed)" if failed else "")


def comparison_markdown(table: dict, title: str = "mIoU comparison") -> str:
    """Markdown laid out like the papers' Table 2."""
    cols = table["benchmarks"]
    head = [COLUMN_TITLES.get(b, b) for b in cols] + ["avg"]
    lines = [f"# {title}", "",
             "Cells: **measured mIoU** (published, ViT-B/16 OpenAI weights, docs/METHODS.md §2) "
             "n=images evaluated[/full val split]. – : not run or failed. A partial split is not "
             "comparable to the published number.", "",
             "| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for row in table["rows"]:
        a = row["avg"]
        avg = "–" if a["mIoU"] is None else f"**{a['mIoU']:.1f}**"
        if a["published"] is not None:
            avg += f" ({a['published']:.1f})"
        cells = [_cell(row["cells"][b]) for b in cols] + [avg]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    if len(cols) < len(TABLE_ORDER):
        lines += ["", f"avg is over the {len(cols)} benchmarks run; its published value is "
                  "recomputed over the same benchmarks."]
    lines.append("")
    return "\n".join(lines)
