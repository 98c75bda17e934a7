import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Unit tests of small tensors run faster on one thread (and undisturbed by other jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small MVTec-layout category cut from the scikit-image photos (32 px)."""
    from lsr.demo_data import build_demo_dataset

    root = tmp_path_factory.mktemp("data")
    (folder,) = build_demo_dataset(root, categories=("grass",), image_size=32, n_train=14, n_test_good=4,
                                   n_test_per_defect=1, defects=("hole", "stain", "foreign"))
    return folder


def _train_tiny(data, tmp_path_factory, preset_name):
    import lsr

    out = tmp_path_factory.mktemp("run") / "grass"
    lsr.train(data, out, lsr.preset(preset_name, in_channels=1), device="cpu", progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tmp_path_factory):
    """A run trained with the tiny preset on ``tiny_dataset``."""
    return _train_tiny(tiny_dataset, tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_feature_run(tiny_dataset, tmp_path_factory):
    """A feature-space run (the tiny-features preset) on ``tiny_dataset``."""
    return _train_tiny(tiny_dataset, tmp_path_factory, "tiny-features")


def interrupt_training_in_prior_epoch_1(monkeypatch, data, out, cfg):
    """Run ``lsr.train`` and stop it with KeyboardInterrupt at the end of the prior's
    second epoch (epoch 0's checkpoint is on disk), as a user's Ctrl-C would."""
    import lsr
    import lsr.training as T

    calls = {"n": 0}
    real = T.prior_nll

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "prior_nll", flaky)
    with pytest.raises(KeyboardInterrupt):
        lsr.train(data, out, cfg, progress=False, log=lambda *_: None)
    monkeypatch.setattr(T, "prior_nll", real)
