import pytest
import torch

_MEANS = pytest.StashKey[dict]()


def pytest_addoption(parser):
    parser.addoption("--run-big", action="store_true", default=False,
                     help="also run the largest shapes (attention at T = 4096)")


def pytest_configure(config):
    config.stash[_MEANS] = {}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


_LIMITS: dict = {}


@pytest.fixture
def machine_limits():
    """limits(device) -> lsr.profiling.Limits, measured once per device and session."""
    from lsr.profiling import measure_limits

    def get(device="cpu"):
        if device not in _LIMITS:
            _LIMITS[device] = measure_limits(device)
        return _LIMITS[device]
    return get


@pytest.fixture
def bench_means(request):
    """{group: {name: mean seconds}}, filled by the benchmarks that compare to `native`; the
    terminal summary prints each other variant's mean divided by native's mean."""
    return request.config.stash[_MEANS]


def pytest_terminal_summary(terminalreporter, config):
    means = dict(config.stash.get(_MEANS, {}))
    later = means.pop("_later_pass", {})
    roof = means.pop("_roofline", {})
    codes = means.pop("_codes", {})
    if codes:
        terminalreporter.section("resampling: codes compared across the loops of each case (this session)")
        for group, methods in codes.items():
            if len(methods) > 1:
                terminalreporter.write_line(f"{group}: {', '.join(methods)}: identical codes and redrawn positions")
            else:
                terminalreporter.write_line(f"{group}: only {methods[0]} ran: not compared")
    if not any("native" in by for by in means.values()):
        return
    terminalreporter.section("speed-up of native (other mean / native mean)")
    for group, by in means.items():
        if "native" not in by:
            continue
        parts = [f"{name} {by[name] / by['native']:.2f}x" for name in by if name != "native"]
        terminalreporter.write_line(f"{group}: native {by['native'] * 1e3:.2f} ms; " + ", ".join(parts))
    if later:
        terminalreporter.section("native resampling: the work after a change vs a full pass")
        for group, (cost, frac) in later.items():
            terminalreporter.write_line(f"{group}: {cost:.2f} of a full pass in time, "
                                        f"{frac:.2f} of the grid evaluated, per changed code")
    if roof:
        lim = next(iter(roof.values()))[2]
        terminalreporter.section(f"fraction of the machine's limit ({lim.device}: measured float32 matrix product "
                                 f"{lim.matmul_flops_per_s / 1e9:.0f} GFLOP/s (mm {lim.mm_flops_per_s / 1e9:.0f}, "
                                 f"1x1 conv {lim.conv_flops_per_s / 1e9:.0f}{', TF32' if lim.tf32 else ''}), "
                                 f"copy {lim.copy_bytes_per_s / 1e9:.0f} GB/s)")
        for (group, name), (r, _, _) in roof.items():
            terminalreporter.write_line(f"{group} {name}: {r['gflop']:.2f} GFLOP, {r['gbyte']:.3f} GB, "
                                        f"{r['achieved_gflop_per_s']:.1f} GFLOP/s, {r['bound_by']}-bound, "
                                        f"{r['fraction_of_limit']:.0%} of the limit")
