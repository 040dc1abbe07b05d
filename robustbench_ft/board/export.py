"""Result records as pandas tables: the long format of primary scores, and ``robustbench-ft export``'s
flat table of every number."""
from __future__ import annotations

from collections.abc import Iterable

from robustbench_ft.results import ResultRecord


def records_to_frame(records: Iterable[ResultRecord]):
    """Long-format pandas DataFrame: one row per (record, dataset) with the primary score."""
    import pandas as pd

    rows = []
    for r in records:
        for ds in r.metrics:
            rows.append({
                "record_id": r.record_id, "suite": r.suite, "model": r.model, "method": r.method,
                "candidate": r.candidate, "kind": r.kind, "dataset": ds,
                "role": "reference" if ds == r.reference else ("shift" if ds in r.shifts else "other"),
                "score": r.score(ds), **{f"tag_{k}": v for k, v in r.tags.items()},
            })
    return pd.DataFrame(rows)


EXPORT_COLUMNS = ("model", "pretrained", "method", "candidate", "dataset", "metric", "value", "suite", "seed",
                  "record_id", "kind")


def records_to_table(records: Iterable[ResultRecord]):
    """Flat pandas DataFrame of every number in ``records`` (``robustbench-ft export``), one row each.

    Columns :data:`EXPORT_COLUMNS`: every ``metrics[dataset][metric]`` entry (scores as fractions,
    counts as whole numbers), a record's reported aggregates (``summary``: dataset = the aggregate's
    name, e.g. ``shift-avg``), and its effective robustness (metric ``effective_robustness``, dataset =
    the shift or ``shift-avg``); ``seed`` from the run config (empty for records without one).
    """
    import pandas as pd

    rows = []
    for r in records:
        seed = r.config.get("seed") if isinstance(r.config.get("seed"), int) else None
        base = {"model": r.model, "pretrained": r.pretrained, "method": r.method, "candidate": r.candidate,
                "suite": r.suite, "seed": seed, "record_id": r.record_id, "kind": r.kind}
        for ds, values in r.metrics.items():
            rows += [{**base, "dataset": ds, "metric": m, "value": v} for m, v in values.items()]
        rows += [{**base, "dataset": key, "metric": e["metric"], "value": e["value"]} for key, e in r.summary.items()]
        er = r.effective_robustness or {}
        per_shift = er.get("per_shift") if isinstance(er.get("per_shift"), dict) else {}
        for ds, v in [*per_shift.items(), ("shift-avg", er.get("shift-avg"))]:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append({**base, "dataset": ds, "metric": "effective_robustness", "value": v})
    frame = pd.DataFrame(rows, columns=list(EXPORT_COLUMNS))
    frame["seed"] = frame["seed"].astype("Int64")  # whole numbers, empty where a record has no seed
    return frame
