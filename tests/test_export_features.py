"""Feature mode exports: a feature-space run (the backbone inside the encoder graph) goes
to ONNX and TorchScript, passes its parity check, and the bundle on onnxruntime and on
TorchScript gives the PyTorch detector's codes, resampled codes, prior passes, maps and
scores, the fused score included. The postprocess graph is the export of the one
definition (:func:`lsr.anomaly.postprocess`): a change made there is what every bundle
computes (shown by changing it and exporting).
"""
import json

import numpy as np
import onnx
import pytest
import torch

from lsr import anomaly, ops
from lsr.data import load_image, scan_mvtec
from lsr.deploy import Inferencer, read_bundle
from lsr.deploy.export import export_bundle
from lsr.deploy.parity import synthetic_images
from lsr.detect import Detector, load_run


@pytest.fixture(scope="module")
def feature_bundles(tiny_feature_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("feature-bundles")
    out = {}
    for fmt in ("onnx", "torchscript"):
        res = export_bundle(tiny_feature_run, root / fmt, fmt)
        assert res.parity.passed, res.parity.summary()
        out[fmt] = root / fmt
    return out


def _images(data, det):
    paths = [s.path for s in scan_mvtec(data).test]
    x = np.stack([load_image(p, det.channels, det.image_size) for p in paths])
    return np.concatenate([x, synthetic_images(2, det.channels, det.image_size)])


def test_feature_bundle_metadata(feature_bundles, tiny_feature_run):
    cfg = json.loads((tiny_feature_run / "config.json").read_text())
    for fmt, path in feature_bundles.items():
        b = read_bundle(path)
        m = b.meta["model"]
        assert m["space"] == "features" and m["backbone"] == "efficientnet_lite0"
        assert (m["seen_channels"], m["seen_size"]) == (152, cfg["vqvae"]["image_size"] // 8)
        assert b.meta["detect"]["score"] == cfg["detect"]["score"] == "pooled_max"
        assert b.meta["detect"]["posterior"] == cfg["detect"]["posterior"] == 2.0      # the preset's draw
        assert b.meta["bundle_version"] == 4 and "code_distances" in b.meta["graphs"]
        for k in ("score_mean", "score_std", "nll_mean", "nll_std"):
            assert b.meta["detect"][k] == cfg["detect"][k] is not None, k
        assert b.meta["parity"]["passed"] and b.meta["parity"]["n_resampled"] + b.meta["parity"]["n_resampled_loop"] > 0
    enc = onnx.load(str(feature_bundles["onnx"] / "encoder.onnx"))
    weights = sum(int(np.prod(t.dims)) for t in enc.graph.initializer)
    _, vqvae, _ = load_run(tiny_feature_run)
    backbone = sum(p.numel() for p in vqvae.backbone.parameters())
    assert backbone > 100_000 and weights > 0.95 * backbone, "the backbone (batch norms folded)'s weights are inside the encoder graph"
    assert [o.name for o in enc.graph.output] == ["codes", "seen"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_feature_bundle_equals_pytorch(feature_bundles, tiny_feature_run, tiny_dataset, fmt):
    det = Detector.load(tiny_feature_run, "cpu").with_options(resampler="fast")
    x = _images(tiny_dataset, det)
    for tau in (None, 0.3):                       # the run's tau, and one that resamples many codes
        d = det if tau is None else det.with_options(tau=tau)
        opts = {} if tau is None else {"tau": tau}
        inf = Inferencer(feature_bundles[fmt], providers=["CPUExecutionProvider"], resampler="fast", **opts)
        got = inf.predict_batch(x)
        for backend in ("reference", "auto"):
            with ops.backend(backend), torch.no_grad():
                want = d.detect(torch.from_numpy(x))
            assert np.array_equal(got.codes, want.codes.numpy())
            assert np.array_equal(got.resampled_codes, want.resampled_codes.numpy())
            assert np.array_equal(got.prior_passes, want.prior_passes.numpy())
            for f in ("anomaly_map", "map_restored_vs_input", "map_restored_vs_direct", "map_direct", "map_gated",
                      "direct_score", "direct", "restored", "likelihood"):
                np.testing.assert_allclose(getattr(got, f), getattr(want, f).numpy(), atol=2e-4, err_msg=f)
            np.testing.assert_allclose(got.nll_score, want.nll_score.numpy(), rtol=1e-4)
            # the configured score (the preset's pooled max of the map) needs no statistics
            assert np.isfinite(got.score).all()
            np.testing.assert_allclose(got.score, want.score.numpy(), atol=2e-4)
            if tau is None:               # the exported held-out statistics: the fused score
                np.testing.assert_allclose(got.fused_score, want.fused_score.numpy(), atol=2e-3)
            else:                         # another tau: no statistics on either side (as Detector.with_options)
                assert np.isnan(got.fused_score).all() and torch.isnan(want.fused_score).all()
        if tau == 0.3:
            assert int(want.resampled.sum()) > 0
    # the default loop (incremental) makes the same decisions
    default = Inferencer(feature_bundles[fmt], providers=["CPUExecutionProvider"], tau=0.3)
    assert default.loop == "native"
    fast = Inferencer(feature_bundles[fmt], providers=["CPUExecutionProvider"], tau=0.3, resampler="fast")
    assert np.array_equal(default.predict_batch(x).resampled_codes, fast.predict_batch(x).resampled_codes)


def test_feature_bundle_detect_cli(feature_bundles, tiny_feature_run, tiny_dataset, tmp_path):
    """`lsr detect BUNDLE` rows carry the same fields and verdicts as `lsr detect RUN`."""
    from lsr.cli import main

    images = sorted(str(p) for p in (tiny_dataset / "test").rglob("*.png"))
    assert main(["detect", str(feature_bundles["onnx"]), *images, "--out", str(tmp_path / "b"), "--no-panels",
                 "--no-progress"]) == 0
    assert main(["detect", str(tiny_feature_run), *images, "--out", str(tmp_path / "r"), "--no-panels",
                 "--no-progress", "--resampler", "native"]) == 0
    rb = [json.loads(line) for line in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    rr = [json.loads(line) for line in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert len(rb) == len(rr) == len(images)
    for a, b in zip(rb, rr):
        assert a["image"] == b["image"] and a["prior_passes"] == b["prior_passes"]
        for key in ("score", "fused_score", "nll_score", "direct_score"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=2e-3), key
        assert a["threshold"] == b["threshold"] is not None
        assert a["anomalous"] == b["anomalous"] or abs(a["normalised_score"] - 1) < 1e-3


@pytest.mark.parametrize("options", [
    {"map_kind": "gated", "score": "pooled_max", "pool": 5},
    {"map_kind": "restored_vs_direct", "distance": "cosine", "score": "topk_mean", "restorations": 2,
     "weighting": "closeness"},
    {"distance": "cosine", "score_distance": "l2", "score": "fused"},
    {"distance": "cosine", "restorations": 3, "weighting": "min"},
])
def test_feature_bundle_other_settings_pass_parity(tiny_feature_run, tmp_path, options):
    """Every map, distance, score and weighting of the Detector exports (bilateral aside)."""
    res = export_bundle(tiny_feature_run, tmp_path / "b", "onnx", options=options)
    assert res.parity.passed, res.parity.summary()
    d = read_bundle(tmp_path / "b").detect
    assert all(d[k] == v for k, v in options.items())


@pytest.mark.parametrize("fixture,name", [("tiny_feature_run", "feature_distance"), ("tiny_run", "distance")])
def test_a_change_to_the_map_reaches_every_backend(fixture, name, tmp_path, monkeypatch, request):
    """The one definition, in both modes: change the distance in lsr.anomaly (feature or
    pixel; here: log(1 + d), well conditioned everywhere, unlike a square root near a cosine
    distance of 0) and the exported graphs compute the changed map, as the Detector does,
    with no other edit."""
    tiny_feature_run = request.getfixturevalue(fixture)
    det = Detector.load(tiny_feature_run, "cpu").with_options(resampler="fast")
    x = synthetic_images(2, det.channels, det.image_size)
    with torch.no_grad():
        before = det.detect(torch.from_numpy(x)).map_direct.numpy()
    original = getattr(anomaly, name)
    monkeypatch.setattr(anomaly, name, lambda a, b, kind="l2", *rest: torch.log1p(original(a, b, kind)))
    with torch.no_grad():
        changed = det.detect(torch.from_numpy(x)).map_direct.numpy()
    assert not np.allclose(changed, before, rtol=1e-2)
    for fmt in ("onnx", "torchscript"):
        res = export_bundle(tiny_feature_run, tmp_path / fmt, fmt)
        assert res.parity.passed, res.parity.summary()
        got = Inferencer(tmp_path / fmt, providers=["CPUExecutionProvider"], resampler="fast").predict_batch(x)
        np.testing.assert_allclose(got.map_direct, changed, rtol=1e-4, atol=1e-3)


def test_bundle_and_pytorch_results_have_the_same_fields():
    """The Inferencer and the Detector are one pipeline over two backends: one result type
    (numpy arrays on one side, tensors on the other)."""
    from lsr import pipeline
    from lsr.deploy.inferencer import BatchPrediction, Prediction
    from lsr.detect import DetectionResult

    assert BatchPrediction is DetectionResult is pipeline.DetectionResult
    assert Prediction._fields == DetectionResult._fields + ("input_size",)


def test_a_change_to_the_pipeline_reaches_both_backends(tiny_feature_run, tmp_path, monkeypatch):
    """The step sequence is lsr.pipeline.detect, for the torch modules and for a bundle's
    graphs: a change there (here: the direct baseline map doubled) reaches both, with the
    same codes."""
    from lsr import pipeline

    det = Detector.load(tiny_feature_run, "cpu").with_options(resampler="fast")
    export_bundle(tiny_feature_run, tmp_path / "b", "onnx", check=False, log=lambda *_: None)
    inf = Inferencer(tmp_path / "b", providers=["CPUExecutionProvider"], resampler="fast")
    x = synthetic_images(2, det.channels, det.image_size)
    with torch.no_grad():
        before = det.detect(torch.from_numpy(x)).map_direct.numpy()
    original, backends = pipeline.detect, []

    def changed(st, *args, **kwargs):
        backends.append(type(st).__name__)
        res = original(st, *args, **kwargs)
        return res._replace(map_direct=res.map_direct * 2)
    monkeypatch.setattr(pipeline, "detect", changed)
    with torch.no_grad():
        ours = det.detect(torch.from_numpy(x))
    theirs = inf.predict_batch(x)
    assert backends == ["_TorchStages", "_BundleStages"]
    np.testing.assert_allclose(ours.map_direct.numpy(), 2 * before, rtol=1e-6)
    np.testing.assert_allclose(theirs.map_direct, 2 * before, rtol=1e-4, atol=1e-3)
    assert np.array_equal(theirs.codes, ours.codes.numpy())
    assert np.array_equal(theirs.resampled_codes, ours.resampled_codes.numpy())


def test_a_feature_run_with_a_backbone_margin_exports_and_passes_parity(tiny_dataset, tmp_path):
    """The reflected border (``vqvae.backbone_margin``) is part of the encoder graph."""
    import lsr

    cfg = lsr.preset("tiny-features", in_channels=1).with_overrides({"vqvae.backbone_margin": 16})
    run = tmp_path / "run"
    lsr.train(tiny_dataset, run, cfg, device="cpu", progress=False, log=lambda *_: None)
    for fmt in ("onnx", "torchscript"):
        res = export_bundle(run, tmp_path / fmt, fmt)
        assert res.parity.passed, res.parity.summary()
