"""Export (lsr-export) and the numpy resampling pieces: ONNX and TorchScript bundles of a
tiny trained run give the PyTorch Detector's codes exactly and its maps within float
rounding; the numpy noise, rule and loops equal the torch ones."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lsr.ops as ops
from lsr.cli import export_main
from lsr.config import PriorConfig
from lsr.data import load_image, scan_mvtec
from lsr.deploy import Inferencer, check_bundle, export_bundle, read_bundle
from lsr.deploy import numpy_ops as nops
from lsr.deploy.parity import synthetic_images
from lsr.detect import Detector, chain_seed
from lsr.models import PixelSNAIL

REPO = Path(__file__).resolve().parents[1]

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def shared_bundle(tmp_path_factory, run, fmt):
    """One bundle per format per session (test_deploy.py reuses the same folder)."""
    out = tmp_path_factory.getbasetemp() / f"bundle-{fmt}"
    if not (out / "bundle.json").is_file():
        export_bundle(run, out, fmt)
    return out


@pytest.fixture(scope="module")
def onnx_bundle(tiny_run, tmp_path_factory):
    return shared_bundle(tmp_path_factory, tiny_run, "onnx")


@pytest.fixture(scope="module")
def ts_bundle(tiny_run, tmp_path_factory):
    return shared_bundle(tmp_path_factory, tiny_run, "torchscript")


def _images(tiny_dataset, det):
    """Defective and good test images plus synthetic ones (which the prior flags)."""
    paths = [s.path for s in scan_mvtec(tiny_dataset).test]
    x = np.stack([load_image(p, det.channels, det.image_size) for p in paths])
    return np.concatenate([x, synthetic_images(2, det.channels, det.image_size)])


# ----------------------------------------------------------------------------- numpy twins

@pytest.mark.parametrize("seed", [0, 1, 12345, 2 ** 32 + 7, 2 ** 62 + 3, chain_seed(5, 17, 2)])
def test_numpy_gumbel_noise_equals_torch_bit_for_bit(seed):
    T, K = 64, 48
    want = ops.gumbel_noise(1, T, K, [seed])[0].numpy()
    got = nops.gumbel_noise(1, T, K, [seed])[0]
    assert got.dtype == np.float32 and np.array_equal(got, want)
    lazy = nops.LazyNoise([seed], T, K)
    ts = np.array([0, 5, 63])
    assert np.array_equal(lazy.at(np.zeros(3, dtype=np.int64), ts), want[ts])


def test_numpy_chain_seed_equals_torch_path():
    for args in [(0, 0, 0), (3, 17, 1), (2 ** 40, 123456, 3), (-5, 2, 0)]:
        assert nops.chain_seed(*args) == chain_seed(*args)


def test_numpy_flag_positions_equals_torch():
    g = torch.Generator().manual_seed(0)
    for H, W in [(1, 1), (1, 5), (4, 1), (6, 7)]:
        p = torch.rand(3, H, W, generator=g)
        for tau in (0.1, 0.5, 0.9):
            assert np.array_equal(nops.flag_positions(p.numpy(), tau), ops.flag_positions(p, tau).numpy())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_numpy_loops_equal_torch_loops(one_thread, temperature):
    """Same prior, same noise: the numpy fast and naive loops give the torch loops' codes,
    flags and pass counts exactly (tau set so that several codes change)."""
    torch.manual_seed(0)
    cfg = PriorConfig(codebook_size=8, grid_size=5, channels=8, n_blocks=1, n_res_blocks=1, kernel_size=3,
                      n_heads=2, dropout=0.0)
    prior = PixelSNAIL(cfg).eval()
    codes = torch.randint(0, 8, (3, 5, 5))
    seeds = [chain_seed(0, i, 0) for i in range(3)]
    noise = ops.gumbel_noise(3, 25, 8, seeds)

    def prior_np(c):
        with torch.no_grad():
            logits = prior(torch.from_numpy(c))
        return logits.numpy(), torch.softmax(logits, 1).gather(1, torch.from_numpy(c).unsqueeze(1)).squeeze(1).numpy()

    with torch.no_grad():
        p0 = prior_np(codes.numpy())[1]
        tau = float(np.quantile(p0, 0.3))
        want = ops.resample_fast(prior, codes, noise, tau, temperature)
    got = nops.resample_fast(prior_np, codes.numpy(), nops.LazyNoise(seeds, 25, 8), tau, temperature)
    assert int(want.resampled.sum()) >= 3
    assert np.array_equal(got.codes, want.codes.numpy())
    assert np.array_equal(got.resampled, want.resampled.numpy())
    assert np.array_equal(got.prior_passes, want.prior_passes.numpy())
    with torch.no_grad():                          # the oracle: a prior pass per position
        naive = ops.resample_naive(prior, codes, noise, tau, temperature)
    assert np.array_equal(naive.codes.numpy(), got.codes) and np.array_equal(naive.resampled.numpy(), got.resampled)


ROWS_PRIORS = {
    "attention": PriorConfig(codebook_size=8, grid_size=6, channels=8, n_blocks=2, n_res_blocks=1, kernel_size=5,
                             n_heads=2, dropout=0.0),
    "no-attention": PriorConfig(codebook_size=6, grid_size=5, channels=8, n_blocks=1, n_res_blocks=2,
                                kernel_size=3, n_heads=2, attention=False, dropout=0.0),
    "no-cached-layers": PriorConfig(codebook_size=5, grid_size=4, channels=4, n_blocks=1, n_res_blocks=1,
                                    kernel_size=1, n_heads=1, dropout=0.0),
}


@pytest.mark.parametrize("name", list(ROWS_PRIORS))
def test_numpy_incremental_loop_equals_fast_loop(one_thread, name):
    """The numpy incremental loop over PriorRowsGraph (run eagerly, float64) gives the fast
    loop's codes, and the C++ loop's call and position counts; row ranges from state equal
    full passes."""
    from lsr.deploy.graphs import PriorRowsGraph

    torch.manual_seed(0)
    cfg = ROWS_PRIORS[name]
    prior = PixelSNAIL(cfg).double().eval()
    graph = PriorRowsGraph(prior).double().eval()
    G, K, B = cfg.grid_size, cfg.codebook_size, 5
    codes = torch.randint(0, K, (B, G, G), generator=torch.Generator().manual_seed(1))
    seeds = [chain_seed(3, i, 0) for i in range(B)]
    noise = ops.gumbel_noise(B, G * G, K, seeds)

    def prior_np(c):
        with torch.no_grad():
            logits = prior(torch.from_numpy(c))
        return logits.numpy(), torch.softmax(logits, 1).gather(1, torch.from_numpy(c).unsqueeze(1)).squeeze(1).numpy()

    def rows_np(c, ids, state):
        with torch.no_grad():
            out = graph(torch.from_numpy(c), torch.from_numpy(ids), *map(torch.from_numpy, state))
        return out[0].numpy(), out[1].numpy(), [o.numpy() for o in out[2:]]

    geometry = graph.state_geometry()
    full = prior_np(codes.numpy())[0]
    state = nops.new_state(geometry, B, G, G, np.float64)
    for r0, r1 in ((0, 1), (1, 3), (3, G)):                          # row ranges == the full pass
        ids = np.arange(r0 - graph.context_rows, r1)
        lg, _, new = rows_np(codes.numpy()[:, np.clip(ids, 0, None)], ids,
                             nops.state_above(state, geometry, slice(None), r0, G))
        nops.store_rows(state, geometry, slice(None), r0, r1, G, new)
        np.testing.assert_allclose(lg, full[:, :, r0:r1], rtol=1e-12, atol=1e-12)
    for q in (0.2, 0.5):
        tau = float(np.quantile(prior_np(codes.numpy())[1], q))
        with torch.no_grad():
            want = ops.resample_fast(prior, codes, noise, tau)
        got = nops.resample_incremental(prior_np, rows_np, geometry, graph.context_rows, codes.numpy(),
                                        nops.LazyNoise(seeds, G * G, K), tau)
        assert int(want.resampled.sum()) >= 3
        assert np.array_equal(got.codes, want.codes.numpy()) and np.array_equal(got.resampled, want.resampled.numpy())
        np.testing.assert_allclose(got.likelihood, want.likelihood.numpy(), rtol=1e-6)   # float32 there
        if ops.native_available():
            with torch.no_grad():
                nat = ops.resample_native(prior, codes, noise, tau)
            assert np.array_equal(got.prior_passes, nat.prior_passes.numpy())
            assert np.array_equal(got.positions_evaluated, nat.positions_evaluated.numpy())


def test_numpy_split_groups_is_the_cpp_cost_model():
    assert nops.split_groups([], [], 16) == []
    assert nops.split_groups([4], [7], 16) == [[0]]
    # close requests share a call; a far one gets its own (overhead 0.15 * 32 = 4.8 rows)
    groups = nops.split_groups([10, 11, 0, 10], [13, 14, 3, 13], 32)
    assert sorted(map(sorted, groups)) == [[0, 1, 3], [2]]
    assert sorted(map(sorted, nops.split_groups([0, 1], [3, 4], 32))) == [[0, 1]]


def test_numpy_resize_and_nll_equal_torch():
    from lsr import anomaly

    m = torch.rand(2, 16, 16)
    for size in [(16, 16), (37, 23), (8, 5)]:
        np.testing.assert_allclose(nops.resize_maps(m.numpy(), size), anomaly.resize_maps(m, size).numpy(),
                                   atol=1e-6)
    p = torch.rand(2, 4, 4) ** 4
    np.testing.assert_allclose(nops.nll_score(p.numpy(), 0.1), anomaly.nll_score(p, 0.1).numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------- ONNX bundle

def test_onnx_bundle_files_and_metadata(onnx_bundle, tiny_run):
    b = read_bundle(onnx_bundle)
    meta = b.meta
    assert meta["format"] == "onnx" and meta["bundle_version"] == 3 and meta["versions"]["onnx_opset"] >= 17
    assert meta["model"] == {**meta["model"], "image_size": 32, "channels": 1, "grid_size": 8, "codebook_size": 16,
                             "space": "pixels", "seen_channels": 1, "seen_size": 32}
    run_cfg = json.loads((tiny_run / "config.json").read_text())["detect"]
    assert meta["detect"]["tau"] == run_cfg["tau"] and meta["detect"]["sigma"] == run_cfg["sigma"]
    assert meta["parity"]["passed"] and meta["parity"]["codes_equal"]
    assert sorted(p.name for p in onnx_bundle.iterdir()) == ["bundle.json", "decoder.onnx", "encoder.onnx",
                                                             "postprocess.onnx", "prior.onnx", "prior_rows.onnx"]
    assert meta["detect"]["resampler"] == "auto" and "prior_rows" in b.graphs
    assert meta["parity"]["default_loop"] == "native" and meta["parity"]["default_loop_codes_equal"]
    assert meta["parity"]["max_abs_rows_logits"] < 1e-4
    rows = meta["graphs"]["prior_rows"]
    assert rows["context_rows"] == 2 and {e["kind"] for e in rows["state"]} == {"conv", "attention"}
    for name, g in meta["graphs"].items():
        model = onnx.load(str(onnx_bundle / g["file"]))
        onnx.checker.check_model(model)
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), name
        assert [i.name for i in model.graph.input] == [s["name"] for s in g["inputs"]]
        assert [o.name for o in model.graph.output] == [s["name"] for s in g["outputs"]]
        first_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert first_dim.dim_param and not first_dim.dim_value, f"{name}: batch axis is not dynamic"
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_onnx_round_trip_same_codes_as_pytorch(onnx_bundle, tiny_run, tiny_dataset):
    det = Detector.load(tiny_run, "cpu").with_options(resampler="fast")
    x = _images(tiny_dataset, det)
    inf = Inferencer(onnx_bundle, providers=["CPUExecutionProvider"], resampler="fast")   # same passes
    got = inf.predict_batch(x)
    for backend in ("reference", "auto"):          # the exported path, and what `lsr detect RUN` runs
        with ops.backend(backend), torch.no_grad():
            want = det.detect(torch.from_numpy(x))
        assert int(want.resampled.sum()) > 0, "the test needs images where codes are resampled"
        assert np.array_equal(got.codes, want.codes.numpy())
        assert np.array_equal(got.resampled_codes, want.resampled_codes.numpy())
        assert np.array_equal(got.resampled, want.resampled.numpy())
        assert np.array_equal(got.prior_passes, want.prior_passes.numpy())
        for f in ("anomaly_map", "map_restored_vs_input", "map_restored_vs_direct", "map_direct", "map_gated",
                  "score", "direct_score", "direct", "restored", "likelihood"):
            np.testing.assert_allclose(getattr(got, f), getattr(want, f).numpy(), atol=1e-4, err_msg=f)
        np.testing.assert_allclose(got.nll_score, want.nll_score.numpy(), rtol=1e-4)


@pytest.mark.skipif(not ops.native_available(), reason="compares with the native loop (lsr._C)")
def test_onnx_incremental_loop_equals_native_loop(onnx_bundle, tiny_run, tiny_dataset):
    """The bundle's default loop (numpy, over prior_rows.onnx) makes the decisions of the
    C++ loop of `--resampler native`: the same codes, and the same calls over the same rows
    (one cost model), so the same prior_passes and positions_evaluated."""
    det = Detector.load(tiny_run, "cpu").with_options(resampler="native")
    x = _images(tiny_dataset, det)
    inf = Inferencer(onnx_bundle, providers=["CPUExecutionProvider"])
    assert (inf.loop, inf.loop_impl) == ("native", "numpy")
    got = inf.predict_batch(x)
    with torch.no_grad():
        want = det.detect(torch.from_numpy(x))
    assert int(want.resampled.sum()) >= 3 and (want.prior_passes > 2).any()
    assert np.array_equal(got.resampled_codes, want.resampled_codes.numpy())
    assert np.array_equal(got.resampled, want.resampled.numpy())
    assert np.array_equal(got.prior_passes, want.prior_passes.numpy())
    assert np.array_equal(got.positions_evaluated, want.positions_evaluated.numpy())
    assert (got.positions_evaluated < got.prior_passes * 64).any()        # calls of a few rows
    np.testing.assert_allclose(got.anomaly_map, want.anomaly_map.numpy(), atol=1e-4)
    fast = Inferencer(onnx_bundle, providers=["CPUExecutionProvider"], resampler="fast").predict_batch(x)
    assert np.array_equal(fast.resampled_codes, got.resampled_codes)


@pytest.mark.parametrize("kind", ["stateless-prior", "grid-3", "grid-2"])
def test_export_edge_models(tmp_path, kind):
    """Priors and grids at the edges of prior_rows: a prior with no state (no cached conv,
    no attention), a 3 x 3 grid (the smallest with prior_rows), a 2 x 2 grid (none: fast).
    Export passes its parity check and the bundle gives the PyTorch path's codes."""
    import dataclasses
    from lsr.checkpoint import save_weights
    from lsr.config import preset
    from lsr.io import write_json
    from lsr.models import VQVAE

    cfg = preset("tiny", 1)
    if kind == "stateless-prior":
        cfg.prior = dataclasses.replace(cfg.prior, n_res_blocks=0, attention=False)
    else:
        size = {"grid-3": 12, "grid-2": 8}[kind]
        cfg.vqvae = dataclasses.replace(cfg.vqvae, image_size=size)
        cfg.prior = dataclasses.replace(cfg.prior, grid_size=cfg.grid_size)
    torch.manual_seed(0)
    vqvae, prior = VQVAE(cfg.vqvae).eval(), PixelSNAIL(cfg.prior).eval()
    S = cfg.vqvae.image_size
    x = synthetic_images(6, 1, S, seed=3)
    with torch.no_grad():
        codes = vqvae.encode(torch.from_numpy(x))
        p = ops.resampling.code_likelihood(prior(codes), codes)
    cfg.detect.tau = float(p.flatten().quantile(0.25))
    run = tmp_path / "run"
    write_json(run / "config.json", cfg.to_dict())
    save_weights(run / "vqvae.safetensors", vqvae)
    save_weights(run / "prior.safetensors", prior)
    res = export_bundle(run, tmp_path / "b", "onnx")
    assert res.parity.passed, res.parity.summary()
    inf = Inferencer(tmp_path / "b", providers=["CPUExecutionProvider"])
    assert inf.loop == ("fast" if kind == "grid-2" else "native")
    if kind == "stateless-prior":
        assert read_bundle(tmp_path / "b").meta["graphs"]["prior_rows"]["state"] == []
    det = Detector.load(run, "cpu").with_options(resampler="fast")
    with torch.no_grad():
        want = det.detect(torch.from_numpy(x))
    got = inf.predict_batch(x)
    assert int(want.resampled.sum()) > 0
    assert np.array_equal(got.resampled_codes, want.resampled_codes.numpy())


def test_onnx_runtime_options_match_pytorch(onnx_bundle, tiny_run, tiny_dataset):
    """Seed, temperature, restorations (the postprocess graph's dynamic N axis) and image
    ids change at run time exactly as in the PyTorch path."""
    opts = dict(seed=7, temperature=0.7, restorations=2)
    det = Detector.load(tiny_run, "cpu").with_options(**opts, resampler="fast")   # the bundle runs fast
    x = _images(tiny_dataset, det)[-4:]
    ids = [5, 9, 2, 40]
    with ops.backend("reference"), torch.no_grad():
        want = det.detect(torch.from_numpy(x), ids)
    got = Inferencer(onnx_bundle, providers=["CPUExecutionProvider"], resampler="fast", **opts).predict_batch(x, ids)
    assert int(want.resampled.sum()) > 0
    assert np.array_equal(got.resampled_codes, want.resampled_codes.numpy())
    assert np.array_equal(got.prior_passes, want.prior_passes.numpy())
    np.testing.assert_allclose(got.n_resampled, want.n_resampled.numpy())
    np.testing.assert_allclose(got.anomaly_map, want.anomaly_map.numpy(), atol=1e-4)
    other = Inferencer(onnx_bundle, providers=["CPUExecutionProvider"], **opts)   # auto: the incremental loop
    assert np.array_equal(other.predict_batch(x, ids).resampled_codes, got.resampled_codes)
    with pytest.raises(ValueError, match="naive .* is the PyTorch oracle"):
        Inferencer(onnx_bundle, providers=["CPUExecutionProvider"], resampler="naive")


def test_export_cli_and_check(onnx_bundle, tiny_run, tmp_path, capsys):
    assert export_main(["--check", str(onnx_bundle)]) == 0
    assert "parity PASSED" in capsys.readouterr().out
    assert export_main(["--check", str(onnx_bundle), "--tolerance", "logits=1e-12"]) == 1   # tolerances are > 0
    assert "FAILED" in capsys.readouterr().out
    out = tmp_path / "b"
    assert export_main([str(tiny_run), "--format", "onnx", "--out", str(out), "--no-check", "--sigma", "2",
                        "--map", "restored_vs_direct"]) == 0
    meta = read_bundle(out).meta
    assert meta["detect"]["sigma"] == 2.0 and meta["detect"]["map_kind"] == "restored_vs_direct"
    assert "parity" not in meta
    rep = check_bundle(out)                        # the baked settings are what is compared
    assert rep.passed and rep.n_resampled > 0, rep.summary()
    assert export_main([str(tiny_run), "--out", str(out), "--no-check"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bilateral.*cannot be exported"):
        export_bundle(tiny_run, tmp_path / "c", options={"smoothing": "bilateral"}, check=False)
    assert not (tmp_path / "c").exists()
    assert export_main([]) == 2
    assert "run folder" in capsys.readouterr().err


def test_failed_check_leaves_no_bundle(tiny_run, tmp_path):
    out = tmp_path / "deploy" / "b"
    with pytest.raises(ValueError, match="parity check .* failed"):
        export_bundle(tiny_run, out, "torchscript", tolerance={"map": -1.0})
    assert not out.exists()
    assert list((tmp_path / "deploy").iterdir()) == []          # no temporary folder left either


# ----------------------------------------------------------------------------- TorchScript bundle

def test_torchscript_round_trip(ts_bundle, tiny_run, tiny_dataset):
    det = Detector.load(tiny_run, "cpu").with_options(resampler="fast")   # as the bundle: same passes
    x = _images(tiny_dataset, det)
    with ops.backend("reference"), torch.no_grad():
        want = det.detect(torch.from_numpy(x))
    b = read_bundle(ts_bundle)
    assert b.format == "torchscript" and b.meta["parity"]["passed"]
    inf = Inferencer(ts_bundle)
    assert (inf.loop, inf.loop_impl) == (("native", "lsr._C") if ops.native_available() else ("fast", "numpy"))
    got = inf.predict_batch(x)
    assert np.array_equal(got.codes, want.codes.numpy())
    assert np.array_equal(got.resampled_codes, want.resampled_codes.numpy())
    np.testing.assert_allclose(got.anomaly_map, want.anomaly_map.numpy(), atol=1e-5)


def test_torchscript_graphs_load_without_lsr(ts_bundle, tiny_run, tmp_path):
    """torch.jit.load in a process where importing lsr fails: the graphs are plain torch."""
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "lsr" or name.startswith("lsr."):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import torch
root = {str(ts_bundle)!r}
enc, prior, dec, post = (torch.jit.load(root + "/" + n + ".pt") for n in ("encoder", "prior", "decoder", "postprocess"))
x = torch.rand(3, 1, 32, 32)
codes, seen = enc(x)
logits = prior(codes)
img, dseen = dec(codes)
maps = post(seen, dseen, dseen.unsqueeze(1).repeat(1, 2, 1, 1, 1), torch.zeros(3, 2, 8, 8), torch.zeros(3),
            torch.full((4,), float("nan")))
assert codes.shape == (3, 8, 8) and logits.shape == (3, 16, 8, 8) and img.shape == (3, 1, 32, 32)
assert maps[0].shape == (3, 32, 32) and maps[1].shape == (3,)
assert "lsr" not in sys.modules
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
