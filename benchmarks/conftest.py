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


@pytest.fixture
def bench_means(request):
    """{group: {name: mean seconds}}, filled by the benchmarks that compare to `native`."""
    return request.config.stash[_MEANS]


def pytest_terminal_summary(terminalreporter, config):
    means = dict(config.stash.get(_MEANS, {}))
    later = means.pop("_later_pass", {})
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
