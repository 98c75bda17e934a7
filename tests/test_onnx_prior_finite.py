"""Issue 17: the exported ONNX prior is finite wherever the PyTorch prior is, and equal to
it within the parity tolerance (randomly initialised and lightly trained `tiny` and
`demo-pixels` priors, several seeds, edge-case codes); the parity report names a
non-finite output (graph, output, first index) instead of printing an "inf" difference,
accepts an encoder near-tie flip (the cause of the issue's "logits inf": the report's
stand-in for "codes differ") and names it, and checks the loops at a tau that flags
codes when the bundle's flags none."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lsr
import lsr.ops as ops
from lsr.deploy import parity
from lsr.models import PixelSNAIL

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


def _codes(K: int, G: int, seed: int) -> torch.Tensor:
    """Random codes plus the grids a prior meets at the edges: all one code (the lowest,
    the highest), a stripe pattern; batches of 1 and several go through the same graph."""
    g = torch.Generator().manual_seed(seed)
    rnd = torch.randint(0, K, (3, G, G), generator=g)
    rows = torch.arange(G).view(G, 1).expand(G, G)
    edge = torch.stack([torch.zeros(G, G, dtype=torch.long), torch.full((G, G), K - 1), (rows * 3) % K])
    return torch.cat([rnd, edge])


def _lightly_trained(prior: PixelSNAIL, K: int, G: int, seed: int, steps: int = 12) -> PixelSNAIL:
    """A few Adam steps at a high rate on striped codes: sharp, confident logits (what a
    short `lsr train` gives), unlike a fresh prior's flat ones."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(G).view(1, G, 1)
    opt = torch.optim.Adam(prior.parameters(), lr=1e-2)
    prior.train()
    for _ in range(steps):
        shift = torch.randint(0, K, (4, 1, 1), generator=g)
        codes = ((rows + shift) % K).expand(4, G, G).contiguous()
        noise = torch.rand(codes.shape, generator=g) < 0.1
        codes = torch.where(noise, torch.randint(0, K, codes.shape, generator=g), codes)
        with ops.backend("reference"):
            loss = torch.nn.functional.cross_entropy(prior(codes), codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return prior.eval()


CASES = [("tiny", 0, False), ("tiny", 1, False), ("tiny", 2, True), ("tiny", 3, True),
         ("demo-pixels", 0, False), ("demo-pixels", 1, True), ("demo-pixels", 2, True)]
_EXPORTED: dict = {}


def _exported_prior(name: str, tmp_path_factory) -> bytes:
    """prior.onnx of a fresh ``name`` prior, exported as lsr-export does (one export per
    preset: the other seeds' weights replace its initializers, which the exporter names
    after the parameters; checked below)."""
    if name not in _EXPORTED:
        from lsr.deploy.bundle import graph_io
        from lsr.deploy.export import _export_onnx
        from lsr.deploy.graphs import PriorGraph, fold_weight_norm

        cfg = lsr.preset(name, 1).prior
        K, G = cfg.codebook_size, cfg.grid_size
        torch.manual_seed(12345)
        graph = PriorGraph(PixelSNAIL(cfg).eval()).eval()
        fold_weight_norm(graph)
        example = (torch.randint(0, K, (2, G, G), generator=torch.Generator().manual_seed(0)),)
        path = tmp_path_factory.mktemp("prior-onnx") / f"{name}.onnx"
        _export_onnx(graph, example, path, graph_io("onnx", 1, 32, G, K)["prior"], 18)
        _EXPORTED[name] = path.read_bytes()
    return _EXPORTED[name]


def _with_weights(model_bytes: bytes, prior: PixelSNAIL) -> bytes:
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    params = {f"prior.{k}": v.detach().numpy() for k, v in prior.state_dict().items()}
    inits = {t.name: t for t in model.graph.initializer}
    missing = sorted(set(params) - set(inits))
    assert not missing, f"parameters not kept as named initializers: {missing}"
    for k, v in params.items():
        inits[k].CopyFrom(numpy_helper.from_array(v.astype(np.float32), k))
    return model.SerializeToString()


@pytest.mark.parametrize("name,seed,trained", CASES, ids=[f"{n}-{s}-{'trained' if t else 'init'}" for n, s, t in CASES])
def test_onnx_prior_logits_finite_and_equal_to_pytorch(one_thread, tmp_path_factory, name, seed, trained):
    from lsr.ops.resampling import code_likelihood

    cfg = lsr.preset(name, 1).prior
    K, G = cfg.codebook_size, cfg.grid_size
    torch.manual_seed(seed)
    prior = PixelSNAIL(cfg).eval()
    if trained:
        prior = _lightly_trained(prior, K, G, seed)
    sess = ort.InferenceSession(_with_weights(_exported_prior(name, tmp_path_factory), prior),
                                providers=["CPUExecutionProvider"])
    codes = _codes(K, G, seed)
    with ops.backend("reference"), torch.no_grad():
        want = prior(codes)
        want_p = code_likelihood(want, codes)
    assert torch.isfinite(want).all()
    if trained:
        assert float(want.abs().max()) > 2.0, "the training should sharpen the logits"
    for batch in (codes[:1], codes):
        logits, lik = sess.run(None, {"codes": batch.numpy()})
        n = len(batch)
        assert parity.nonfinite_note("logits", logits, "prior.onnx output logits",
                                     ("image", "code", "position")) is None
        assert np.isfinite(lik).all()
        np.testing.assert_allclose(logits, want[:n].numpy(), rtol=0, atol=parity.DEFAULT_TOLERANCE["logits"])
        np.testing.assert_allclose(lik, want_p[:n].numpy(), rtol=0, atol=parity.DEFAULT_TOLERANCE["likelihood"])


# ----------------------------------------------------------------------------- the parity report

def test_nonfinite_note_names_output_and_first_index():
    a = np.zeros((2, 16, 8, 8), np.float32)
    assert parity.nonfinite_note("logits", a, "prior.onnx output logits", ("image", "code", "position")) is None
    a[1, 5, 2, 7] = np.inf
    a[0, 3, 0, 0] = np.nan
    a[0, 3, 6, 1] = -np.inf
    note = parity.nonfinite_note("logits", a, "prior.onnx output logits", ("image", "code", "position"))
    assert note == ("logits: 3 non-finite values in prior.onnx output logits, first at image 0, code 3, "
                    "position (0, 0) (nan)")
    m = np.ones((3, 4, 4), np.float32)
    m[2, 1, 3] = -np.inf
    assert parity.nonfinite_note("maps", torch.from_numpy(m), "postprocess.onnx output map_direct",
                                 ("image", "pixel")) == ("maps: 1 non-finite value in postprocess.onnx output "
                                                         "map_direct, first at image 2, pixel (1, 3) (-inf)")
    assert parity.nonfinite_note("codes", np.zeros(3, np.int64), "x") is None
    problems = []
    assert np.isnan(parity._compare(problems, "scores", np.zeros(2), np.array([0.0, np.nan]), "torch", "post.onnx"))
    assert problems == ["scores: 1 non-finite value in post.onnx, first at image 1 (nan)"]
    assert np.isnan(parity._compare(problems, "scores", np.zeros(2), np.zeros(3), "torch", "post.onnx"))
    assert "shape (3,) from post.onnx, (2,) from torch" in problems[-1]
    assert parity._compare(problems, "scores", np.zeros(2), np.full(2, 0.5), "torch", "post.onnx") == 0.5


def _report(**kw):
    base = dict(passed=False, n_images=6, codes_equal=True, resampled_codes_equal=True, prior_passes_equal=True,
                n_resampled=9, max_abs_logits=float("nan"), max_abs_likelihood=2e-8, max_abs_map=3e-8,
                max_abs_score=1e-8, max_abs_image=6e-8, default_loop="native", default_loop_codes_equal=True,
                max_abs_rows_logits=2e-7, tolerance=dict(parity.DEFAULT_TOLERANCE),
                providers=["CPUExecutionProvider"], images=["a"] * 6)
    return parity.ParityReport(**{**base, **kw})


def test_report_summary_names_nonfinite_output_instead_of_inf():
    note = "logits: 12 non-finite values in prior.onnx output logits, first at image 0, code 3, position (0, 0) (inf)"
    s = _report(problems=[note]).summary()
    assert s.startswith("parity FAILED") and "logits NON-FINITE (below)" in s and note in s
    assert "inf (tol" not in s and "logits inf" not in s
    assert "likelihood 2.00e-08" in s
    ok = _report(passed=True, max_abs_logits=5e-7).summary()
    assert "logits 5.00e-07 (tol 1e-03)" in ok and "\n" not in ok


def test_report_summary_on_code_ties_differences_and_unchecked_loops():
    tie = "image 4, position (7, 4): PyTorch code 5, bundle code 2, distance gap 1.00e-08 (4.8e-08 relative)"
    s = _report(passed=True, max_abs_logits=5e-7, code_ties=[tie], images_compared=5).summary()
    assert "codes identical but for 1 near-tie flip" in s and tie in s and "compared on the 5 images" in s
    s = _report(codes_equal=False, max_abs_logits=5e-7, code_differences=[tie] * 7).summary()
    assert "codes DIFFER at 7 position(s)" in s and "... and 2 more" in s
    s = _report(passed=True, max_abs_logits=5e-7, n_resampled=0).summary()
    assert "WARNING: no code was resampled" in s
    s = _report(passed=True, max_abs_logits=5e-7, n_resampled=0, loop_tau=0.05, n_resampled_loop=41).summary()
    assert "checked at tau 0.05 instead (41 codes resampled)" in s and "WARNING" not in s


def test_code_differences_tell_near_ties_from_real_differences():
    """Position (0, 0): z halfway between codes 0 and 1 (a tie up to float rounding);
    position (0, 1): the bundle picked code 2, far from z; image 1 is identical."""
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    z = torch.zeros(2, 2, 1, 2)                           # (B, D, h, w)
    z[0, :, 0, 0] = torch.tensor([0.5, 0.5 + 1e-7])
    z[0, :, 0, 1] = torch.tensor([1.0, 0.0])
    z[1, :, 0, :] = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).t()
    det = SimpleNamespace(space="pixels", vqvae=SimpleNamespace(encoder=lambda x: z,
                                                                quantizer=SimpleNamespace(codebook=e)))
    want = np.array([[[1, 0]], [[0, 1]]])
    got = np.array([[[0, 2]], [[0, 1]]])
    ties, other, keep = parity._code_differences(det, np.zeros((2, 1, 4, 4), np.float32), want, got, 1e-5)
    assert len(ties) == 1 and ties[0].startswith("image 0, position (0, 0): PyTorch code 1, bundle code 0")
    assert len(other) == 1 and other[0].startswith("image 0, position (0, 1): PyTorch code 0, bundle code 2")
    assert keep.tolist() == [False, True]
    ties, other, keep = parity._code_differences(det, np.zeros((2, 1, 4, 4), np.float32), want, want, 1e-5)
    assert ties == [] and other == [] and keep.all()


def test_loop_tau_flags_codes_only_when_the_bundles_tau_flags_none():
    p = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.5
    assert parity._loop_tau(p, 0.9) is None                     # the bundle's tau already flags codes
    t = parity._loop_tau(p, 1e-6)
    assert t is not None and bool(ops.flag_positions(p, t).any())
    assert float((p - t).abs().min()) > 1e-6                    # no likelihood within rounding of it


def test_check_bundle_names_a_nonfinite_prior_output(onnx_bundle_for_report, tiny_run, monkeypatch):
    """A bundle whose prior graph gave a NaN: the check fails and names prior.onnx's
    logits and the first index, in the summary that lsr-export prints."""
    from lsr.deploy.inferencer import Inferencer

    real = Inferencer.prior

    def broken(self, codes):
        logits, p = real(self, codes)
        logits = logits.copy()
        logits[0, 3, 0, 0] = np.nan
        return logits, p

    monkeypatch.setattr(Inferencer, "prior", broken)
    rep = parity.check_bundle(onnx_bundle_for_report, tiny_run, providers=["CPUExecutionProvider"])
    assert not rep.passed
    s = rep.summary()
    assert "logits NON-FINITE (below)" in s and "logits inf" not in s
    assert ("logits: 1 non-finite value in prior.onnx output logits, first at image 0, code 3, "
            "position (0, 0) (nan)") in s


def test_check_bundle_checks_the_loops_when_tau_flags_nothing(onnx_bundle_for_report, tiny_run):
    from lsr.deploy.bundle import read_bundle

    b = read_bundle(onnx_bundle_for_report)
    low = b._replace(meta={**b.meta, "detect": {**b.meta["detect"], "tau": 1e-12}})
    rep = parity.check_bundle(low, tiny_run, providers=["CPUExecutionProvider"])
    assert rep.passed, rep.summary()
    assert rep.n_resampled == 0 and rep.loop_tau is not None and rep.n_resampled_loop > 0
    assert "the loops were checked at tau" in rep.summary()


@pytest.fixture(scope="module")
def onnx_bundle_for_report(tiny_run, tmp_path_factory):
    """The session's ONNX bundle of the tiny run (test_export_onnx.py makes the same one)."""
    from lsr.deploy import export_bundle

    out = tmp_path_factory.getbasetemp() / "bundle-onnx"
    if not (out / "bundle.json").is_file():
        export_bundle(tiny_run, out, "onnx")
    return out
