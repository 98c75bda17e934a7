"""Training's edges: an interruption in the VQ-VAE stage and between the prior's end and
the final writes (resume gives the run an uninterrupted training gives, bit for bit),
``train --overwrite`` of a stale run, the time cap (train.max_minutes) and early stopping
(train.patience) on the held-out NLL."""
import json

import pytest
import torch

import lsr
import lsr.training as T
from conftest import interrupt_training_in_prior_epoch_1
from lsr.checkpoint import load_weights
from lsr.cli import main

pytestmark = pytest.mark.slow

OVERRIDES = {"train.prior_epochs": 3, "train.vqvae_epochs": 2}
quiet = {"progress": False, "log": lambda *_: None}


def config(**extra):
    return lsr.preset("tiny", in_channels=1).with_overrides({**OVERRIDES, **extra})


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """The uninterrupted training of ``config()``."""
    return lsr.train(tiny_dataset, tmp_path_factory.mktemp("ref") / "run", config(), **quiet).run


def epochs(run, stage):
    """The epochs a stage logged (warning lines carry no epoch)."""
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r["epoch"] for r in rows if r["stage"] == stage and "epoch" in r]


def assert_same_run(a, b, vqvae_epochs=(0, 1), prior_epochs=(0, 1, 2)):
    """Two finished runs with the same weights (bitwise), config.json (tau, held-out
    statistics, thresholds) and calibration, each epoch logged once."""
    for name in ("vqvae.safetensors", "prior.safetensors"):
        x, y = load_weights(a / name), load_weights(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    ca, cb = (json.loads((r / "calibration.json").read_text()) for r in (a, b))
    for key in ("tau", "val_nll", "held_out_scores", "thresholds", "val_flagged_per_image_mean"):
        assert ca[key] == cb[key], key
    assert json.loads((b / "lsr_run.json").read_text())["finished"] is True
    assert epochs(b, "vqvae") == list(vqvae_epochs) and epochs(b, "prior") == list(prior_epochs)
    lsr.Detector.load(b, "cpu")                                   # and it loads


def interrupt(monkeypatch, target, name, data, out, cfg, when=lambda *a, **k: True, at_call=1):
    """``lsr.train`` stopped with KeyboardInterrupt (a user's Ctrl-C) at the at_call-th call
    of ``target.name`` for which ``when(*args)`` holds."""
    real = getattr(target, name)
    calls = {"n": 0}

    def flaky(*a, **k):
        if when(*a, **k):
            calls["n"] += 1
            if calls["n"] == at_call:
                raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(target, name, flaky)
    with pytest.raises(KeyboardInterrupt):
        lsr.train(data, out, cfg, **quiet)
    monkeypatch.setattr(target, name, real)
    assert calls["n"] == at_call


def test_interrupted_in_the_vqvae_stage_resumes_to_the_same_run(reference, tiny_dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    # the end of the VQ-VAE's epoch 1 (its held-out metrics), before epoch 1 is checkpointed
    interrupt(monkeypatch, T, "vqvae_val_metrics", tiny_dataset, run, config(), at_call=2)
    state = json.loads((run / "checkpoints" / "vqvae_state.json").read_text())["info"]
    assert state["epoch"] == 0 and state["done"] is False
    assert not (run / "vqvae.safetensors").exists() and not (run / "checkpoints" / "prior_state.json").exists()
    lsr.train(tiny_dataset, run, config(), **quiet)
    assert_same_run(reference, run)


def _config_json(path, *a, **k):
    return getattr(path, "name", "") == "config.json"


FINAL_STEPS = {
    # (module, attribute, which calls count)
    "calibrate": (T, "calibrate", None),                        # tau from the held-out codes
    "score_stats": (lsr.detect, "score_stats", None),           # held-out scores and thresholds
    "config.json": (T, "write_json", _config_json),             # prior.safetensors, calibration.json written
    "manifest": (lsr.runfolder, "finish", None),                # config.json written, weights not hashed
}


@pytest.mark.parametrize("step", list(FINAL_STEPS))
def test_interrupted_after_the_prior_resumes_to_the_same_run(reference, tiny_dataset, tmp_path, monkeypatch, step):
    """Stopped after the prior's last epoch, before (or during) the final writes: the
    resumed training trains nothing again and writes the run the uninterrupted one wrote."""
    target, name, when = FINAL_STEPS[step]
    run = tmp_path / "run"
    interrupt(monkeypatch, target, name, tiny_dataset, run, config(), **({"when": when} if when else {}))
    assert json.loads((run / "checkpoints" / "prior_state.json").read_text())["info"]["done"] is True
    assert json.loads((run / "lsr_run.json").read_text())["finished"] is False
    with pytest.raises(ValueError, match="training did not finish"):
        lsr.Detector.load(run, "cpu")                           # an unfinished run is refused, tau or not
    lsr.train(tiny_dataset, run, config(), **quiet)
    assert_same_run(reference, run)                             # epochs logged once: nothing retrained


def test_overwrite_replaces_a_stale_run_with_a_fresh_training(tiny_dataset, tmp_path, monkeypatch, capsys):
    """`lsr train --overwrite` into a folder holding another run's unfinished training
    (another seed, checkpoints of both stages on disk) trains afresh: the result equals a
    training into an empty folder, bit for bit; nothing of the stale run is left or resumed;
    a file of the user's stays."""
    args = ["--preset", "tiny", "--set", "train.vqvae_epochs=1", "--set", "train.prior_epochs=2", "--no-progress"]
    assert main(["train", str(tiny_dataset), "--out", str(tmp_path / "fresh"), *args]) == 0
    stale = tmp_path / "stale"
    stale_cfg = lsr.preset("tiny", in_channels=1).with_overrides(
        {"train.seed": 99, "train.vqvae_epochs": 1, "train.prior_epochs": 2})
    interrupt_training_in_prior_epoch_1(monkeypatch, tiny_dataset, stale, stale_cfg)
    for stage in ("vqvae", "prior"):
        assert (stale / "checkpoints" / f"{stage}_state.json").is_file()
    (stale / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["train", str(tiny_dataset), "--out", str(stale), *args]) == 2        # refused without it
    assert "different configuration" in capsys.readouterr().err
    assert main(["train", str(tiny_dataset), "--out", str(stale), *args, "--overwrite"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert_same_run(tmp_path / "fresh", stale, vqvae_epochs=[0], prior_epochs=[0, 1])
    assert json.loads((stale / "config.json").read_text())["train"]["seed"] == 0
    assert sorted(p.name for p in (stale / "checkpoints").iterdir()) == \
        sorted(p.name for p in (tmp_path / "fresh" / "checkpoints").iterdir())
    assert (stale / "notes.txt").read_text() == "mine"


def test_time_cap_stops_each_stage_at_its_first_epoch_end(tiny_dataset, tmp_path, capsys):
    """train.max_minutes is checked at the end of each epoch and per stage: a cap already
    passed after the first epoch stops each stage there (one epoch each, not zero), with a
    warning on stderr and in the log, and the run still finishes."""
    cfg = config(**{"train.max_minutes": 1e-9, "train.vqvae_epochs": 3, "train.prior_epochs": 3})
    res = lsr.train(tiny_dataset, tmp_path / "run", cfg, **quiet)
    assert epochs(res.run, "vqvae") == [0] and epochs(res.run, "prior") == [0]
    err = capsys.readouterr().err
    for stage in ("vqvae", "prior"):
        assert f"the {stage} stage hit train.max_minutes" in err
    warned = [json.loads(x)["stage"] for x in (res.run / "train_log.jsonl").read_text().splitlines()
              if "warning" in json.loads(x)]
    assert warned == ["vqvae", "prior"]
    assert 0 < res.tau < 1 and json.loads((res.run / "lsr_run.json").read_text())["finished"] is True
    uncapped = lsr.train(tiny_dataset, tmp_path / "uncapped",
                         config(**{"train.vqvae_epochs": 3, "train.prior_epochs": 3}), **quiet)
    assert epochs(uncapped.run, "vqvae") == [0, 1, 2] and "max_minutes" not in capsys.readouterr().err


def _scripted_nll(monkeypatch, nll):
    """The prior's held-out NLL at its epochs made ``nll`` (real after those); returns the
    list of the prior's weights at each of those epochs."""
    states = []
    real = T.prior_nll

    def scripted(prior, codes, device):
        if len(states) < len(nll):
            states.append({k: v.detach().clone() for k, v in prior.state_dict().items()})
            return nll[len(states) - 1]
        return real(prior, codes, device)

    monkeypatch.setattr(T, "prior_nll", scripted)
    return states


NLL = [1.0, 2.0, 0.9, 1.5, 1.6]
PATIENCE = {"train.vqvae_epochs": 1, "train.prior_epochs": 6, "train.patience": 2}


def test_early_stopping_after_patience_epochs_keeps_the_best_prior(tiny_dataset, tmp_path, monkeypatch):
    """The held-out NLL of the prior's epochs is made 1.0, 2.0, 0.9, 1.5, 1.6: with
    patience 2 training stops after epoch 4 (two epochs without a new best) of 6, and the
    saved prior is epoch 2's (the best), not the last one trained."""
    states = _scripted_nll(monkeypatch, NLL)
    res = lsr.train(tiny_dataset, tmp_path / "run", config(**PATIENCE), **quiet)
    log = [json.loads(x) for x in (res.run / "train_log.jsonl").read_text().splitlines()]
    prior_log = [r for r in log if r["stage"] == "prior"]
    assert [r["epoch"] for r in prior_log] == [0, 1, 2, 3, 4]
    assert [r["val_nll"] for r in prior_log] == NLL and prior_log[-1]["best_val_nll"] == 0.9
    info = json.loads((res.run / "checkpoints" / "prior_state.json").read_text())["info"]
    assert info["done"] is True and info["bad_epochs"] == 2
    saved = load_weights(res.run / "prior.safetensors")
    assert all(torch.equal(saved[k], states[2][k]) for k in saved)           # the best epoch's weights
    assert not all(torch.equal(saved[k], states[4][k]) for k in saved)       # not the last epoch's


def test_resume_after_early_stopping_keeps_the_best_prior(tiny_dataset, tmp_path, monkeypatch):
    """Interrupted after early stopping (before tau is calibrated) and resumed: the prior
    is still the best epoch's (2), not the last epoch's that the checkpoint holds (4)."""
    states = _scripted_nll(monkeypatch, NLL)
    run = tmp_path / "run"
    interrupt(monkeypatch, T, "calibrate", tiny_dataset, run, config(**PATIENCE))
    assert len(states) == len(NLL)
    lsr.train(tiny_dataset, run, config(**PATIENCE), **quiet)
    assert epochs(run, "prior") == [0, 1, 2, 3, 4]
    saved = load_weights(run / "prior.safetensors")
    assert all(torch.equal(saved[k], states[2][k]) for k in saved)


@pytest.mark.parametrize("how", [["--preset", "tiny"], []])
def test_lsr_train_lists_the_training_folder_once(tiny_dataset, tmp_path, monkeypatch, how):
    """`lsr train` reads train/good's listing once (the preset's channels and the training
    use the same list), with a preset or with the device's default."""
    calls = []
    real = T.scan_mvtec
    monkeypatch.setattr(T, "scan_mvtec", lambda *a, **k: calls.append(a) or real(*a, **k))
    tiny = ["--set", "train.vqvae_epochs=1", "--set", "train.prior_epochs=1"]
    if not how:                                      # the default preset, made tiny through --set
        monkeypatch.setattr(T, "preset", lambda name, in_channels=3: lsr.preset("tiny", in_channels))
    assert main(["train", str(tiny_dataset), "--out", str(tmp_path / "run"), "--no-progress", *how, *tiny]) == 0
    assert len(calls) == 1
