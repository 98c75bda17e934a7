"""Plain-text tables of metrics, without a plotting library (``lsr eval`` and ``lsr demo``
print them; :mod:`lsr.report` draws the pictures)."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np


def _fmt_cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if math.isnan(f) else f"{f:.3f}"


def format_table(
    metrics: Mapping[str, Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    index_name: str = "method",
) -> str:
    """Format metrics as a plain-text, aligned table.

    Example:
        >>> print(format_table({"lsr": {"image_auroc": 0.91234, "pixel_auroc": float("nan")}},
        ...                    ["image_auroc", "pixel_auroc"]))
        method  image_auroc  pixel_auroc
        ------  -----------  -----------
        lsr           0.912          n/a

    Args:
        metrics: dict method name -> dict metric name -> value. Floats are shown
            with 3 decimals; NaN, None and missing values as ``"n/a"``; ints and
            strings as they are.
        columns: metric names to show, in order; default: every metric name in
            order of first appearance.
        index_name: header of the first (method) column.

    Returns:
        The table as a string (no trailing newline): a header line, a rule line,
        then one line per method. Method names are left-aligned, values
        right-aligned.
    """
    if columns is None:
        columns = []
        for m in metrics.values():
            for k in m:
                if k not in columns:
                    columns.append(k)
    columns = [str(c) for c in columns]
    body = [[str(name)] + [_fmt_cell(vals.get(c)) for c in columns] for name, vals in metrics.items()]
    header = [index_name, *columns]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(out).rstrip()

    lines = [line(header), line(["-" * w for w in widths])] + [line(r) for r in body]
    return "\n".join(lines)



__all__ = ["format_table"]
