"""torch.distributed under torchrun: two CPU processes with gloo on this machine."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch

import lsr
from conftest import interrupt_training_in_prior_epoch_1
from lsr.checkpoint import load_weights

pytestmark = pytest.mark.slow


def _env(extra=None):
    # one thread per process on both sides of a comparison: exact equality needs the same
    # float reduction order, and a fresh process (no kernels cached for other thread counts)
    e = {**os.environ, "OMP_NUM_THREADS": "1", "LSR_DIST_TIMEOUT": "60", **(extra or {})}
    import lsr as pkg
    root = os.path.dirname(os.path.dirname(pkg.__file__))            # the lsr being tested
    e["PYTHONPATH"] = root + os.pathsep + e.get("PYTHONPATH", "")
    return e


def torchrun(*args, env=None, timeout=300):
    """Run ``torchrun --standalone --nproc_per_node=2 -m lsr ARGS``; returns the process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lsr", *map(str, args), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(env), timeout=timeout)


def one_process(*args, timeout=300):
    """Run ``python -m lsr ARGS`` in a fresh single process."""
    cmd = [sys.executable, "-m", "lsr", *map(str, args), "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def _log(run, stage):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()
            if json.loads(line)["stage"] == stage]


@pytest.fixture(scope="module")
def two_runs(tiny_dataset, tmp_path_factory):
    """The same tiny training once in one process and once under torchrun (2 ranks)."""
    base = tmp_path_factory.mktemp("dist")
    cfg = lsr.preset("tiny", in_channels=1).with_overrides(
        {"train.vqvae_epochs": 3, "train.prior_epochs": 3, "vqvae.dead_code_after": 2})   # restarts happen
    cfg_file = base / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    single = lsr.train(tiny_dataset, base / "single", cfg, progress=False, log=lambda *_: None)
    p = torchrun("train", tiny_dataset, "--out", base / "ddp", "--config", cfg_file, env={"LSR_CHECK_SYNC": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    return single.run, base / "ddp", p


def test_ranks_stay_identical_after_every_step(two_runs):
    _, ddp, _ = two_runs
    for stage in ("vqvae", "prior"):
        log = _log(ddp, stage)
        steps = [r["steps_checked_in_sync"] for r in log]
        assert steps and steps == sorted(steps) and steps[0] > 0, (stage, steps)   # every step checked


def test_torchrun_training_matches_one_process_with_the_same_global_batch(two_runs):
    single, ddp, proc = two_runs
    restarts = [r["restarts"] for r in _log(ddp, "vqvae")]
    assert sum(restarts) > 0 and restarts == [r["restarts"] for r in _log(single, "vqvae")]
    assert sorted(p.name for p in single.iterdir()) == sorted(p.name for p in ddp.iterdir())
    a, b = load_weights(single / "vqvae.safetensors"), load_weights(ddp / "vqvae.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    # the prior: the same model up to float rounding; Adam divides by sqrt(v), so weights with
    # near-zero gradients can move by up to ~lr per step either way (lr 1e-3, 6 steps here)
    a, b = load_weights(single / "prior.safetensors"), load_weights(ddp / "prior.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=6e-3, msg=k)
    for stage, key in (("vqvae", "val_mse"), ("prior", "val_nll")):
        x = [r[key] for r in _log(single, stage)]
        y = [r[key] for r in _log(ddp, stage)]
        np.testing.assert_allclose(y, x, rtol=1e-4)
    assert "2 processes" in proc.stdout


def test_sharded_eval_equals_one_process(two_runs, tiny_dataset, tmp_path):
    single, _, _ = two_runs
    one_process("eval", single, tiny_dataset, "--out", tmp_path / "one", "--batch-size", "2")
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    p = torchrun("eval", single, tiny_dataset, "--out", tmp_path / "two", "--batch-size", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["methods"] == one["methods"]
    rows1 = [json.loads(x) for x in (tmp_path / "one" / "results.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (tmp_path / "two" / "results.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k != "time_ms"}          # noqa: E731
    assert [strip(r) for r in rows1] == [strip(r) for r in rows2]
    tiffs = sorted((tmp_path / "one").rglob("*.tiff"))
    assert tiffs
    for f in tiffs:
        g = tmp_path / "two" / f.relative_to(tmp_path / "one")
        assert np.array_equal(tifffile.imread(f), tifffile.imread(g)), f


def test_sharded_detect_equals_one_process(two_runs, tiny_dataset, tmp_path):
    single, _, _ = two_runs
    images = sorted((tiny_dataset / "test").rglob("*.png"))[:5]
    one_process("detect", single, *images, "--out", tmp_path / "one", "--batch-size", "2")
    one = [json.loads(x) for x in (tmp_path / "one" / "results.jsonl").read_text().splitlines()]
    p = torchrun("detect", single, *images, "--out", tmp_path / "two", "--batch-size", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    two = [json.loads(x) for x in (tmp_path / "two" / "results.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time_ms", "panel")}   # noqa: E731
    assert [strip(r) for r in one] == [strip(r) for r in two]
    assert len(list((tmp_path / "two").glob("*.png"))) == 5


def test_resume_under_torchrun(tiny_dataset, tmp_path, monkeypatch):
    cfg = lsr.preset("tiny", in_channels=1).with_overrides({"train.prior_epochs": 3})
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    interrupt_training_in_prior_epoch_1(monkeypatch, tiny_dataset, tmp_path / "run", cfg)
    p = torchrun("train", tiny_dataset, "--out", tmp_path / "run", "--config", cfg_file)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resuming" in p.stdout
    assert [r["epoch"] for r in _log(tmp_path / "run", "prior")] == [0, 1, 2]
    assert (tmp_path / "run" / "prior.safetensors").is_file()


def test_a_failing_rank_stops_the_job_and_names_the_file(two_runs, tiny_dataset, tmp_path):
    import shutil

    single, _, _ = two_runs
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    bad = sorted((data / "test" / "good").glob("*.png"))[-1]
    bad.write_bytes(bad.read_bytes()[:200])                    # truncated: only one rank reads it
    t0 = time.perf_counter()
    p = torchrun("eval", single, data, "--out", tmp_path / "out", "--batch-size", "2", timeout=120)
    assert p.returncode != 0
    assert bad.name in p.stderr and "truncated" in p.stderr
    assert time.perf_counter() - t0 < 90                       # stopped, not hung
    assert not (tmp_path / "out" / "metrics.json").exists()
