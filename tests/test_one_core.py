"""One prior core: a change to a PixelSNAIL layer, made in one Python place, reaches every
pass that runs the prior (issue 14).

The change: the gated residual block's output nonlinearity, ``x + a * sigmoid(gate)``,
becomes ``x + tanh(a) * sigmoid(gate)``, written once as a replacement of
``GatedResBlock.rows``. Every backend then gives the changed logits: the full forward, the
incremental prior (eager, native, TorchScript: what the C++ loop and the C++ runtime
run), the pure-function row graph (eager and exported to ONNX, run by onnxruntime), and the
resampling loops built on them give one another's codes.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import lsr.ops as ops
from lsr.config import PriorConfig
from lsr.models import PixelSNAIL
from lsr.models.incremental import IncrementalPrior, script_prior
from lsr.models.pixelsnail import GatedResBlock, causal_conv_rows

CFG = PriorConfig(codebook_size=8, grid_size=6, channels=8, n_blocks=2, n_res_blocks=1, kernel_size=5,
                  n_heads=2, dropout=0.0)


class TanhGated:
    """GatedResBlock.rows with one change: tanh on the gated branch (a method named
    ``rows``, as TorchScript compiles it under its own name)."""

    def rows(self, x: Tensor, aux: Optional[Tensor], rows: Tensor, r0: int, whole: bool, mode: int,
             cache: List[Tensor], outs: List[Tensor]) -> Tensor:
        g = (self.ctx, self.left, self.right)
        t = causal_conv_rows(F.elu(x), self.conv1.weight, self.conv1.bias, g[0], g[1], g[2], self.slot,
                             rows, r0, whole, mode, cache, outs)
        if self.aux is not None and aux is not None:
            t = t + self.aux(F.elu(aux))
        t = causal_conv_rows(self.drop(F.elu(t)), self.conv2.weight, self.conv2.bias, g[0], g[1], g[2],
                             self.slot + 1, rows, r0, whole, mode, cache, outs)
        a, gate = t.chunk(2, dim=1)
        return x + torch.tanh(a) * torch.sigmoid(gate)


@contextlib.contextmanager
def changed_layer():
    """The layer changed in its one place; TorchScript's per-class cache cleared so that
    scripting compiles the changed method (and again afterwards, so no other test sees it)."""
    def clear():
        torch.jit._recursive.concrete_type_store.type_store.clear()
        torch.jit._state._clear_class_state()
    clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GatedResBlock, "rows", TanhGated.rows)
        try:
            yield
        finally:
            clear()


def _prior_and_codes():
    torch.manual_seed(0)
    prior = PixelSNAIL(CFG).eval()
    codes = torch.randint(0, CFG.codebook_size, (3, CFG.grid_size, CFG.grid_size),
                          generator=torch.Generator().manual_seed(1))
    return prior, codes


def _incremental_logits(inc, codes: Tensor) -> tuple[Tensor, Tensor]:
    """(full-pass logits, rows 3.. of image 1 after one of its codes in row 3 changed)."""
    logits, cache = inc.full(codes)
    changed = codes.clone()
    changed[1, 3, 2] = (changed[1, 3, 2] + 1) % CFG.codebook_size
    part = inc.partial(changed[1:2], torch.tensor([1]), 3, cache)
    return logits, part


def test_changed_layer_reaches_every_torch_pass(one_thread):
    prior, codes = _prior_and_codes()
    with torch.no_grad():
        original = prior(codes)
    with changed_layer(), torch.no_grad():
        want = prior(codes)
        assert (original - want).abs().max() > 1e-3           # the change took effect
        changed = codes.clone()
        changed[1, 3, 2] = (changed[1, 3, 2] + 1) % CFG.codebook_size
        want_part = prior(changed)[1:2, :, 3:]
        backends = {"eager reference": IncrementalPrior(prior, native=False),
                    "scripted reference": script_prior(prior, native=False)}
        if ops.native_available():
            backends["eager native"] = IncrementalPrior(prior, native=True)
            backends["scripted native (the C++ loop's prior)"] = script_prior(prior, native=True)
        for name, inc in backends.items():
            logits, part = _incremental_logits(inc, codes)
            torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5, msg=name)
            torch.testing.assert_close(part, want_part, rtol=1e-5, atol=1e-5, msg=name)
    # afterwards the package's layer is back, in eager and in TorchScript
    with torch.no_grad():
        torch.testing.assert_close(prior(codes), original)
        torch.testing.assert_close(script_prior(prior, native=False)(codes), original, rtol=1e-5, atol=1e-5)


def test_changed_layer_reaches_the_resampling_loops(one_thread):
    prior, codes = _prior_and_codes()
    B, G, K = codes.shape[0], CFG.grid_size, CFG.codebook_size
    noise = ops.gumbel_noise(B, G * G, K, [11 + i for i in range(B)])
    with changed_layer(), torch.no_grad():
        lik = torch.softmax(prior(codes), 1).gather(1, codes.unsqueeze(1)).squeeze(1)
        tau = float(lik.flatten().quantile(0.3))
        want = ops.resample_naive(prior, codes, noise, tau)
        got = {"fast": ops.resample_fast(prior, codes, noise, tau)}
        if ops.native_available():
            got["native (C++ loop over the scripted prior)"] = ops.resample_native(prior, codes, noise, tau)
    assert int(want.resampled.sum()) >= 3
    for name, res in got.items():
        assert torch.equal(res.codes, want.codes), name
        assert torch.equal(res.resampled, want.resampled), name


def test_changed_layer_reaches_the_row_graph_and_onnx(one_thread, tmp_path):
    with changed_layer():
        _row_graph_and_onnx(tmp_path)


def _row_graph_and_onnx(tmp_path):
    from lsr.deploy import numpy_ops as nops
    from lsr.deploy.graphs import PriorRowsGraph

    prior, codes = _prior_and_codes()
    G = CFG.grid_size
    graph = PriorRowsGraph(prior).eval()
    geometry = graph.state_geometry()
    with torch.no_grad():
        want = prior(codes).numpy()

    def eager(c, ids, state):
        with torch.no_grad():
            out = graph(torch.from_numpy(c), torch.from_numpy(ids), *map(torch.from_numpy, state))
        return out[0].numpy(), [o.numpy() for o in out[2:]]

    runners = {"eager row graph": eager}
    if _has_onnx():
        import onnxruntime as ort
        from lsr.deploy.bundle import prior_rows_io
        from lsr.deploy.export import _export_onnx, _prior_rows_example

        path = tmp_path / "prior_rows.onnx"
        example, dyn = _prior_rows_example(graph, G, CFG.codebook_size)
        _export_onnx(graph, example, path, prior_rows_io(geometry, graph.context_rows, G, CFG.codebook_size),
                     18, dynamic=dyn)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]

        def onnx_rows(c, ids, state):
            out = sess.run(None, dict(zip(names, [c, ids, *state])))
            return out[0], out[2:]
        runners["onnx row graph (onnxruntime)"] = onnx_rows

    for name, run in runners.items():
        state = nops.new_state(geometry, codes.shape[0], G, G)
        for r0, r1 in ((0, 2), (2, 3), (3, G)):
            ids = np.arange(r0 - graph.context_rows, r1)
            lg, new = run(codes.numpy()[:, np.clip(ids, 0, None)], ids,
                          nops.state_above(state, geometry, slice(None), r0, G))
            nops.store_rows(state, geometry, slice(None), r0, r1, G, new)
            np.testing.assert_allclose(lg, want[:, :, r0:r1], rtol=1e-4, atol=1e-5, err_msg=name)


def _has_onnx() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
