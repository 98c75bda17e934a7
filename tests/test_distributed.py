"""torch.distributed under torchrun: two CPU processes with gloo on this machine."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

import lsr
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


def torchrun_script(script, *args, env=None, timeout=300):
    """Run ``torchrun --standalone --nproc_per_node=2 SCRIPT ARGS``; returns the process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), *map(str, args)]
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


TWO_RUNS_CFG = {"train.vqvae_epochs": 3, "train.prior_epochs": 3, "vqvae.dead_code_after": 2}   # restarts happen


@pytest.fixture(scope="module")
def two_runs(tiny_dataset, tmp_path_factory):
    """The same tiny training once in one process and once under torchrun (2 ranks)."""
    base = tmp_path_factory.mktemp("dist")
    cfg = lsr.preset("tiny", in_channels=1).with_overrides(TWO_RUNS_CFG)
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
    def strip(r, out):                      # no timings; files written under OUT compared relative to it
        return {k: (os.path.relpath(v, out) if isinstance(v, str) and v.startswith(str(out)) else v)
                for k, v in r.items() if k != "time_ms"}

    assert [strip(r, tmp_path / "one") for r in rows1] == [strip(r, tmp_path / "two") for r in rows2]
    tiffs = sorted((tmp_path / "one").rglob("*.tiff"))
    assert tiffs
    for f in tiffs:
        g = tmp_path / "two" / f.relative_to(tmp_path / "one")
        assert np.array_equal(tifffile.imread(f), tifffile.imread(g)), f


def test_feature_mode_trains_and_evaluates_under_torchrun(tiny_dataset, tmp_path):
    """Feature space (the default presets) under torchrun: the frozen backbone, the feature
    statistics and the trained weights equal one process's (the tolerances of the pixel
    test above), and the sharded eval writes the one-process metrics and rows."""
    cfg = lsr.preset("tiny-features", in_channels=1).with_overrides(TWO_RUNS_CFG)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    single = tmp_path / "single"
    one_process("train", tiny_dataset, "--out", single, "--config", cfg_file)
    p = torchrun("train", tiny_dataset, "--out", tmp_path / "ddp", "--config", cfg_file)
    assert p.returncode == 0, p.stdout + p.stderr
    a, b = load_weights(single / "vqvae.safetensors"), load_weights(tmp_path / "ddp" / "vqvae.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("backbone.") for k in a)
    for k in a:
        exact = k.startswith("backbone.") or k in ("feature_mean", "feature_std")
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0 if exact else 1e-5, msg=k)
    a, b = load_weights(single / "prior.safetensors"), load_weights(tmp_path / "ddp" / "prior.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=6e-3, msg=k)
    one_process("eval", single, tiny_dataset, "--out", tmp_path / "one", "--batch-size", "2")
    p = torchrun("eval", single, tiny_dataset, "--out", tmp_path / "two", "--batch-size", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["methods"] == one["methods"] and "fused" in one["methods"]


def test_sharded_detect_equals_one_process(two_runs, tiny_dataset, tmp_path):
    single, _, _ = two_runs
    images = sorted((tiny_dataset / "test").rglob("*.png"))[:5]
    one_process("detect", single, *images, "--out", tmp_path / "one", "--batch-size", "2")
    one = [json.loads(x) for x in (tmp_path / "one" / "results.jsonl").read_text().splitlines()]
    p = torchrun("detect", single, *images, "--out", tmp_path / "two", "--batch-size", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    two = [json.loads(x) for x in (tmp_path / "two" / "results.jsonl").read_text().splitlines()]
    def strip(r, out):                      # no timings; files written under OUT compared relative to it
        return {k: (os.path.relpath(v, out) if isinstance(v, str) and v.startswith(str(out)) else v)
                for k, v in r.items() if k != "time_ms"}

    assert [strip(r, tmp_path / "one") for r in one] == [strip(r, tmp_path / "two") for r in two]
    assert len(list((tmp_path / "two").glob("*.png"))) == 5


INTERRUPT_SCRIPT = """
import sys
import lsr.training as T
from lsr.cli import main

real, calls = T.prior_nll, [0]


def flaky(*a, **k):                  # Ctrl-C at the end of the prior's epoch 1, on every rank
    calls[0] += 1
    if calls[0] == 2:
        raise KeyboardInterrupt
    return real(*a, **k)


T.prior_nll = flaky
sys.exit(main(sys.argv[1:]))
"""


def test_resume_under_torchrun_equals_an_uninterrupted_torchrun_run(two_runs, tiny_dataset, tmp_path):
    """A torchrun training interrupted in the prior's epoch 1 (epoch 0 checkpointed) and
    resumed under torchrun ends with the same weights (the VQ-VAE bit for bit, the prior to
    float rounding, see below) and the same config.json (tau, thresholds) as the
    uninterrupted torchrun run of the same configuration."""
    _, ddp, _ = two_runs
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(lsr.preset("tiny", in_channels=1).with_overrides(TWO_RUNS_CFG).to_dict()))
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT_SCRIPT)
    run = tmp_path / "run"
    args = ("train", tiny_dataset, "--out", run, "--config", cfg_file, "--no-progress")
    p = torchrun_script(script, *args, env={"LSR_CHECK_SYNC": "1"})
    assert p.returncode != 0 and "interrupted" in p.stderr, p.stdout + p.stderr
    assert not (run / "prior.safetensors").exists()
    assert json.loads((run / "checkpoints" / "prior_state.json").read_text())["info"]["epoch"] == 0
    p = torchrun(*args[:-1], env={"LSR_CHECK_SYNC": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resuming" in p.stdout
    assert [r["epoch"] for r in _log(run, "prior")] == [0, 1, 2]          # epoch 0 is not trained twice
    assert [r["epoch"] for r in _log(run, "vqvae")] == [0, 1, 2]
    # Bit for bit in the development build (editable install). In a fresh non-editable build
    # (.ci/run) the resumed prior differs from the uninterrupted one by up to 8e-6 on weights
    # of size ~3 after its two epochs (2026-12-02; the VQ-VAE stays bitwise equal); the cause
    # is not found yet (noted for the next session). A resume that lost the RNG, the optimiser
    # state or an epoch moves the weights by far more than the tolerance below.
    for name, atol in (("vqvae.safetensors", 0.0), ("prior.safetensors", 1e-4)):
        a, b = load_weights(ddp / name), load_weights(run / name)
        assert a.keys() == b.keys(), name
        worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        assert worst <= atol, (name, worst)
    ca, cb = (json.loads((r / "config.json").read_text()) for r in (run, ddp))
    assert ca.keys() == cb.keys() and all(
        ca[sec] == cb[sec] for sec in ca if sec != "detect"), "config.json differs outside detect"
    for k, v in cb["detect"].items():
        if isinstance(v, float):
            assert ca["detect"][k] == pytest.approx(v, rel=1e-3, abs=1e-6), k
        else:
            assert ca["detect"][k] == v, k


DRIFT_SCRIPT = """
import json
import sys

import torch

import lsr.distributed as d

ctx = d.context("cpu")
out = {}
for case in ("none", "nudge", "one_ulp", "buffer", "swap", "offsetting", "negative_zero"):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    m.register_buffer("counts", torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with torch.no_grad():
        m.weight[0, 1] = 0.0
        if ctx.rank == 1:
            w = m.weight
            if case == "nudge":
                w[1, 1] += 1e-3
            elif case == "one_ulp":
                w[1, 1] = torch.nextafter(w[1, 1], torch.tensor(2.0))
            elif case == "buffer":
                m.counts[2] = 3.5
            elif case == "swap":                       # the same values in another order
                m.counts[0], m.counts[1] = 2.0, 1.0
            elif case == "offsetting":                 # +0.5 and -0.5: the same sum
                m.counts[0], m.counts[1] = 1.5, 1.5
            elif case == "negative_zero":              # -0.0 and 0.0 differ in their sign bit
                w[0, 1] = -0.0
    try:
        d.assert_in_sync(m, case)
        out[case] = "in sync"
    except RuntimeError as e:
        out[case] = str(e)
if ctx.rank == 0:
    print("RESULT " + json.dumps(out))
d.shutdown()
"""


@pytest.fixture(scope="module")
def drift(tmp_path_factory):
    """assert_in_sync's verdict, per case of a difference between rank 1 and rank 0."""
    script = tmp_path_factory.mktemp("drift") / "drift.py"
    script.write_text(DRIFT_SCRIPT)
    p = torchrun_script(script, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_assert_in_sync_raises_when_ranks_drift(drift):
    assert drift["none"] == "in sync"
    for case, name in (("nudge", "weight"), ("one_ulp", "weight"), ("buffer", "counts")):
        assert drift[case].startswith(f"ranks out of sync at {case}: rank 1 differs from rank 0"), case
        assert name in drift[case], case


@pytest.mark.parametrize("case", ["swap", "offsetting", "negative_zero"])
def test_assert_in_sync_sees_differences_that_keep_the_sum(drift, case):
    """Bit for bit, as its docstring says (it compared one float64 sum per tensor before:
    these three cases passed unseen, issue 18)."""
    assert drift[case] != "in sync"


def test_a_failing_rank_stops_the_job_and_names_the_file(two_runs, tiny_dataset, tmp_path):
    """One rank fails (a truncated image only it reads): the job stops, names the file and
    writes no metrics. No timing is asserted: the collective timeout is set far beyond the
    subprocess's, so the job can end only by the failure being passed on (torchrun
    tearing down the other rank), never by a collective timing out; a hang fails the test."""
    import shutil

    single, _, _ = two_runs
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    bad = sorted((data / "test" / "good").glob("*.png"))[-1]
    bad.write_bytes(bad.read_bytes()[:200])                    # truncated: only one rank reads it
    try:
        p = torchrun("eval", single, data, "--out", tmp_path / "out", "--batch-size", "2",
                     env={"LSR_DIST_TIMEOUT": "3600"}, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the job hung after one rank failed")
    assert p.returncode != 0
    assert bad.name in p.stderr and "truncated" in p.stderr
    assert "ChildFailedError" in p.stderr                      # torchrun stopped the job for a failed worker
    assert "timed out" not in p.stderr.lower() and "timeout" not in p.stderr.lower()
    assert not (tmp_path / "out" / "metrics.json").exists()
