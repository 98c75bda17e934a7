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


def test_eval_writes_metrics_maps_and_report(tiny_run, tiny_dataset, tmp_path):
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
    for s in lsr.data.scan_mvtec(tiny_dataset).test:
        for kind in ("anomaly_maps", "baseline_maps"):
            f = out / kind / cat / "test" / s.defect / f"{s.path.stem}.tiff"
            arr = tifffile.imread(f)
            assert arr.dtype == np.float32 and arr.shape == Image.open(s.path).size[::-1]
    assert Image.open(out / "report.png").size[0] > 300
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == m["n_test"]


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
    other_seed = det.with_options(seed=4).detect(x, image_ids=[0, 1, 2])
    assert torch.equal(other_seed.codes, together.codes)


def test_restorations_are_averaged(tiny_run, tiny_dataset):
    det = lsr.Detector.load(tiny_run, "cpu").with_options(tau=0.2, restorations=3)
    x, _ = det.load_batch([s.path for s in lsr.data.scan_mvtec(tiny_dataset).test[:2]])
    r = det.detect(x)
    assert r.anomaly_map.shape == (2, 32, 32) and r.prior_passes.shape == (2,)
    assert (r.prior_passes >= 3).all()


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
