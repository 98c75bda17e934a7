"""Attention maps of the prior (lsr.explain, Detector.explain, lsr detect --explain)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lsr
from lsr import ops
from lsr.cli import main
from lsr.config import PriorConfig
from lsr.explain import attention_weights, explain, select_queries
from lsr.models import PixelSNAIL

pytestmark = pytest.mark.slow


def _images(det, data, n=2):
    return det.load_batch([s.path for s in lsr.data.scan_mvtec(data).test[:n]])[0]


def _float64_weights(det, codes, monkeypatch):
    """Independently: every attention call's q, k, v as the layer passed them to the op, and
    the strictly causal softmax of the reference attention over them in float64 (B, nh, T, T)."""
    seen = []
    real = ops.causal_attention

    def record(q, k, v):
        seen.append((q.double(), k.double(), v.double()))
        return real(q, k, v)

    monkeypatch.setattr(ops, "causal_attention", record)
    with torch.no_grad():
        det.prior(codes)
    monkeypatch.setattr(ops, "causal_attention", real)
    out = []
    for q, k, v in seen:
        T = q.shape[-2]
        s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        allowed = torch.arange(T).view(1, T) < torch.arange(T).view(T, 1)          # [t, s]: s < t
        w = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        # the weights are the reference op's: weights @ v is its output
        assert torch.allclose(w @ v, ops.reference.causal_attention(q, k, v), atol=1e-12)
        out.append(w)
    return out


@pytest.mark.parametrize("fixture", ["tiny_run", "tiny_feature_run"])
def test_weights_are_the_reference_softmax(fixture, tiny_dataset, monkeypatch, request):
    det = lsr.Detector.load(request.getfixturevalue(fixture), "cpu").with_options(resampler="fast")
    x = _images(det, tiny_dataset)
    res = det.detect(x)
    h, w = res.codes.shape[1:]
    T = h * w
    exps = explain(det, x, top=T, result=res)                       # every position, position 0 included
    want = _float64_weights(det, res.codes, monkeypatch)
    L = len(want)
    assert L == sum(b.attn is not None for b in det.prior.blocks) >= 1
    for b, e in enumerate(exps):
        t = (e.positions[:, 0] * w + e.positions[:, 1]).long()
        assert sorted(t.tolist()) == list(range(T))
        assert e.attention.shape == (T, L, h, w) and e.head_attention.shape[:2] == (T, L)
        assert e.attention.dtype == torch.float32
        for li in range(L):
            ref = want[li][b][:, t].transpose(0, 1)                # (n, nh, T)
            got = e.head_attention[:, li].flatten(2).double()
            assert torch.allclose(got, ref, atol=1e-6)
            assert torch.allclose(e.attention[:, li].flatten(1).double(), ref.mean(1), atol=1e-6)
            a = e.attention[:, li].flatten(1)
            later = torch.arange(T).view(1, T) >= t.view(-1, 1)
            assert (a[later] == 0).all()                           # exactly zero at s >= t
            sums = a.double().sum(1)
            assert torch.allclose(sums[t > 0], torch.ones(int((t > 0).sum()), dtype=torch.float64), atol=1e-5)
            assert (a[t == 0] == 0).all()                          # position 0: no keys, all zero
        # -log p of the explained pass is the detection's likelihood
        assert torch.allclose(e.nll, -torch.log(res.likelihood[b].flatten()[t]), atol=1e-4)


def test_which_codes_are_explained(tiny_feature_run, tiny_dataset):
    det = lsr.Detector.load(tiny_feature_run, "cpu").with_options(tau=0.1, resampler="fast")
    x = _images(det, tiny_dataset)
    res = det.detect(x)
    w = res.codes.shape[2]
    for b, (e, e16) in enumerate(zip(explain(det, x, result=res, limit=None), explain(det, x, result=res))):
        t = (e.positions[:, 0] * w + e.positions[:, 1])           # every resampled code, least likely first
        assert set(t.tolist()) == set(res.resampled[b].flatten().nonzero().flatten().tolist())
        assert e.resampled.all() and (e.nll[:-1] >= e.nll[1:]).all() and len(t) > 16
        assert torch.equal(e16.positions, e.positions[:16])       # the default: at most 16 of them
    for b, e in enumerate(explain(det, x, top=3, result=res)):
        nll = -torch.log(res.likelihood[b].flatten())
        assert e.positions.shape == (3, 2) and torch.allclose(e.nll, nll.sort(descending=True).values[:3], atol=1e-4)
    assert explain(det, x[:1], top=3)[0].positions.tolist() == explain(det, x, top=3)[0].positions.tolist()
    with pytest.raises(ValueError, match="--explain"):
        explain(det, x, top=0)


def test_select_queries_and_position_zero():
    lik = torch.tensor([[0.01, 0.5], [0.01, 0.2]])
    res = torch.tensor([[True, False], [False, True]])
    assert select_queries(lik, res).tolist() == [0, 3]            # resampled, least likely first
    assert select_queries(lik, res, top=3).tolist() == [0, 2, 3]  # ties in raster order
    prior = PixelSNAIL(PriorConfig(codebook_size=4, grid_size=2, channels=8, n_heads=2, n_blocks=1)).eval()
    (wts,), _ = attention_weights(prior, torch.zeros(1, 2, 2, dtype=torch.long), [torch.tensor([0, 1])])
    assert (wts[0] == 0).all() and torch.allclose(wts[1, :, :, 0], torch.ones(1, 2, dtype=torch.float64))
    no_attn = PixelSNAIL(PriorConfig(codebook_size=4, grid_size=2, channels=8, n_heads=2, attention=False))
    with pytest.raises(ValueError, match="no attention layers"):
        attention_weights(no_attn, torch.zeros(1, 2, 2, dtype=torch.long), [torch.tensor([1])])


@pytest.mark.parametrize("fixture", ["tiny_run", "tiny_feature_run"])
def test_cli_writes_panels_and_arrays(fixture, tiny_dataset, tmp_path, request):
    run = request.getfixturevalue(fixture)
    imgs = sorted((tiny_dataset / "test" / "hole").glob("*.png"))[:1]
    out = tmp_path / "det"
    assert main(["detect", str(run), *map(str, imgs), "--out", str(out), "--explain", "2", "--no-progress",
                 "--resampler", "fast"]) == 0
    det = lsr.Detector.load(run, "cpu")
    S, L = det.image_size, 1
    h = det.config.vqvae.grid_size
    (row,) = [json.loads(line) for line in (out / "explain" / "explain.jsonl").read_text().splitlines()]
    assert row["image"] == str(imgs[0]) and len(row["codes"]) == 2
    z = np.load(row["npz"])
    assert set(z.files) == {"positions", "nll", "resampled", "attention", "head_attention", "attention_image",
                            "codes", "layers"}
    assert z["attention"].shape == (2, L, h, h) and z["attention"].dtype == np.float32
    assert z["head_attention"].shape == (2, L, det.config.prior.n_heads, h, h)
    assert z["attention_image"].shape == (2, L, S, S) and z["attention_image"].dtype == np.float32
    f = S // h
    assert np.array_equal(z["attention_image"][:, :, ::f, ::f], z["attention"])
    assert z["layers"].tolist() == ["blocks.0.attn"] and z["codes"].shape == (h, h)
    for (i, j), code in zip(z["positions"], row["codes"]):
        png = out / "explain" / f"{imgs[0].stem}_{i}_{j}.png"
        assert code["panel"] == str(png) and Image.open(png).format == "PNG"
    # without N: the resampled codes of the same detection (same noise ids as results.jsonl)
    out2 = tmp_path / "det2"
    assert main(["detect", str(run), *map(str, imgs), "--out", str(out2), "--explain", "--no-progress",
                 "--tau", "0.1", "--no-panels", "--resampler", "fast"]) == 0
    (res,) = [json.loads(line) for line in (out2 / "results.jsonl").read_text().splitlines()]
    (row2,) = [json.loads(line) for line in (out2 / "explain" / "explain.jsonl").read_text().splitlines()]
    assert len(row2["codes"]) == min(16, res["n_resampled"]) and all(c["resampled"] for c in row2["codes"])


def test_cli_bad_explain(tiny_run, tiny_dataset, tmp_path, capsys):
    img = str(sorted((tiny_dataset / "test" / "good").glob("*.png"))[0])
    assert main(["detect", str(tiny_run), img, "--out", str(tmp_path / "o"), "--explain", "0", "--no-progress"]) == 2
    assert "--explain" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.jsonl").exists()        # checked before anything runs


def test_eval_explains_one_image_per_defect_type(tiny_run, tiny_dataset, tmp_path):
    out = tmp_path / "ev"
    assert main(["eval", str(tiny_run), str(tiny_dataset), "--out", str(out), "--explain", "1", "--resampler", "fast",
                 "--no-progress"]) == 0
    assert (out / "metrics.json").is_file()
    rows = [json.loads(line) for line in (out / "explain" / "explain.jsonl").read_text().splitlines()]
    assert [r["defect"] for r in rows] == ["foreign", "good", "hole", "stain"]
    for r in rows:
        stem = Path(r["image"]).stem
        (code,) = r["codes"]
        i, j = code["position"]
        assert code["panel"] == str(out / "explain" / f"{r['defect']}_{stem}_{i}_{j}.png")
        assert Image.open(code["panel"]).format == "PNG" and Path(r["npz"]).is_file()
