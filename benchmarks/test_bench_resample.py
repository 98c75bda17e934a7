"""Resampling loops side by side: naive (H*W prior passes), exact fast (1 + changes full
passes, Python loop) and native (the same loop in C++, passes after a change evaluate
only the rows from the change on).

Run: ``pytest benchmarks/test_bench_resample.py --benchmark-group-by=group
--benchmark-columns=mean,stddev,rounds`` (add ``--run-big`` for naive at 32x32 batch 16).

The prior is the ``demo`` preset's PixelSNAIL (randomly initialised: its speed does not
depend on training), at the grid size of the case; tau is the smallest value at which
the rule flags the wanted share of the first pass's codes (0% = a normal image: nothing
flagged, one pass). The terminal summary gives, per group, every loop's time over the
native loop's, and per native case the cost of one pass after a change relative to a
full pass (measured in the same run), and for fast and native the FLOPs and bytes of the
operators that ran (lsr.profiling, counted in a separate instrumented run) against the
machine's measured matrix rate and copy bandwidth: the fraction of its limit reached.

Every timed call's codes (and redrawn positions) are compared with those of the other
loops that ran the same case in this session: a difference fails the benchmark, and the
terminal summary lists, per case, which loops were compared (a case that only one loop
ran in the session, e.g. under ``-k native``, is listed as not compared). This holds with
``--benchmark-disable`` too (each loop then runs once, untimed).
"""
import time

import pytest
import torch

import lsr.ops as ops
from lsr.config import preset
from lsr.models import PixelSNAIL

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="needs the lsr._C extension")

_CASES: dict = {}
_CODES: dict = {}          # case -> (first loop that ran it, its codes, its redrawn positions)


def setup_case(grid: int, batch: int, flagged: float, seed: int = 0):
    key = (grid, batch, flagged, seed)
    if key in _CASES:
        return _CASES[key]
    cfg = preset("demo", 1).prior
    cfg.grid_size = grid
    torch.manual_seed(seed)
    prior = PixelSNAIL(cfg).eval()
    codes = torch.randint(0, cfg.codebook_size, (batch, grid, grid))
    with torch.no_grad():
        p = ops.resampling.code_likelihood(prior(codes), codes)
    tau = 0.0
    if flagged > 0:
        for q in torch.linspace(0.0, 1.0, 801):
            tau = float(torch.quantile(p.flatten(), float(q)))
            if float(ops.flag_positions(p, tau).float().mean()) >= flagged:
                break
    noise = ops.gumbel_noise(batch, grid * grid, cfg.codebook_size, list(range(batch)))
    _CASES[key] = prior, codes, noise, tau
    return _CASES[key]


def _roofline(benchmark, bench_means, limits, group, method, prior, codes, noise, tau):
    from lsr.profiling import count_cost, roofline
    _, cost = count_cost(ops.resample, prior, codes, noise, tau, 1.0, method)
    r = roofline(cost, benchmark.stats.stats.median, limits)
    benchmark.extra_info.update(r)
    bench_means.setdefault("_roofline", {})[(group, method)] = (r, cost, limits)


def _compare_codes(bench_means, group, case, method, res):
    """The timed call's codes equal those of the first loop that ran this case (this session)."""
    compared = bench_means.setdefault("_codes", {}).setdefault(group, [])
    if case not in _CODES:
        _CODES[case] = (method, res.codes.clone(), res.resampled.clone())
        compared.append(method)
        return
    first, codes, resampled = _CODES[case]
    assert torch.equal(res.codes, codes), f"{group}: {method} and {first} give different codes"
    assert torch.equal(res.resampled, resampled), f"{group}: {method} and {first} redraw other positions"
    compared.append(method)


def _run(benchmark, bench_means, method, grid, batch, flagged, rounds, limits=None):
    prior, codes, noise, tau = setup_case(grid, batch, flagged)
    if method == "native":
        ops.resample(prior, codes, noise, tau, 1.0, "native")        # script the prior once, outside the timing
        # (3 warm-up rounds: TorchScript profiles and specialises a method in its first runs)
    group = f"resample {grid}x{grid} batch {batch}, {flagged:.0%} flagged"
    benchmark.group = group
    res = benchmark.pedantic(ops.resample, args=(prior, codes, noise, tau, 1.0, method), rounds=rounds,
                             iterations=1, warmup_rounds={"naive": 0, "fast": 1, "native": 3}[method])
    _compare_codes(bench_means, group, (grid, batch, flagged), method, res)
    if benchmark.stats is None:                              # --benchmark-disable
        return res
    passes, changed = int(res.prior_passes.sum()), int(res.resampled.sum())
    benchmark.extra_info.update(prior_passes=passes, changed=changed,
                                positions_evaluated=int(res.positions_evaluated.sum()))
    bench_means.setdefault(group, {})[method] = benchmark.stats.stats.mean
    if limits is not None and method != "naive":
        _roofline(benchmark, bench_means, limits, group, method, prior, codes, noise, tau)
    if method == "native" and changed > 0:
        # one full pass of the same batch through the same C++ loop (tau = 0: nothing flagged)
        t = []
        for _ in range(5):
            t0 = time.perf_counter()
            ops.resample(prior, codes, noise, 0.0, 1.0, "native")
            t.append(time.perf_counter() - t0)
        full = sorted(t)[len(t) // 2]
        # the work after the first pass, per changed code (a "pass after a change": for
        # native, its partial calls, continuations included), against one full pass
        per_change = (benchmark.stats.stats.mean - full) / (changed / batch)
        frac = (int(res.positions_evaluated.sum()) - batch * grid * grid) / (changed * grid * grid)
        benchmark.extra_info.update(full_pass_s=full, per_change_over_full=per_change / full,
                                    positions_per_change_fraction=frac)
        bench_means.setdefault("_later_pass", {})[group] = (per_change / full, frac)
    return res


@pytest.mark.parametrize("flagged", [0.0, 0.02, 0.10])
@pytest.mark.parametrize("grid", [16, 32, 64])
@pytest.mark.parametrize("method", ["naive", "fast", "native"])
def test_resample_batch1(benchmark, bench_means, machine_limits, method, grid, flagged):
    if method == "naive" and grid == 64:
        pytest.skip("naive at 64x64 runs 4096 passes per image (minutes); compared at 16x16 and 32x32")
    rounds = {"naive": 1, "fast": 3, "native": 3}[method]
    _run(benchmark, bench_means, method, grid, 1, flagged, rounds, machine_limits("cpu"))


@pytest.mark.parametrize("flagged", [0.0, 0.02, 0.10])
@pytest.mark.parametrize("grid", [16, 32])
@pytest.mark.parametrize("method", ["naive", "fast", "native"])
def test_resample_batch16(benchmark, bench_means, machine_limits, request, method, grid, flagged):
    if method == "naive" and (grid == 32 or flagged == 0.10) and not request.config.getoption("--run-big"):
        pytest.skip("naive at batch 16 beyond 16x16 / 2% takes minutes; pass --run-big")
    _run(benchmark, bench_means, method, grid, 16, flagged, 1 if method == "naive" else 2, machine_limits("cpu"))
