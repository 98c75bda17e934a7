"""``LSR_CUDA_KERNELS`` (lsr/ops/__init__.py): the first-use check of the CUDA kernels
against their references, on the CPU.

A CUDA device is faked by replacing the seams of the dispatch: ``ops._is_cuda`` (is this
tensor on CUDA?), ``ops._device_key`` (which device a verdict is kept for) and
``ops._native_op`` (the native callables), with fake kernels that are correct, wrong,
wrong in the backward only, or raise. The extension is not needed (``native_available``
is faked too), except in the test that runs the real CPU kernels through the checks.
"""
import threading
import time
import warnings

import pytest
import torch

import lsr.ops as ops
from lsr.ops.reference import causal_attention_rows as reference_attention_rows
from lsr.ops import reference as R

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = "LSR_CUDA_KERNELS"


# ---------------------------------------------------------------- fakes


def _wrong_vq(z, e):
    return (R.vq_nearest(z, e) + 1) % e.shape[0]


def _wrong_attention(q, k, v):
    return R.causal_attention(q, k, v) + 0.01


def _wrong_rows(q, k, v, q0):
    return reference_attention_rows(q, k, v, q0) * 1.5


class _WrongGrad(torch.autograd.Function):
    """The right forward, gradients twice too large."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return R.causal_attention(q, k, v)

    @staticmethod
    def backward(ctx, g):
        xs = [x.detach().requires_grad_(True) for x in ctx.saved_tensors]
        with torch.enable_grad():
            grads = torch.autograd.grad(R.causal_attention(*xs), xs, g)
        return tuple(2 * x for x in grads)


def _raises(*args):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


CORRECT = {"vq_nearest": R.vq_nearest, "causal_attention": R.causal_attention,
           "causal_attention_rows": reference_attention_rows}


class Kernels:
    """Fake native callables that record every call (the shape of its first argument)."""

    def __init__(self, **impl):
        self.impl = {**CORRECT, **impl}
        self.calls = {name: [] for name in self.impl}

    def __call__(self, name):
        def kernel(*args):
            self.calls[name].append(tuple(args[0].shape))
            return self.impl[name](*args)
        return kernel

    def user_calls(self, name, shape):
        return sum(1 for s in self.calls[name] if s == tuple(shape))


@pytest.fixture
def device():
    """The faked device of every tensor: ``device["key"] = "cuda:1"`` moves them."""
    return {"key": "cuda:0"}


@pytest.fixture
def fake_cuda(monkeypatch, device):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(ops, "native_available", lambda: True)
    monkeypatch.setattr(ops, "_is_cuda", lambda t: True)
    monkeypatch.setattr(ops, "_device_key", lambda t: device["key"])
    ops.reset_cuda_kernel_checks()
    yield
    ops.reset_cuda_kernel_checks()


def use(monkeypatch, kernels: Kernels) -> Kernels:
    monkeypatch.setattr(ops, "_native_op", kernels)
    return kernels


def vq_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(37, 8, generator=g), torch.randn(11, 8, generator=g)


def attention_inputs(T=20, d=8, grad=False):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 2, T, d, generator=g).requires_grad_(grad) for _ in range(3)]


def lsr_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "lsr::" in str(w.message)]


# ---------------------------------------------------------------- (a) a mismatch: one warning, the reference


def test_mismatching_vq_kernel_warns_once_and_uses_the_reference(fake_cuda, monkeypatch):
    k = use(monkeypatch, Kernels(vq_nearest=_wrong_vq))
    z, e = vq_inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        results = [ops.vq_nearest(z, e) for _ in range(4)]
    ws = lsr_warnings(record)
    assert len(ws) == 1, [str(w.message) for w in ws]
    msg = str(ws[0].message)
    for part in ("lsr::vq_nearest", "cuda:0", "does not match", "max difference", "LSR_CUDA_KERNELS=on",
                 "LSR_CUDA_KERNELS=off"):
        assert part in msg, (part, msg)
    want = R.vq_nearest(z, e)
    assert all(torch.equal(r, want) for r in results)
    assert k.user_calls("vq_nearest", z.shape) == 0           # the kernel ran on the check input only
    assert len(k.calls["vq_nearest"]) == 1
    v = ops.cuda_kernel_status()["devices"]["cuda:0"]["vq_nearest"]
    assert v["ok"] is False and v["max_diff"] > 0


def test_mismatching_attention_kernel_warns_once_and_uses_the_pytorch_path(fake_cuda, monkeypatch):
    k = use(monkeypatch, Kernels(causal_attention=_wrong_attention))
    q, kk, v = attention_inputs()
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        outs = [ops.causal_attention(q, kk, v) for _ in range(3)]
    ws = lsr_warnings(record)
    assert len(ws) == 1
    msg = str(ws[0].message)
    assert "lsr::causal_attention_fwd" in msg and "cuda:0" in msg and "max abs difference" in msg
    assert "0.01" in msg                                      # the size of the fake's error
    want = R.causal_attention_sdpa(q, kk, v)                 # the auto backend's pure-PyTorch path
    assert all(torch.equal(o, want) for o in outs)
    assert k.user_calls("causal_attention", q.shape) == 0
    st = ops.cuda_kernel_status()["devices"]["cuda:0"]
    assert st["causal_attention_fwd"]["ok"] is False
    assert abs(st["causal_attention_fwd"]["max_diff"] - 0.01) < 1e-5
    with ops.backend("reference"), torch.no_grad():           # the other paths are unchanged
        assert torch.equal(ops.causal_attention(q, kk, v), R.causal_attention(q, kk, v))


def test_mismatching_rows_kernel_warns_once_and_uses_the_reference(fake_cuda, monkeypatch):
    k = use(monkeypatch, Kernels(causal_attention_rows=_wrong_rows))
    q, kk, v = attention_inputs(T=30)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outs = [ops.causal_attention_rows(q[:, :, 10:], kk, v, 10) for _ in range(3)]
    ws = lsr_warnings(record)
    assert len(ws) == 1 and "lsr::causal_attention_rows" in str(ws[0].message)
    want = reference_attention_rows(q[:, :, 10:], kk, v, 10)
    assert all(torch.equal(o, want) for o in outs)
    assert k.user_calls("causal_attention_rows", (2, 2, 20, 8)) == 0


def test_mismatching_backward_only_affects_calls_that_need_gradients(fake_cuda, monkeypatch):
    k = use(monkeypatch, Kernels(causal_attention=_WrongGrad.apply))
    q, kk, v = attention_inputs(grad=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():                                 # inference: the forward is right
            ops.causal_attention(q, kk, v)
        assert k.user_calls("causal_attention", q.shape) == 1
        for _ in range(2):
            out = ops.causal_attention(q, kk, v)
            grads = torch.autograd.grad(out.sum(), (q, kk, v))
        with torch.no_grad():
            ops.causal_attention(q, kk, v)
    ws = lsr_warnings(record)
    assert len(ws) == 1 and "lsr::causal_attention_bwd" in str(ws[0].message), [str(w.message) for w in ws]
    assert k.user_calls("causal_attention", q.shape) == 2     # the two no-grad calls only
    want = torch.autograd.grad(R.causal_attention_sdpa(q, kk, v).sum(), (q, kk, v))
    assert all(torch.equal(a, b) for a, b in zip(grads, want))
    st = ops.cuda_kernel_status()["devices"]["cuda:0"]
    assert st["causal_attention_fwd"]["ok"] is True and st["causal_attention_bwd"]["ok"] is False


# ---------------------------------------------------------------- (b) a correct kernel: used, no warning


def test_correct_kernels_pass_silently_and_are_used(fake_cuda, monkeypatch):
    k = use(monkeypatch, Kernels())
    z, e = vq_inputs()
    q, kk, v = attention_inputs(T=30, grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert torch.equal(ops.vq_nearest(z, e), R.vq_nearest(z, e))
            out = ops.causal_attention(q, kk, v)
            torch.autograd.grad(out.sum(), (q, kk, v))
            ops.causal_attention_rows(q[:, :, 10:].detach(), kk.detach(), v.detach(), 10)
    assert k.user_calls("vq_nearest", z.shape) == 3
    assert k.user_calls("causal_attention", q.shape) == 3
    assert k.user_calls("causal_attention_rows", (2, 2, 20, 8)) == 3
    st = ops.cuda_kernel_status()
    assert st["mode"] == "verify"
    assert {n: r["ok"] for n, r in st["devices"]["cuda:0"].items()} == {n: True for n in ops.CUDA_KERNELS}
    assert all(r["max_diff"] < 1e-5 for r in st["devices"]["cuda:0"].values())


def test_the_real_cpu_kernels_pass_the_checks(fake_cuda, monkeypatch):
    """The checks with the real native kernels (the CPU ones, the extension loaded): the
    calling convention of each (the backward through the registered autograd) and the
    tolerance against correct float32 kernels."""
    monkeypatch.undo()                                        # the real native_available and _native_op
    if not ops.native_available():
        pytest.skip("the native extension lsr._C is not built")
    monkeypatch.setattr(ops, "_is_cuda", lambda t: True)
    ops.reset_cuda_kernel_checks()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = ops.verify_cuda_kernels("cpu")
    assert set(res) == set(ops.CUDA_KERNELS)
    for name, r in res.items():
        assert r["ok"], (name, r)
        assert r["max_diff"] < ops.CHECK_ATOL / 10, (name, r)   # a wide margin below the tolerance


# ---------------------------------------------------------------- (c) off, (d) on


def test_off_never_calls_the_cuda_kernels(fake_cuda, monkeypatch):
    monkeypatch.setenv(ENV, "off")
    k = use(monkeypatch, Kernels())
    z, e = vq_inputs()
    q, kk, v = attention_inputs(grad=True)
    assert torch.equal(ops.vq_nearest(z, e), R.vq_nearest(z, e))
    out = ops.causal_attention(q, kk, v)
    assert torch.equal(out, R.causal_attention_sdpa(q, kk, v))
    rows = ops.causal_attention_rows(q[:, :, 5:], kk, v, 5)
    assert torch.equal(rows, reference_attention_rows(q[:, :, 5:], kk, v, 5))
    assert all(c == [] for c in k.calls.values())
    st = ops.cuda_kernel_status()
    assert st == {"mode": "off", "devices": {}}


def test_on_uses_the_kernels_without_a_check(fake_cuda, monkeypatch):
    monkeypatch.setenv(ENV, " ON ")                           # case and spaces do not matter
    k = use(monkeypatch, Kernels(vq_nearest=_wrong_vq, causal_attention=_wrong_attention))
    z, e = vq_inputs()
    q, kk, v = attention_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ops.vq_nearest(z, e), _wrong_vq(z, e))
        assert torch.equal(ops.causal_attention(q, kk, v), _wrong_attention(q, kk, v))
    assert k.calls["vq_nearest"] == [tuple(z.shape)] and k.calls["causal_attention"] == [tuple(q.shape)]
    assert ops.cuda_kernel_status() == {"mode": "on", "devices": {}}


# ---------------------------------------------------------------- (e) a kernel that raises


def test_a_kernel_that_raises_warns_once_and_uses_the_reference(fake_cuda, monkeypatch):
    use(monkeypatch, Kernels(vq_nearest=_raises, causal_attention=_raises))
    z, e = vq_inputs()
    q, kk, v = attention_inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            assert torch.equal(ops.vq_nearest(z, e), R.vq_nearest(z, e))
            assert torch.equal(ops.causal_attention(q, kk, v), R.causal_attention_sdpa(q, kk, v))
    ws = lsr_warnings(record)
    assert len(ws) == 2, [str(w.message) for w in ws]
    for w, name in zip(ws, ("vq_nearest", "causal_attention_fwd")):
        msg = str(w.message)
        assert f"lsr::{name}" in msg and "raised an error" in msg and "illegal memory access" in msg
        assert "cuda:0" in msg and ENV in msg
    v0 = ops.cuda_kernel_status()["devices"]["cuda:0"]["vq_nearest"]
    assert v0["ok"] is False and v0["max_diff"] is None and "RuntimeError" in v0["detail"]


# ---------------------------------------------------------------- (f) a bad value


@pytest.mark.parametrize("value", ["verfy", "1", "true", "auto"])
def test_bad_value_is_a_clear_error(fake_cuda, monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    use(monkeypatch, Kernels())
    z, e = vq_inputs()
    with pytest.raises(ValueError, match=ENV) as err:
        ops.vq_nearest(z, e)
    for mode in ("off", "on", "verify", repr(value)):
        assert mode in str(err.value)
    with pytest.raises(ValueError, match=ENV):
        ops.cuda_kernels_mode()


def test_the_commands_refuse_a_bad_value_before_any_work(monkeypatch, tmp_path, capsys):
    """``lsr`` and ``lsr-export`` read the variable first: a bad value is exit 2 naming it,
    on a CPU-only machine too, and nothing is written (not a failure deep into a training
    at the first CUDA op)."""
    from lsr.cli import export_main, main

    monkeypatch.setenv(ENV, "yes")
    ops.reset_cuda_kernel_checks()
    try:
        (tmp_path / "data" / "train" / "good").mkdir(parents=True)
        assert main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
        assert export_main([str(tmp_path / "run"), "--format", "onnx", "--out", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err
        assert err.count(f"{ENV} must be one of") == 2 and "'yes'" in err
        assert not (tmp_path / "run").exists() and not (tmp_path / "b").exists()
    finally:
        monkeypatch.delenv(ENV)
        ops.reset_cuda_kernel_checks()


def test_empty_value_is_the_default(fake_cuda, monkeypatch):
    monkeypatch.setenv(ENV, "")
    assert ops.cuda_kernels_mode() == "verify"


def test_cpu_tensors_are_unaffected(monkeypatch):
    """Not on CUDA: the native (CPU) kernel is called, with no check, whatever the variable."""
    monkeypatch.setattr(ops, "native_available", lambda: True)
    k = use(monkeypatch, Kernels(vq_nearest=_wrong_vq))
    ops.reset_cuda_kernel_checks()
    z, e = vq_inputs()
    for value in ("verify", "off", "nonsense"):
        monkeypatch.setenv(ENV, value)
        ops.reset_cuda_kernel_checks()
        assert torch.equal(ops.vq_nearest(z, e), _wrong_vq(z, e))
    assert k.calls["vq_nearest"] == [tuple(z.shape)] * 3
    monkeypatch.setenv(ENV, "verify")
    assert ops.cuda_kernel_status()["devices"] == {}
    ops.reset_cuda_kernel_checks()


# ---------------------------------------------------------------- (g) one check per kernel and device


def test_the_verdict_is_cached_per_kernel_and_device(fake_cuda, monkeypatch, device):
    def wrong_on_cuda1(z, e):
        return _wrong_vq(z, e) if device["key"] == "cuda:1" else R.vq_nearest(z, e)

    k = use(monkeypatch, Kernels(vq_nearest=wrong_on_cuda1))
    runs = {n: 0 for n in ops.CUDA_KERNELS}
    for name, check in list(ops._CHECKS.items()):
        def counted(dev, check=check, name=name):
            runs[name] += 1
            return check(dev)
        monkeypatch.setitem(ops._CHECKS, name, counted)
    z, e = vq_inputs()
    q, kk, v = attention_inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            ops.vq_nearest(z, e)
        assert runs == {"vq_nearest": 1, "causal_attention_fwd": 0, "causal_attention_bwd": 0,
                        "causal_attention_rows": 0}
        with torch.no_grad():
            ops.causal_attention(q, kk, v)
            ops.causal_attention(q, kk, v)
        assert runs["causal_attention_fwd"] == 1 and runs["causal_attention_bwd"] == 0
        device["key"] = "cuda:1"
        for _ in range(3):
            assert torch.equal(ops.vq_nearest(z, e), R.vq_nearest(z, e))
        device["key"] = "cuda:0"
        ops.vq_nearest(z, e)
    assert runs["vq_nearest"] == 2
    ws = lsr_warnings(record)
    assert len(ws) == 1 and "cuda:1" in str(ws[0].message) and "cuda:0" not in str(ws[0].message)
    assert k.user_calls("vq_nearest", z.shape) == 4           # cuda:0 kept its kernel
    st = ops.cuda_kernel_status()["devices"]
    assert st["cuda:0"]["vq_nearest"]["ok"] is True and st["cuda:1"]["vq_nearest"]["ok"] is False
    assert set(st["cuda:1"]) == {"vq_nearest"}


def test_the_check_runs_once_under_concurrent_first_use(fake_cuda, monkeypatch):
    use(monkeypatch, Kernels(vq_nearest=_wrong_vq))
    runs = []
    check = ops._CHECKS["vq_nearest"]

    def slow(dev):
        runs.append(1)
        time.sleep(0.05)
        return check(dev)

    monkeypatch.setitem(ops._CHECKS, "vq_nearest", slow)
    z, e = vq_inputs()
    results = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=lambda: results.append(ops.vq_nearest(z, e))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(runs) == 1 and len(results) == 4
    assert all(torch.equal(r, R.vq_nearest(z, e)) for r in results)
    assert len(lsr_warnings(record)) == 1


def test_reset_forgets_the_verdicts_and_rereads_the_variable(fake_cuda, monkeypatch):
    use(monkeypatch, Kernels())
    z, e = vq_inputs()
    ops.vq_nearest(z, e)
    assert "vq_nearest" in ops.cuda_kernel_status()["devices"]["cuda:0"]
    monkeypatch.setenv(ENV, "off")
    assert ops.cuda_kernels_mode() == "verify"                # read once
    ops.reset_cuda_kernel_checks()
    assert ops.cuda_kernel_status() == {"mode": "off", "devices": {}}


# ---------------------------------------------------------------- what is not checked, or cannot be now


def test_backend_native_uses_the_kernel_as_it_is(fake_cuda, monkeypatch):
    k = use(monkeypatch, Kernels(vq_nearest=_wrong_vq))
    z, e = vq_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ops.backend("native"):
            assert torch.equal(ops.vq_nearest(z, e), _wrong_vq(z, e))
        with ops.backend("reference"):
            assert torch.equal(ops.vq_nearest(z, e), R.vq_nearest(z, e))
    assert k.calls["vq_nearest"] == [tuple(z.shape)]
    assert ops.cuda_kernel_status()["devices"] == {}


def test_no_check_during_cuda_graph_capture_and_no_verdict_kept(fake_cuda, monkeypatch):
    k = use(monkeypatch, Kernels())
    monkeypatch.setattr(ops, "_capturing", lambda dev: True)
    z, e = vq_inputs()
    assert torch.equal(ops.vq_nearest(z, e), R.vq_nearest(z, e))
    assert k.calls["vq_nearest"] == [] and ops.cuda_kernel_status()["devices"] == {}
    monkeypatch.setattr(ops, "_capturing", lambda dev: False)
    ops.vq_nearest(z, e)
    assert k.user_calls("vq_nearest", z.shape) == 1
    assert ops.cuda_kernel_status()["devices"]["cuda:0"]["vq_nearest"]["ok"] is True


def test_a_warning_turned_into_an_error_still_keeps_the_verdict(fake_cuda, monkeypatch):
    use(monkeypatch, Kernels(vq_nearest=_wrong_vq))
    z, e = vq_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="lsr::vq_nearest"):
            ops.vq_nearest(z, e)
        assert torch.equal(ops.vq_nearest(z, e), R.vq_nearest(z, e))    # no second warning


def test_verify_cuda_kernels_runs_every_check(fake_cuda, monkeypatch):
    use(monkeypatch, Kernels(causal_attention_rows=_wrong_rows))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = ops.verify_cuda_kernels("cpu")
    assert {n: r["ok"] for n, r in res.items()} == {"vq_nearest": True, "causal_attention_fwd": True,
                                                    "causal_attention_bwd": True, "causal_attention_rows": False}
    assert len(lsr_warnings(record)) == 1
    monkeypatch.setattr(ops, "_is_cuda", lambda t: False)
    with pytest.raises(ValueError, match="CUDA device"):
        ops.verify_cuda_kernels("cpu")


def test_cuda_kernels_allowed_for_code_outside_the_dispatch(fake_cuda, monkeypatch):
    use(monkeypatch, Kernels(causal_attention_rows=_wrong_rows))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ops.cuda_kernels_allowed("cpu", ["vq_nearest", "causal_attention_fwd"])
        assert not ops.cuda_kernels_allowed("cpu", ["causal_attention_fwd", "causal_attention_rows"])
        assert not ops.cuda_kernels_allowed("cpu")
    monkeypatch.setattr(ops, "_is_cuda", lambda t: False)        # not on CUDA: the CPU kernels
    assert ops.cuda_kernels_allowed("cpu")
    monkeypatch.setattr(ops, "native_available", lambda: False)
    assert not ops.cuda_kernels_allowed("cpu")


# ---------------------------------------------------------------- the native resampling loop


def _tiny_prior():
    from lsr.config import preset
    from lsr.models import PixelSNAIL

    torch.manual_seed(0)
    return PixelSNAIL(preset("tiny", in_channels=1).prior).eval()


@pytest.mark.parametrize("wrong", ["causal_attention", "causal_attention_rows", None])
def test_resampler_falls_back_to_fast_when_its_kernels_fail(fake_cuda, monkeypatch, wrong):
    bad = {"causal_attention": _wrong_attention, "causal_attention_rows": _wrong_rows}
    use(monkeypatch, Kernels(**({wrong: bad[wrong]} if wrong else {})))
    prior = _tiny_prior()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        auto = ops.resolve_resampler("auto", prior)
        native = ops.resolve_resampler("native", prior)
    expected = "fast" if wrong else "native"
    assert auto == native == expected
    assert len(lsr_warnings(record)) == (1 if wrong else 0)
    assert ops.resolve_resampler("naive", prior) == "naive"
    monkeypatch.setenv(ENV, "off")
    ops.reset_cuda_kernel_checks()
    assert ops.resolve_resampler("auto", prior) == "fast"


def test_resample_runs_the_fast_loop_when_the_kernels_fail(fake_cuda, monkeypatch):
    use(monkeypatch, Kernels(causal_attention_rows=_wrong_rows))

    def boom(*a, **k):
        raise AssertionError("the native loop must not run")

    monkeypatch.setattr(ops, "resample_native", boom)
    prior = _tiny_prior()
    G, K = prior.cfg.grid_size, prior.cfg.codebook_size
    codes = torch.randint(0, K, (1, G, G), generator=torch.Generator().manual_seed(3))
    noise = ops.gumbel_noise(1, G * G, K, [5])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ops.resample(prior, codes, noise, 0.05, method="native")
        want = ops.resample_fast(prior, codes, noise, 0.05)
    assert torch.equal(got.codes, want.codes)
