"""Exported bundles vs PyTorch eager, per stage and end to end, batch 1 and 16, both modes.

Run: ``pytest benchmarks/test_bench_export.py --benchmark-group-by=group
--benchmark-columns=median,mean,stddev,rounds``.

Models, random weights (speed does not depend on training), exported once per session to
ONNX and TorchScript: ``pixels`` is the ``demo-pixels`` preset (128 px grey, 16x16 codes,
K = 32, prior 48 channels); ``features`` the ``demo`` preset (256 px grey through the
pretrained EfficientNet-Lite0 taps, inside the encoder graph; 16x16 codes, K = 64). tau
is set so that the rule flags about 2% of the codes of the benchmark images, so end to end
runs a few resampling passes per image.

* ``eager``: what ``lsr detect RUN`` runs (:class:`lsr.detect.Detector`, native ops when built);
* ``onnxruntime``: the ONNX bundle on onnxruntime's CPU provider (:class:`lsr.deploy.Inferencer`,
  its default loop: the numpy incremental loop over ``prior_rows.onnx``);
* ``onnxruntime_fast`` (end to end only): the same bundle with ``resampler="fast"`` (full
  passes), to show what the incremental loop gains;
* ``torchscript``: the TorchScript bundle through ``torch.jit.load`` (its default loop:
  lsr's C++ loop when the extension is built).

The stages are the bundle's graphs (docs/method.md, "The stages a bundle holds"); eager's
postprocess is :func:`lsr.anomaly.postprocess`, the function the graph is the export of.
"""
import hashlib
import time

import numpy as np
import pytest
import torch

import lsr.ops as ops
from lsr import anomaly
from lsr.checkpoint import save_weights
from lsr.config import preset
from lsr.io import write_json
from lsr.models import PixelSNAIL, build_vqvae

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

BACKENDS = ("eager", "onnxruntime", "onnxruntime_fast", "torchscript")
STAGES = ("encode", "prior", "decode", "postprocess", "end_to_end")
PRESETS = {"pixels": "demo-pixels", "features": "demo"}


def _tau_for(prior, codes, share: float = 0.02) -> float:
    with torch.no_grad():
        p = torch.softmax(prior(codes), 1).gather(1, codes.unsqueeze(1)).squeeze(1)
    for q in torch.linspace(0.0, 1.0, 401):
        tau = float(torch.quantile(p.flatten(), q))
        if ops.flag_positions(p, tau).float().mean() >= share:
            return tau
    return 1.0


_SETUPS: dict = {}


def _setup(mode, tmp_path_factory):
    """(detector, {backend: Inferencer}, 16 images, their codes) of one mode, once per session."""
    if mode in _SETUPS:
        return _SETUPS[mode]
    from lsr.deploy import Inferencer, export_bundle
    from lsr.detect import Detector

    root = tmp_path_factory.mktemp(f"bench-export-{mode}")
    cfg = preset(PRESETS[mode], 1)
    torch.manual_seed(0)
    vqvae, prior = build_vqvae(cfg.vqvae).eval(), PixelSNAIL(cfg.prior).eval()
    S = cfg.vqvae.image_size
    x16 = torch.rand(16, 1, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        codes16 = vqvae.encode(x16)
    cfg.detect.tau = _tau_for(prior, codes16)
    run = root / "run"
    write_json(run / "config.json", cfg.to_dict())
    save_weights(run / "vqvae.safetensors", vqvae)
    save_weights(run / "prior.safetensors", prior)
    export_bundle(run, root / "onnx", "onnx", check=False)
    export_bundle(run, root / "ts", "torchscript", check=False)
    det = Detector.load(run, "cpu")
    runs = {"onnxruntime": Inferencer(root / "onnx", providers=["CPUExecutionProvider"]),
            "onnxruntime_fast": Inferencer(root / "onnx", providers=["CPUExecutionProvider"], resampler="fast"),
            "torchscript": Inferencer(root / "ts")}
    _SETUPS[mode] = (det, runs, x16, codes16)
    return _SETUPS[mode]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The pixel-mode setup (the CLI benchmarks below use it)."""
    return _setup("pixels", tmp_path_factory)


def _stage_fn(stage, backend, det, runs, x, codes):
    """A no-argument callable running one stage on one backend (inputs prepared outside it)."""
    B = x.shape[0]
    if backend == "eager":
        features = det.space == "features"
        if stage == "end_to_end":
            return lambda: det.detect(x)
        with torch.no_grad():
            seen = det.vqvae.features(x) if features else x
            dseen = det.vqvae.decode_features(codes) if features else det.decode_image(codes)
        settings = anomaly.MapSettings.of(det.config)
        held = anomaly.held_out_tensor(det.config.detect)
        fns = {
            "encode": lambda: det.vqvae.encode(x),
            "prior": lambda: det.prior(codes),
            "decode": ((lambda: (det.decode_image(codes), det.vqvae.decode_features(codes))) if features
                       else (lambda: det.decode_image(codes))),
            "postprocess": lambda: anomaly.postprocess(seen, dseen, dseen.unsqueeze(1), codes.unsqueeze(1) < 0,
                                                       torch.zeros(B), held, settings),
        }
        return fns[stage]
    inf = runs[backend]
    xn, cn = x.numpy(), codes.numpy()
    if stage == "end_to_end":
        return lambda: inf.predict_batch(xn)
    seen = inf.runner.run("encoder", image=xn)["seen"]
    dseen = inf.runner.run("decoder", codes=cn)["seen"]
    fns = {
        "encode": lambda: inf.runner.run("encoder", image=xn),
        "prior": lambda: inf.prior(cn),
        "decode": lambda: inf.runner.run("decoder", codes=cn),
        "postprocess": lambda: inf.runner.run("postprocess", seen=seen, direct=dseen, restored=dseen[:, None],
                                              resampled=np.zeros((B, 1) + cn.shape[1:], np.float32),
                                              nll_score=np.zeros(B, np.float32), held_out=inf.held_out),
    }
    return fns[stage]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 16])
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("mode", ["pixels", "features"])
def test_export_stage(benchmark, tmp_path_factory, mode, stage, B, backend):
    if backend == "onnxruntime_fast" and stage != "end_to_end":
        pytest.skip("the loop only changes end to end")
    det, runs, x16, codes16 = _setup(mode, tmp_path_factory)
    x, codes = x16[:B].contiguous(), codes16[:B].contiguous()
    fn = _stage_fn(stage, backend, det, runs, x, codes)
    with torch.no_grad():
        fn()                                                  # warm-up and a time estimate
        t0 = time.perf_counter()
        fn()
        est = time.perf_counter() - t0
    rounds = int(max(3, min(50, 1.5 / max(est, 1e-6))))
    benchmark.group = f"{mode}: {stage} batch {B}"
    benchmark.pedantic(fn, rounds=rounds, iterations=1)
    if stage == "end_to_end":
        with torch.no_grad():
            res = fn()
        benchmark.extra_info["prior_passes"] = int(np.asarray(res.prior_passes).sum())
        benchmark.extra_info["resampled"] = int(np.asarray(res.resampled).sum())
        benchmark.extra_info["positions_evaluated"] = int(np.asarray(res.positions_evaluated).sum())
        # the same codes on every backend and version (compare across the rows of one run)
        benchmark.extra_info["codes_sha256"] = hashlib.sha256(
            np.ascontiguousarray(np.asarray(res.resampled_codes), dtype=np.int64).tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------- C++ runtime vs Python

def _cpp_bin():
    import os
    from pathlib import Path
    p = Path(os.environ.get("LSR_DETECT_BIN", Path(__file__).resolve().parents[1] / "export" / "build" / "lsr_detect"))
    return p if p.is_file() else None


@pytest.fixture(scope="module")
def cli_setup(setup, tmp_path_factory):
    """The benchmark run and its TorchScript bundle (with prior_native.pt), 16 PNG images."""
    from PIL import Image
    det, runs, x16, _ = setup
    root = runs["torchscript"].bundle.root.parent
    imgs = []
    folder = tmp_path_factory.mktemp("bench-images")
    for i in range(16):
        p = folder / f"{i:02d}.png"
        Image.fromarray((x16[i, 0].numpy() * 255).round().astype(np.uint8)).save(p)
        imgs.append(p)
    return root / "run", root / "ts", imgs


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("runtime", ["python_cli", "cpp_runtime"])
def test_cli_end_to_end(benchmark, bench_means, cli_setup, tmp_path, runtime, batch):
    """One CLI call detecting 16 images (process start, model load, detection, outputs):
    ``lsr detect RUN --resampler native`` vs ``export/build/lsr_detect BUNDLE``. The
    detection time per image that each reports (``time_ms``) is in extra_info."""
    import json
    import subprocess
    import sys
    run, bundle, imgs = cli_setup
    if runtime == "cpp_runtime":
        exe = _cpp_bin()
        if exe is None:
            pytest.skip("export/build/lsr_detect not built (README: C++ runtime)")
        cmd = [str(exe), str(bundle), *map(str, imgs), "--out", str(tmp_path / "o"), "--batch-size", str(batch)]
    else:
        cmd = [sys.executable, "-m", "lsr", "detect", str(run), *map(str, imgs), "--out", str(tmp_path / "o"),
               "--batch-size", str(batch), "--resampler", "native", "--no-panels", "--tiff", "--no-progress"]
    benchmark.group = f"CLI end to end, 16 images, batch {batch}"
    benchmark.pedantic(lambda: subprocess.run(cmd, check=True, capture_output=True), rounds=3, iterations=1,
                       warmup_rounds=1)
    rows = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    benchmark.extra_info["detect_ms_per_image"] = float(np.mean([r["time_ms"] for r in rows]))
    benchmark.extra_info["prior_passes"] = int(sum(r["prior_passes"] for r in rows))
    name = "native" if runtime == "cpp_runtime" else runtime
    bench_means.setdefault(benchmark.group, {})[name] = benchmark.stats.stats.mean
