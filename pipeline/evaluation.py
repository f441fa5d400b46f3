"""The end of a run: reduce + report for an evaluation, report alone for pseudo-labelling.

    finish_evaluation(output_uri, source, storage_options=None, extra=None) -> dict (metrics.json)
    finish_pseudo_labels(output_uri, class_names, storage_options=None) -> str (report.md URI)

``source`` is the :class:`pipeline.datasets.LabelledSource` the run was fed from; both write
``report.md`` + ``figures/`` next to the predictions (see pipeline.report).
"""
from __future__ import annotations

from typing import Optional, Sequence

from .metrics import reduce_confusion
from .report import write_report


def finish_evaluation(output_uri: str, source, storage_options: Optional[dict] = None,
                      extra: Optional[dict] = None, num_samples: int = 6) -> dict:
    """Sum the shards' confusion matrices into metrics.json / metrics.md and write report.md."""
    extra = {"benchmark": source.name, **(extra or {})}
    result = reduce_confusion(output_uri, storage_options, class_names=source.class_names, extra=extra)
    title = "Evaluation report: " + " / ".join(str(extra[k]) for k in ("benchmark", "method") if k in extra)
    write_report(output_uri, source.class_names, source=source, storage_options=storage_options,
                 num_samples=num_samples, title=title)
    return result


def finish_pseudo_labels(output_uri: str, class_names: Sequence[str],
                         storage_options: Optional[dict] = None, num_samples: int = 6) -> str:
    """Write report.md (class distribution, confidence histogram, overlays) for an unlabelled run."""
    return write_report(output_uri, list(class_names), storage_options=storage_options,
                        num_samples=num_samples)
