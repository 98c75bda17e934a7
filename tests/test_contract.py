"""The ports share one contract (lsr/contract.py): the C++ loop's and runtime's copies of
its constants and formulas are read from their sources and checked against it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from lsr import contract

ROOT = Path(__file__).resolve().parents[1]


def test_cpp_cost_constant_equals_contract():
    src = (ROOT / "csrc" / "resample" / "resample.cpp").read_text()
    m = re.search(r"constexpr double kCallOverheadFraction = ([0-9.eE+-]+);", src)
    assert m, "kCallOverheadFraction not found in resample.cpp"
    assert float(m.group(1)) == contract.CALL_OVERHEAD_FRACTION
    assert "0.15" not in src.replace(m.group(0), ""), "a second copy of the constant in resample.cpp"


def test_cpp_chain_seed_formula_equals_contract():
    src = (ROOT / "export" / "src" / "lsr_detect.cpp").read_text()
    m = re.search(r"static_cast<__int128>\(seed\) \* (\d+) \+ image_id\) \* (\d+) \+ restoration", src)
    assert m, "chain_seed formula not found in lsr_detect.cpp"
    a, b = int(m.group(1)), int(m.group(2))
    for seed, image, r in ((0, 0, 0), (5, 17, 3), (2 ** 62, 10 ** 6, 63)):
        assert ((seed * a + image) * b + r) % (2 ** 63 - 1) == contract.chain_seed(seed, image, r)


def test_python_ports_use_the_contract():
    from lsr import detect
    from lsr.deploy import numpy_ops

    assert detect.chain_seed is contract.chain_seed and numpy_ops.chain_seed is contract.chain_seed
    assert detect.unique_stems is contract.unique_stems
    assert numpy_ops.split_groups([0, 0], [4, 4], 10) == numpy_ops.split_groups([0, 0], [4, 4], 10,
                                                                                  contract.call_overhead(10))


@pytest.mark.parametrize("passes,evaluated,n,rest,want", [(1, 64, 64, 1, None), (3, 64 + 2 * 32, 64, 1, 0.5),
                                                           (4, 4 * 64, 64, 2, 1.0)])
def test_recomputed_fraction(passes, evaluated, n, rest, want):
    assert contract.recomputed_fraction(passes, evaluated, n, rest) == want
