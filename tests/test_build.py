"""The installed package has its native extension (CI sets LSR_REQUIRE_NATIVE=1, so that
the native-op tests cannot pass by being skipped)."""
import os

import pytest
import torch

import lsr.ops as ops


@pytest.mark.skipif(os.environ.get("LSR_REQUIRE_NATIVE") != "1", reason="LSR_REQUIRE_NATIVE is not set")
def test_native_extension_is_built_and_used():
    assert ops.native_available(), "lsr._C did not load: " + ops._native_error
    for name in ("vq_nearest", "causal_attention_fwd", "causal_attention_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lsr::{name}", "CPU"), name
    z, e = torch.randn(10, 4), torch.randn(3, 4)
    with ops.backend("native"):
        assert torch.equal(ops.vq_nearest(z, e), ops.reference.vq_nearest(z, e))


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(ops, "_native_checked", True)
    monkeypatch.setattr(ops, "_native_ok", False)
    monkeypatch.setattr(ops, "_native_error", "ImportError: simulated")
    monkeypatch.setattr(ops, "_warned", False)
    z, e = torch.randn(5, 3), torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="reference ops"):
        a = ops.vq_nearest(z, e)
    assert torch.equal(a, ops.reference.vq_nearest(z, e))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.vq_nearest(z, e)                     # warned once only
    with pytest.raises(RuntimeError, match="not built"):
        with ops.backend("native"):
            pass
