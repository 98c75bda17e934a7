"""What every Python path shares, without torch: the PyTorch detector (:mod:`lsr.detect`)
and the torch-free bundle path (:mod:`lsr.deploy`) take these from here, and the C++ loop
and runtime are checked against them by tests (``tests/test_contract.py``). The
resampling contract itself (rule, noise, loops) is written down in ``docs/method.md``.

Example:
    >>> chain_seed(0, 1, 0)
    1009
    >>> [str(s) for s in unique_stems([Path("a/x.png"), Path("b/x.png")])]
    ['x', 'x_1']
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

#: a lazy prior call of the incremental loop costs this share of one image's full pass on
#: top of the rows it evaluates (at least one row): the cost model that groups row requests
#: into calls (csrc/resample/resample.cpp kCallOverheadFraction, lsr.deploy.numpy_ops);
#: measured on the CPU at batch 1, ~1.4 of ~10 ms
CALL_OVERHEAD_FRACTION = 0.15


def chain_seed(seed: int, image_id: int, restoration: int) -> int:
    """Noise seed of one resampling chain: independent of the batch it runs in (bundle.json
    "noise" and the C++ runtime write the same formula)."""
    return ((seed * 1_000_003 + image_id) * 1_009 + restoration) % (2 ** 63 - 1)


def call_overhead(H: int) -> float:
    """The cost, in image-rows, of one lazy prior call on a grid of H rows."""
    return max(1.0, CALL_OVERHEAD_FRACTION * H)


def recomputed_fraction(prior_passes: int, positions_evaluated: int, n_codes: int, restorations: int
                        ) -> float | None:
    """Share of the grid that an average prior call after the first one evaluated (1.0 for
    the ``naive`` and ``fast`` loops, which re-run whole passes; a few rows' worth for
    ``native``, which evaluates only the rows its next decision needs); None when no code
    changed (only the first pass of each restoration ran)."""
    later = prior_passes - restorations
    if later <= 0:
        return None
    return (positions_evaluated - restorations * n_codes) / (later * n_codes)


def finite_or_none(v: float) -> float | None:
    """JSON has no NaN: a missing value (NaN, inf) is null."""
    v = float(v)
    return v if math.isfinite(v) else None


def result_row(score: float, nll_score: float, direct_score: float, fused_score: float, n_resampled: float,
               prior_passes: int, positions_evaluated: int, n_codes: int, restorations: int) -> dict[str, Any]:
    """The detection fields of one ``results.jsonl`` row, the same for every Python path
    (PyTorch run, bundle on onnxruntime or TorchScript); the C++ runtime writes the same
    keys (tests compare them). A score that cannot be computed (the fused score without
    held-out statistics) is null."""
    passes, evaluated, n_codes = int(prior_passes), int(positions_evaluated), int(n_codes)
    return {
        "score": finite_or_none(score),
        "nll_score": float(nll_score),
        "direct_score": float(direct_score),
        "fused_score": finite_or_none(fused_score),
        "n_resampled": float(n_resampled),
        "prior_passes": passes,
        "positions_evaluated": evaluated,
        "recomputed_fraction": recomputed_fraction(passes, evaluated, n_codes, restorations),
        "n_codes": n_codes,
    }


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique with a numeric suffix where two images share a name (the
    names of panels, maps and masks)."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = Path(p).stem
        k = seen.get(stem, 0)
        seen[stem] = k + 1
        out.append(stem if k == 0 else f"{stem}_{k}")
    return out


__all__ = ["CALL_OVERHEAD_FRACTION", "chain_seed", "call_overhead", "recomputed_fraction", "unique_stems",
           "result_row", "finite_or_none"]
