"""Tests for lsr.checkpoint: safetensors weights round trip, clear errors naming the file
for missing, damaged or mismatched files, training-state resume (model, Adam moments,
torch.Generator) and atomic saves."""
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import lsr.checkpoint as ck
from lsr.config import preset
from lsr.models import VQVAE, PixelSNAIL

CFG = preset("tiny", in_channels=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def vqvae(seed=0, **overrides):
    torch.manual_seed(seed)
    return VQVAE(dataclasses.replace(CFG.vqvae, **overrides))


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------- weights


def test_weights_round_trip(tmp_path):
    src, dst = vqvae(0), vqvae(1)
    with torch.no_grad():
        src.quantizer.initialised.fill_(True)
        src.quantizer.unused_steps.fill_(3)                   # non-float buffers survive too
    path = tmp_path / "sub" / "vqvae.safetensors"
    ck.save_weights(path, src, {"note": "x"})
    state = ck.load_weights(path)
    assert state.keys() == src.state_dict().keys()
    ck.load_into(dst, path)
    assert_same_state(src, dst)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "lsr" and meta["format_version"] == str(ck.FORMAT_VERSION)
    assert meta["note"] == "x"
    assert [p.name for p in path.parent.iterdir()] == ["vqvae.safetensors"]    # no temp files left

    prior, prior2 = PixelSNAIL(CFG.prior), PixelSNAIL(CFG.prior)
    ck.save_weights(tmp_path / "prior.safetensors", prior)
    ck.load_into(prior2, tmp_path / "prior.safetensors")
    assert_same_state(prior, prior2)


def test_weights_dict_non_contiguous_round_trip(tmp_path):
    t = torch.arange(12.0).view(3, 4).t()                    # non-contiguous
    ck.save_weights(tmp_path / "d.safetensors", {"a": t, "b": torch.tensor([1, 2], dtype=torch.int64)})
    back = ck.load_weights(tmp_path / "d.safetensors")
    assert torch.equal(back["a"], t) and back["b"].dtype == torch.int64


def test_load_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        ck.load_weights(path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        ck.load_into(vqvae(), path)


def _corruptions(raw):
    n = int.from_bytes(raw[:8], "little")
    return {
        "garbage": bytes(range(256)) * 4,
        "empty": b"",
        "short": raw[:5],
        "header_cut": raw[:8 + n // 2],
        "data_half": raw[:len(raw) // 2],
        "last_byte_cut": raw[:-1],
        "header_json_broken": raw[:8] + b"{" * n + raw[8 + n:],
        "huge_length": (10 ** 12).to_bytes(8, "little") + raw[8:],
        "text": b"this is not a safetensors file\n" * 3,
    }


def test_load_corrupted_file_names_it(tmp_path):
    good = tmp_path / "good.safetensors"
    ck.save_weights(good, vqvae())
    raw = good.read_bytes()
    for name, data in _corruptions(raw).items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(ValueError) as e:
            ck.load_weights(path)
        assert str(path) in str(e.value), name
        with pytest.raises(ValueError) as e:
            ck.load_into(vqvae(), path)
        assert str(path) in str(e.value), name


def test_load_into_different_config_names_file(tmp_path):
    path = tmp_path / "vqvae.safetensors"
    ck.save_weights(path, vqvae())
    for other in (vqvae(codebook_size=32), vqvae(embed_dim=4), vqvae(n_res_blocks=2),
                  PixelSNAIL(CFG.prior)):
        with pytest.raises(ValueError, match="do not match") as e:
            ck.load_into(other, path)
        assert str(path) in str(e.value)


# ---------------------------------------------------------------- training state


def _train_steps(model, opt, g, n):
    model.train()
    for _ in range(n):
        x = torch.rand(2, 1, 32, 32, generator=g)               # the data order comes from g
        out = model(x)
        loss = F.mse_loss(out.reconstruction, x) + out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.quantizer.ema_update(out.z_e.detach(), out.indices, generator=g)


def test_training_state_round_trip_continues_identically(tmp_path):
    model = vqvae(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(123)
    _train_steps(model, opt, g, 3)
    info = {"epoch": 4, "done": False, "metrics": {"loss": 0.25, "nested": [1, 2]}}
    ck.save_training_state(tmp_path / "ckpt" / "state", model, opt, g, info)
    assert len(list((tmp_path / "ckpt").glob("state.*.safetensors"))) == 1
    assert (tmp_path / "ckpt" / "state.json").is_file()
    _train_steps(model, opt, g, 3)                               # uninterrupted run
    after_g = torch.rand(5, generator=g)

    model2 = vqvae(7)                                            # a different start everywhere
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    g2 = torch.Generator().manual_seed(999)
    got = ck.load_training_state(tmp_path / "ckpt" / "state", model2, opt2, g2)
    assert got == info
    assert len(opt2.state_dict()["state"]) == len(list(model2.parameters()))
    _train_steps(model2, opt2, g2, 3)                            # resumed run
    assert_same_state(model, model2)
    assert torch.equal(torch.rand(5, generator=g2), after_g)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for pid in s1["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s1["state"][pid][k], s2["state"][pid][k]), (pid, k)
    g1p = {k: v for k, v in s1["param_groups"][0].items() if k != "params"}
    g2p = {k: v for k, v in s2["param_groups"][0].items() if k != "params"}
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in g1p.items()} == \
        {k: list(v) if isinstance(v, tuple) else v for k, v in g2p.items()}


def test_training_state_restores_generator_alone(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    g = torch.Generator().manual_seed(5)
    torch.rand(17, generator=g)
    ck.save_training_state(tmp_path / "s", model, opt, g, {"epoch": 0})   # Adam without state yet
    expected = torch.randint(0, 1000, (10,), generator=g)
    g2 = torch.Generator().manual_seed(6)
    assert ck.load_training_state(tmp_path / "s", torch.nn.Linear(2, 2), torch.optim.Adam(model.parameters()),
                                  g2) == {"epoch": 0}
    assert torch.equal(torch.randint(0, 1000, (10,), generator=g2), expected)


def test_load_training_state_nothing_to_resume(tmp_path):
    model = torch.nn.Linear(2, 2)
    assert ck.load_training_state(tmp_path / "none", model, torch.optim.Adam(model.parameters()),
                                  torch.Generator()) is None


# ---------------------------------------------------------------- atomic saves


def _failing_save_file(calls):
    real = ck.save_file

    def fake(tensors, filename, metadata=None):
        calls.append(filename)
        real(tensors, filename, metadata=metadata)               # write it all ...
        with open(filename, "r+b") as f:                         # ... then leave it half-written
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("No space left on device (simulated)")

    return fake


def test_failed_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "vqvae.safetensors"
    old = vqvae(0)
    ck.save_weights(path, old)
    before = path.read_bytes()
    calls = []
    monkeypatch.setattr(ck, "save_file", _failing_save_file(calls))
    with pytest.raises(OSError, match="simulated"):
        ck.save_weights(path, vqvae(1))
    assert calls and calls[0] != str(path)                       # it wrote elsewhere, not over the file
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vqvae.safetensors"]
    monkeypatch.undo()
    fresh = vqvae(3)
    ck.load_into(fresh, path)
    assert_same_state(old, fresh)


def test_failed_training_state_save_keeps_previous_state(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    opt.zero_grad()
    model(torch.ones(4, 3)).pow(2).sum().backward()
    opt.step()
    ck.save_training_state(tmp_path / "state", model, opt, g, {"epoch": 1})
    w1 = model.weight.detach().clone()
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(ck, "save_file", _failing_save_file([]))
    with pytest.raises(OSError):
        ck.save_training_state(tmp_path / "state", model, opt, g, {"epoch": 2})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    monkeypatch.undo()
    m2 = torch.nn.Linear(3, 2)
    info = ck.load_training_state(tmp_path / "state", m2, torch.optim.Adam(m2.parameters()),
                                  torch.Generator())
    assert info == {"epoch": 1} and torch.equal(m2.weight, w1)


def test_crash_between_tensor_and_json_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A crash after the new tensor file is written but before the JSON commit point:
    what loads is the last good checkpoint (epoch 1) in full, weights, Adam moments and
    RNG state, never nothing, an error or a mix of the two epochs."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad()
        model(torch.ones(4, 3)).pow(2).sum().backward()
        opt.step()

    step()
    ck.save_training_state(tmp_path / "state", model, opt, g, {"epoch": 1})
    w1 = model.weight.detach().clone()
    m1 = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    rng1 = g.get_state().clone()
    torch.rand(5, generator=g)                                  # the RNG moves on too
    step()
    w2 = model.weight.detach().clone()
    assert not torch.equal(w1, w2)

    def crash(*a, **k):
        raise OSError("killed between the two writes (simulated)")

    monkeypatch.setattr(ck, "write_json", crash)
    with pytest.raises(OSError):
        ck.save_training_state(tmp_path / "state", model, opt, g, {"epoch": 2})
    monkeypatch.undo()

    m2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    g2 = torch.Generator().manual_seed(123)
    info = ck.load_training_state(tmp_path / "state", m2, opt2, g2)
    assert info == {"epoch": 1}
    assert torch.equal(m2.weight, w1)
    state = opt2.state_dict()["state"][0]
    assert state.keys() == m1.keys() and all(torch.equal(torch.as_tensor(state[k]), torch.as_tensor(m1[k]))
                                             for k in m1)
    assert torch.equal(g2.get_state(), rng1)
    # and training goes on from it: the next save commits and the stray tensor file is gone
    ck.save_training_state(tmp_path / "state", m2, opt2, g2, {"epoch": 2})
    tensors = sorted(p.name for p in tmp_path.glob("state.*.safetensors"))
    assert len(tensors) == 1, tensors
    m3 = torch.nn.Linear(3, 2)
    assert ck.load_training_state(tmp_path / "state", m3, torch.optim.Adam(m3.parameters()),
                                  torch.Generator()) == {"epoch": 2}
