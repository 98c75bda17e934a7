"""End to end: train -> eval -> detect on a tiny dataset, resume, and the CLI."""
import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import lsr
from conftest import interrupt_training_in_prior_epoch_1
from lsr.cli import export_main, main
from lsr import ops
from lsr.checkpoint import load_weights

pytestmark = pytest.mark.slow


def test_train_writes_run_folder(tiny_run):
    for name in ("config.json", "vqvae.safetensors", "prior.safetensors", "calibration.json",
                 "train_log.jsonl", "split.json"):
        assert (tiny_run / name).is_file(), name
    cfg = json.loads((tiny_run / "config.json").read_text())
    calib = json.loads((tiny_run / "calibration.json").read_text())
    assert cfg["detect"]["tau"] == calib["tau"] and 0 < calib["tau"] < 1
    split = json.loads((tiny_run / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"])
    assert all("/train/good/" in p for p in split["train"] + split["val"])   # never test/
    log = [json.loads(line) for line in (tiny_run / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"vqvae", "prior"}


def _mask(sample, shape):
    """Ground truth read here (PIL, not lsr.data): True where the mask PNG is non-zero."""
    if sample.mask_path is None:
        return np.zeros(shape, dtype=bool)
    return np.asarray(Image.open(sample.mask_path).convert("L")) > 0


def test_eval_writes_metrics_maps_and_report(tiny_run, tiny_dataset, tmp_path):
    from lsr.metrics import image_metrics, pixel_metrics

    out = tmp_path / "res"
    res = lsr.evaluate(tiny_run, tiny_dataset, out, progress=False)
    m = json.loads((out / "metrics.json").read_text())
    assert m == json.loads(json.dumps(res))
    for method in ("lsr", "restored_vs_input", "restored_vs_direct", "direct"):
        for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
            assert 0.0 <= m["methods"][method][key] <= 1.0, (method, key)
        assert set(m["methods"][method]["per_defect"]) == {"hole", "stain", "foreign"}
    assert "image_auroc" in m["methods"]["nll"]
    cat = tiny_dataset.name
    samples = lsr.data.scan_mvtec(tiny_dataset).test
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == m["n_test"] == len(samples)
    assert [r["image"] for r in rows] == [str(s.path) for s in samples]
    maps = {"anomaly_maps": [], "baseline_maps": []}
    for s in samples:
        for kind in maps:
            f = out / kind / cat / "test" / s.defect / f"{s.path.stem}.tiff"
            arr = tifffile.imread(f)
            assert arr.dtype == np.float32 and arr.shape == Image.open(s.path).size[::-1]
            maps[kind].append(arr)
    masks = [_mask(s, a.shape) for s, a in zip(samples, maps["anomaly_maps"])]
    labels = np.array([s.label for s in samples])
    defects = np.array([s.defect for s in samples])
    assert m["detect"]["score"] == "max"
    # metrics.json again, from the written files only: TIFF maps, masks, results.jsonl scores
    for method, kind, key in (("lsr", "anomaly_maps", "score"), ("direct", "baseline_maps", "direct_score")):
        scores = np.array([r[key] for r in rows])
        np.testing.assert_allclose(scores, [a.max() for a in maps[kind]], rtol=1e-6)   # score = max of the map
        for name, sel in [("all", np.ones(len(samples), bool))] + [
                (d, (defects == d) | (defects == "good")) for d in ("hole", "stain", "foreign")]:
            want = {**image_metrics(scores[sel], labels[sel]),
                    **pixel_metrics([a for a, k in zip(maps[kind], sel) if k], [g for g, k in zip(masks, sel) if k])}
            got = m["methods"][method] if name == "all" else m["methods"][method]["per_defect"][name]
            for k2, v in want.items():
                assert got[k2] == pytest.approx(v, abs=1e-12), (method, name, k2)
    nll = np.array([r["nll_score"] for r in rows])
    assert m["methods"]["nll"]["image_auroc"] == pytest.approx(image_metrics(nll, labels)["image_auroc"], abs=1e-12)
    # report.png: one row per shown image (all 7 here) above the ROC curves, heat-maps drawn
    shown = sorted((out / "panels").glob("*.png"))
    assert len(shown) == len(samples)                                  # report_rows=10 >= 7 images
    report = Image.open(out / "report.png")
    assert report.format == "PNG"
    rgb = np.asarray(report.convert("RGB")).astype(int)
    assert rgb.shape[0] > rgb.shape[1] > 300                           # 7 rows of tiles: taller than wide
    coloured = (rgb.max(-1) - rgb.min(-1)) > 60                        # heat-maps and curves (the images are grey)
    assert 0.05 < coloured.mean() < 0.9
    assert (rgb.sum(-1) < 3 * 250).mean() > 0.2                        # not a blank page
    small = lsr.evaluate(tiny_run, tiny_dataset, tmp_path / "two_rows", progress=False, report_rows=2)
    assert small["methods"] == m["methods"]
    two = Image.open(tmp_path / "two_rows" / "report.png")
    assert two.size[0] == report.size[0] and two.size[1] < report.size[1] - 3 * 100   # 5 rows fewer
    assert len(list((tmp_path / "two_rows" / "panels").glob("*.png"))) == 2


def test_detect_cli_outputs(tiny_run, tiny_dataset, tmp_path):
    out = tmp_path / "det"
    imgs = sorted((tiny_dataset / "test" / "hole").glob("*.png")) + sorted((tiny_dataset / "test" / "good").glob("*.png"))[:1]
    rc = main(["detect", str(tiny_run), *map(str, imgs), "--out", str(out), "--tiff", "--no-progress"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(imgs)
    for r in rows:
        for key in ("image", "score", "nll_score", "n_resampled", "prior_passes", "time_ms"):
            assert key in r
        assert r["prior_passes"] >= 1
        assert Image.open(r["panel"]).format == "PNG"
        assert tifffile.imread(r["map_tiff"]).dtype == np.float32


def test_naive_and_fast_give_the_same_detection(tiny_run, tiny_dataset):
    det = lsr.Detector.load(tiny_run, "cpu").with_options(tau=0.2)    # a high tau: many codes change
    paths = lsr.data.scan_mvtec(tiny_dataset).test
    x, _ = det.load_batch([s.path for s in paths[:4]])
    fast = det.with_options(resampler="fast").detect(x)
    naive = det.with_options(resampler="naive").detect(x)
    assert fast.n_resampled.sum() >= 4
    assert torch.equal(fast.resampled_codes, naive.resampled_codes)
    assert torch.equal(fast.anomaly_map, naive.anomaly_map)
    assert (fast.prior_passes == 1 + fast.n_resampled.long()).all()
    assert (naive.prior_passes == fast.codes[0].numel()).all()


def test_same_seed_same_codes_any_batch(tiny_run, tiny_dataset):
    det = lsr.Detector.load(tiny_run, "cpu").with_options(tau=0.2, seed=3)
    paths = [s.path for s in lsr.data.scan_mvtec(tiny_dataset).test[:3]]
    x, _ = det.load_batch(paths)
    together = det.detect(x, image_ids=[0, 1, 2])
    alone = det.detect(x[2:3], image_ids=[2])
    assert torch.equal(together.resampled_codes[2], alone.resampled_codes[0])
    assert together.resampled.sum() >= 6                   # tau 0.2: many codes are redrawn
    again = det.detect(x, image_ids=[0, 1, 2])
    assert torch.equal(again.resampled_codes, together.resampled_codes)     # same seed: same draws
    other_seed = det.with_options(seed=4).detect(x, image_ids=[0, 1, 2])
    assert torch.equal(other_seed.codes, together.codes)   # the encoder's codes never depend on it
    # the seed selects the noise of the redraws: another seed draws other codes
    assert not torch.equal(other_seed.resampled_codes, together.resampled_codes)
    other_ids = det.detect(x, image_ids=[10, 11, 12])
    assert not torch.equal(other_ids.resampled_codes, together.resampled_codes)   # so does the image id


def test_detect_cli_seed_option_selects_the_noise(tiny_run, tiny_dataset, tmp_path):
    """`lsr detect --seed` reaches the detector: another seed, other scores (other redrawn
    codes, hence other restorations); the same seed's determinism is tested above."""
    images = sorted((tiny_dataset / "test").rglob("*.png"))[:3]
    rows = {}
    for seed in (3, 4):
        assert main(["detect", str(tiny_run), *map(str, images), "--out", str(tmp_path / str(seed)), "--tau", "0.2",
                     "--seed", str(seed), "--resampler", "fast", "--no-panels", "--no-progress"]) == 0
        rows[seed] = [json.loads(x) for x in (tmp_path / str(seed) / "results.jsonl").read_text().splitlines()]
    assert all(r["n_resampled"] > 0 for r in rows[3])
    assert [r["image"] for r in rows[3]] == [r["image"] for r in rows[4]]
    assert all(a["score"] != b["score"] for a, b in zip(rows[3], rows[4]))


def _restoration_maps(det, x, image_ids):
    """Oracle of a pixel-space detection with n restorations, chain by chain: each chain
    resampled alone from its own noise stream (lsr.detect.chain_seed), decoded, compared
    with the input, smoothed. Returns maps (B, n, S, S), mean distances (B, n), passes (B, n)."""
    from lsr import anomaly
    from lsr.detect import chain_seed

    d = det.config.detect
    K = det.config.prior.codebook_size
    codes = det.vqvae.quantizer(det.vqvae.encoder(x)).indices
    h, w = codes.shape[1:]
    maps, closeness, passes = [], [], []
    for b, i in enumerate(image_ids):
        row_m, row_c, row_p = [], [], []
        for r in range(d.restorations):
            noise = ops.gumbel_noise(1, h * w, K, [chain_seed(d.seed, i, r)])
            rs = ops.resample(det.prior, codes[b:b + 1], noise, float(d.tau), d.temperature, "fast")
            restored = det.vqvae.decode_indices(rs.codes).clamp(0, 1)
            dist = anomaly.distance(restored, x[b:b + 1], d.distance)
            row_m.append(anomaly.smooth(dist, d.smoothing, d.sigma)[0])
            row_c.append(dist.mean())
            row_p.append(int(rs.prior_passes[0]))
        maps.append(torch.stack(row_m))
        closeness.append(torch.stack(row_c))
        passes.append(row_p)
    return torch.stack(maps), torch.stack(closeness), torch.tensor(passes)


@pytest.mark.parametrize("weighting", ["mean", "closeness", "min"])
def test_restorations_are_averaged(tiny_run, tiny_dataset, weighting, monkeypatch):
    """The map of n restorations is the weighted mean of the n restorations' own maps
    (equal weights, or softmax(3 / mean distance to the input) for ``closeness``), or
    (``min``) their per-pixel minimum, each restoration being the chain of its own noise
    stream.

    The tiny run's decoder barely depends on the codes (its restorations' maps differ by
    ~1e-4), so the decoder is replaced, for the detector and the oracle alike, by one that
    paints each code cell grey level code / K: restorations then differ clearly, and so do
    the closeness weights."""
    det = lsr.Detector.load(tiny_run, "cpu").with_options(tau=0.2, restorations=3, weighting=weighting,
                                                          resampler="fast", temperature=2.0)
    assert det.space == "pixels" and det.config.detect.map_kind == "restored_vs_input"
    K, f = det.config.prior.codebook_size, det.config.vqvae.downsample

    def paint(codes):
        return (codes.float() / (K - 1)).repeat_interleave(f, 1).repeat_interleave(f, 2).unsqueeze(1)

    monkeypatch.setattr(det.vqvae, "decode_indices", paint)
    x, _ = det.load_batch([s.path for s in lsr.data.scan_mvtec(tiny_dataset).test[:2]])
    r = det.detect(x, image_ids=[0, 1])
    assert r.anomaly_map.shape == (2, 32, 32) and r.prior_passes.shape == (2,)
    assert (r.n_resampled >= 8).all()
    with torch.no_grad():
        per, closeness, passes = _restoration_maps(det, x, [0, 1])            # (2, 3, 32, 32)
    if weighting == "mean":
        wts = torch.full((2, 3), 1.0 / 3)
    else:
        wts = torch.softmax(3.0 / closeness.double(), dim=1).float()
        assert (wts - 1.0 / 3).abs().amax() > 0.02                        # far from the plain mean
    expected = per.amin(dim=1) if weighting == "min" else (per * wts.view(2, 3, 1, 1)).sum(dim=1)
    torch.testing.assert_close(r.anomaly_map, expected, rtol=1e-5, atol=1e-6)
    for k in range(3):                                                    # not any one restoration
        assert (r.anomaly_map - per[:, k]).abs().amax() > 1e-2, k
    if weighting != "mean":                                               # nor the unweighted mean
        assert (r.anomaly_map - per.mean(dim=1)).abs().amax() > 1e-3
    assert torch.equal(r.prior_passes, passes.sum(dim=1))                  # every chain's passes counted


def test_resume_after_interruption_matches_uninterrupted(tiny_dataset, tmp_path, monkeypatch):
    cfg = lsr.preset("tiny", in_channels=1).with_overrides({"train.prior_epochs": 3, "train.vqvae_epochs": 2})
    ref = lsr.train(tiny_dataset, tmp_path / "ref", cfg, progress=False, log=lambda *_: None)

    interrupt_training_in_prior_epoch_1(monkeypatch, tiny_dataset, tmp_path / "cut", cfg)
    assert not (tmp_path / "cut" / "prior.safetensors").exists()
    res = lsr.train(tiny_dataset, tmp_path / "cut", cfg, progress=False, log=lambda *_: None)
    a, b = load_weights(ref.run / "prior.safetensors"), load_weights(res.run / "prior.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res.tau == ref.tau
    epochs = [json.loads(line)["epoch"] for line in (res.run / "train_log.jsonl").read_text().splitlines()
              if json.loads(line)["stage"] == "prior"]
    assert epochs == [0, 1, 2]          # epoch 0 is not trained twice


def test_different_config_in_same_out_is_refused(tiny_run, tiny_dataset):
    cfg = lsr.preset("tiny", in_channels=1).with_overrides({"train.seed": 99})
    with pytest.raises(ValueError, match="different configuration"):
        lsr.train(tiny_dataset, tiny_run, cfg, progress=False, log=lambda *_: None)


def test_cli_errors_are_clear(tmp_path, capsys, tiny_run, tiny_dataset):
    assert main(["train", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "nope" in capsys.readouterr().err
    bad = tmp_path / "bad" / "train" / "good"
    bad.mkdir(parents=True)
    src = next((tiny_dataset / "train" / "good").glob("*.png")).read_bytes()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(src)
    (bad / "broken.png").write_bytes(src[: len(src) // 2])
    assert main(["train", str(tmp_path / "bad"), "--out", str(tmp_path / "r2"), "--preset", "tiny",
                 "--no-progress"]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main(["detect", str(tmp_path / "norun"), str(bad / "0.png"), "--out", str(tmp_path / "o")]) == 2
    assert "norun" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), str(tmp_path / "bad"), "--out", str(tmp_path / "o2")]) == 2
    assert "test" in capsys.readouterr().err
    assert export_main([]) == 2
    assert "give a run folder and --out" in capsys.readouterr().err


def test_detect_native_resampler_equals_fast(tiny_run, tiny_dataset, tmp_path, capsys):
    """`lsr detect --resampler native`: the same codes and maps as `fast`, with the prior
    passes and the share of the grid the later passes evaluated in results.jsonl."""
    if not ops.native_available():
        pytest.skip("the native extension is not built")
    images = sorted((tiny_dataset / "test").rglob("*.png"))[:6]
    rows = {}
    for m in ("fast", "native"):
        assert main(["detect", str(tiny_run), *map(str, images), "--out", str(tmp_path / m), "--resampler", m,
                     "--tau", "0.2", "--no-progress", "--no-panels"]) == 0
        rows[m] = [json.loads(line) for line in (tmp_path / m / "results.jsonl").read_text().splitlines()]
    out = capsys.readouterr().out
    assert "later passes evaluated" in out
    changed = 0
    for f, n in zip(rows["fast"], rows["native"]):
        assert n["resampler"] == "native" and f["resampler"] == "fast"
        assert n["n_resampled"] == f["n_resampled"]
        assert n["score"] == pytest.approx(f["score"], rel=1e-4, abs=1e-6)
        assert f["positions_evaluated"] == f["prior_passes"] * f["n_codes"]
        if f["prior_passes"] > 1:
            changed += 1
            assert f["recomputed_fraction"] == 1.0
            assert 0 < n["recomputed_fraction"] < 1.0
            assert n["positions_evaluated"] < f["positions_evaluated"]
        else:
            assert n["recomputed_fraction"] is None
    assert changed >= 3                                     # tau 0.2: most images change codes


def test_cli_train_set_overrides(tiny_dataset, tmp_path):
    out = tmp_path / "r"
    assert main(["train", str(tiny_dataset), "--out", str(out), "--preset", "tiny", "--set",
                 "train.prior_epochs=1", "--set", "detect.tau_quantile=0.1", "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["prior_epochs"] == 1 and cfg["detect"]["tau_quantile"] == 0.1


def test_train_and_detect_with_a_plain_folder(tiny_dataset, tmp_path):
    folder = tmp_path / "normal"
    folder.mkdir()
    for p in sorted((tiny_dataset / "train" / "good").glob("*.png"))[:8]:
        (folder / p.name).write_bytes(p.read_bytes())
    cfg = lsr.preset("tiny", in_channels=3).with_overrides({"train.prior_epochs": 1, "train.vqvae_epochs": 1})
    res = lsr.train(folder, tmp_path / "run", cfg, progress=False, log=lambda *_: None)
    rows = lsr.detect_images(res.run, [folder], tmp_path / "out", progress=False, panels=False)
    assert len(rows) == 8 and all(r["prior_passes"] >= 1 for r in rows)


def test_paper_preset_builds_and_runs_one_step():
    """The GPU preset (256 px, 32x32 codes, K = 512) is consistent: one training step of
    each model and a fast resampling pass run on the CPU."""
    import lsr.ops as ops
    from lsr.models import VQVAE, PixelSNAIL

    cfg = lsr.preset("paper", in_channels=3)
    assert (cfg.vqvae.image_size, cfg.grid_size, cfg.vqvae.codebook_size) == (256, 32, 512)
    torch.manual_seed(0)
    vq, prior = VQVAE(cfg.vqvae), PixelSNAIL(cfg.prior)
    out = vq(torch.rand(1, 3, 256, 256))
    assert out.indices.shape == (1, 32, 32) and out.reconstruction.shape == (1, 3, 256, 256)
    logits = prior(out.indices)
    assert logits.shape == (1, 512, 32, 32)
    torch.nn.functional.cross_entropy(logits, out.indices).backward()
    assert all(p.grad is not None for p in prior.parameters())
    prior.eval()
    with torch.no_grad():
        res = ops.resample(prior, out.indices, ops.gumbel_noise(1, 1024, 512, [0]), tau=0.0)
    assert int(res.prior_passes[0]) == 1 and torch.equal(res.codes, out.indices)
