"""``lsr demo``'s summary (the README's headline table): the mean over categories of each
method's metrics in every category's metrics.json, written to summary.json and printed.
One test runs the demo itself on a tiny dataset and preset; one holds the summary
function to a fixed input."""
import json
import math

import numpy as np
import pytest

from lsr.demo import METHOD_ORDER, TABLE_COLUMNS, run_demo, summarise

pytestmark = pytest.mark.slow


def printed_table(lines, after):
    """The table printed after the line starting with ``after``: {method: [cells]}."""
    start = next(i for i, line in enumerate(lines) if line.startswith(after))
    head = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("method"))
    table, rows = lines[head], lines[head + 2:]
    out = {}
    for line in rows:
        cells = line.split()
        if not cells or cells[0] not in METHOD_ORDER:
            break
        out[cells[0]] = cells[1:]
    assert table.split()[1:] == TABLE_COLUMNS
    return out


def cell(v):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def test_demo_summary_is_the_mean_of_the_categories_metrics(tmp_path):
    lines = []
    summary = run_demo(tmp_path / "demo", categories=("grass", "gravel"), preset_name="tiny",
                       overrides={"train.vqvae_epochs": 1, "train.prior_epochs": 1}, device="cpu", progress=False,
                       dataset_kwargs=dict(image_size=32, n_train=14, n_test_good=3, n_test_per_defect=1,
                                           defects=("hole", "stain")),
                       log=lambda *a: lines.extend(" ".join(map(str, a)).splitlines()))
    assert json.loads((tmp_path / "demo" / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["categories"] == ["grass", "gravel"] and summary["preset"] == "tiny"
    per = {c: json.loads((tmp_path / "demo" / "results" / c / "metrics.json").read_text())["methods"]
           for c in ("grass", "gravel")}
    methods = [m for m in METHOD_ORDER if all(m in per[c] for c in per)]
    assert list(summary["mean"]) == methods and {"lsr", "direct", "nll"} <= set(methods)
    for m in methods:
        for col in TABLE_COLUMNS:
            vals = [per[c][m][col] for c in per if col in per[c][m]]
            if not vals:                                         # nll has no pixel metrics
                assert col not in summary["mean"][m], (m, col)
                continue
            assert summary["mean"][m][col] == pytest.approx(np.mean(vals), abs=1e-12), (m, col)
            for c in per:
                assert summary["per_category"][c][m][col] == per[c][m][col]
    # the printed headline table is that mean, to 3 decimals; each category's table before it
    mean_table = printed_table(lines, "== mean over grass, gravel")
    assert list(mean_table) == methods
    for m in methods:
        assert mean_table[m] == [cell(summary["mean"][m].get(col)) for col in TABLE_COLUMNS], m
    grass = printed_table(lines, "== grass: evaluating")
    assert grass["lsr"] == [cell(per["grass"]["lsr"].get(col)) for col in TABLE_COLUMNS]


def test_summarise_on_fixed_metrics():
    """Mean over categories per method and column; a NaN is left out of the mean; a column
    no category has is left out; a method missing in one category is left out."""
    nan = float("nan")
    results = {
        "a": {"methods": {"lsr": {"image_auroc": 0.5, "pixel_auroc": 0.75, "aupro": nan},
                          "nll": {"image_auroc": 0.25},
                          "gated": {"image_auroc": 1.0}}},
        "b": {"methods": {"lsr": {"image_auroc": 1.0, "pixel_auroc": 0.25, "aupro": 0.5},
                          "nll": {"image_auroc": 0.75}}},
    }
    assert summarise(results) == {
        "lsr": {"image_auroc": 0.75, "pixel_auroc": 0.5, "aupro": 0.5},
        "nll": {"image_auroc": 0.5},
    }
    results["b"]["methods"]["lsr"]["aupro"] = nan                       # NaN everywhere: no value
    assert "aupro" not in summarise(results)["lsr"]
