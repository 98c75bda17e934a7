"""Attention maps of the prior: what the PixelSNAIL prior looked at when it judged a code.

``lsr detect RUN IMAGE --explain [N]`` and :func:`explain` (``explain(detector, x)``).

For each explained code at raster position t = (i, j) of the code grid (t = i * w + j),
and each attention layer of the prior (``blocks.<b>.attn``), the weights

    a[l, hd, t, s] = softmax_s( q_t . k_s / sqrt(d) )  over s < t,   0 for s >= t

of head ``hd``, exactly the strictly causal attention of :func:`lsr.ops.reference.causal_attention`
(query t sees keys s < t only), averaged over the heads: ``attention[l, t, :]`` sums to 1 over
s < t and is exactly 0 at s >= t. **Position 0 has no earlier key**: its weights are all zero
(the layer outputs zeros there), so it sums to 0, not 1.

What is explained: the one teacher-forced prior pass over the *input's* codes, the pass
that gives the likelihoods p_t = p(c_t | c_<t) the detection reports (``likelihood``) and
that decides the first flagged code. Later passes of the resampling loop run on partly
resampled grids and are not explained.

Which codes (:func:`select_queries`): ``top=None``, the codes the first restoration
resampled, at most ``MAX_RESAMPLED`` (16) of them, the least likely first (``limit=None``
in the Python API: all); ``top=N``, the N codes with the highest -log p_t (resampled or
not). Both are ordered by -log p_t, highest first (ties: raster order).

The fused and native attention kernels never materialise the weights. Here one prior pass
runs with forward hooks on every attention layer's query and key projections (``attn.q``,
``attn.kv``: the very tensors the layer used, whatever backend ran it), and only the rows of
the queries asked for are computed, in float64, from those q and k. The models are not
changed.

Files (:func:`save_explanation`), per image ``<stem>``, under ``OUT/explain/``:

* ``<stem>_<i>_<j>.png``: one panel per explained code: the input with the code's cell
  outlined, then per attention layer the weights as a heat map over the code grid and the
  same map over the image, the cell outlined in both;
* ``<stem>.npz``: float32 / int arrays, n = explained codes, L = attention layers, nh = heads,
  (h, w) = code grid, S = the model's image size:

  ====================  ===================  ==============================================
  key                   shape, dtype         what
  ====================  ===================  ==============================================
  ``positions``         (n, 2) int64         (i, j) of each explained code
  ``nll``               (n,) float32         -log p_t of the input's code there
  ``resampled``         (n,) bool            whether the first restoration redrew it
  ``attention``         (n, L, h, w) f32     weights over the code grid, mean over heads
  ``head_attention``    (n, L, nh, h, w) f32 the same per head
  ``attention_image``   (n, L, S, S) f32     ``attention`` upsampled to the image (nearest:
                                             every pixel of a code's cell holds its weight)
  ``codes``             (h, w) int64         the input's codes
  ``layers``            (L,) str             layer names, e.g. ``blocks.0.attn``
  ====================  ===================  ==============================================

``OUT/explain/explain.jsonl``: a line per image (``image``, ``npz``, ``codes``: per explained
code its position, -log p, resampled and panel).

``lsr eval RUN DATA --explain [N]`` (:func:`explain_examples`) writes the same for one test
image per defect type (``good`` included), named ``<defect>_<stem>...``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor


class Explanation(NamedTuple):
    """Attention of the prior for the explained codes of one image (see the module doc)."""
    positions: Tensor        # (n, 2) int64, (i, j)
    nll: Tensor              # (n,) float32, -log p_t of the input's code
    resampled: Tensor        # (n,) bool
    attention: Tensor        # (n, L, h, w) float32, mean over heads
    head_attention: Tensor   # (n, L, nh, h, w) float32
    codes: Tensor            # (h, w) int64
    layers: list[str]        # L names

    def image_attention(self, size: int) -> Tensor:
        """``attention`` upsampled to (n, L, size, size), nearest: each code cell's pixels
        hold the cell's weight (``size`` a multiple of the grid side)."""
        h, w = self.attention.shape[-2:]
        if size % h or size % w:
            raise ValueError(f"image size {size} is not a multiple of the code grid {h}x{w}")
        return self.attention.repeat_interleave(size // h, dim=-2).repeat_interleave(size // w, dim=-1)


def attention_layers(prior: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The prior's attention layers (``blocks.<b>.attn``) in order; ValueError if none."""
    layers = [(f"blocks.{b}.attn", blk.attn) for b, blk in enumerate(getattr(prior, "blocks", []))
              if getattr(blk, "attn", None) is not None]
    if not layers:
        raise ValueError("--explain: the run's prior has no attention layers (prior.attention is false)")
    return layers


@torch.no_grad()
def attention_weights(prior: torch.nn.Module, codes: Tensor, queries: Sequence[Tensor]
                      ) -> tuple[list[Tensor], Tensor]:
    """Per-head attention weights of the queries asked for, from one prior pass.

    Args:
        prior: a :class:`lsr.models.PixelSNAIL`.
        codes (Tensor[B, h, w]): code grids.
        queries: per image, raster positions t (int64, any number, any order).

    Returns:
        (weights, logits): ``weights[b]`` is (n_b, L, nh, h*w) float64, row t exactly 0 at
        s >= t and summing to 1 over s < t (all zero for t = 0); ``logits`` (B, K, h, w)
        of the same pass.
    """
    layers = attention_layers(prior)
    B, H, W = codes.shape
    T = H * W
    if len(queries) != B:
        raise ValueError(f"got queries for {len(queries)} images, codes for {B}")
    seen: dict[tuple[int, str], Tensor] = {}
    hooks = []
    for li, (_, attn) in enumerate(layers):
        for part in ("q", "kv"):
            def keep(_m, _inp, out, li=li, part=part):
                seen[(li, part)] = out.detach()
            hooks.append(getattr(attn, part).register_forward_hook(keep))
    try:
        logits = prior(codes)
    finally:
        for hk in hooks:
            hk.remove()
    idx = torch.arange(T)
    out: list[Tensor] = []
    for b in range(B):
        t = torch.as_tensor(queries[b], dtype=torch.long).cpu().reshape(-1)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
            raise ValueError(f"query positions must be in [0, {T}), got {t.tolist()}")
        per_layer = []
        for li, (_, attn) in enumerate(layers):
            nh = attn.n_heads

            def heads(x: Tensor) -> Tensor:          # (C, H, W) -> (nh, T, d), as CausalAttention
                return x.reshape(nh, -1, T).transpose(1, 2)

            q = heads(seen[(li, "q")][b].double().cpu())
            k = heads(seen[(li, "kv")][b].double().cpu().chunk(2, dim=0)[0])
            scores = (q[:, t] @ k.transpose(1, 2)) * q.shape[-1] ** -0.5        # (nh, n, T)
            allowed = idx.view(1, T) < t.view(-1, 1)                             # (n, T): s < t
            scores = scores.masked_fill(~allowed, float("-inf"))
            wts = torch.softmax(scores, dim=-1)
            wts = torch.where(allowed, wts, torch.zeros((), dtype=wts.dtype))    # row 0: NaN -> 0
            per_layer.append(wts.transpose(0, 1))                                # (n, nh, T)
        out.append(torch.stack(per_layer, dim=1) if t.numel() else torch.zeros(0, len(layers), 0, T,
                                                                               dtype=torch.float64))
    return out, logits


#: ``top=None`` explains the resampled codes, at most this many (the least likely first)
MAX_RESAMPLED = 16


def select_queries(likelihood: Tensor, resampled: Tensor, top: int | None = None,
                   limit: int | None = MAX_RESAMPLED) -> Tensor:
    """Raster positions to explain on one grid (h, w): ``top=None`` the resampled ones (at
    most ``limit``; None: all), ``top=N`` the N with the highest -log p; ordered by -log p,
    highest first, ties in raster order."""
    nll = -torch.log(likelihood.double().clamp_min(1e-30)).flatten().cpu()
    order = torch.sort(nll, descending=True, stable=True).indices
    if top is None:
        keep = order[resampled.flatten().cpu()[order]]
        return keep if limit is None else keep[:int(limit)]
    check_top(top)
    return order[:int(top)]


def check_top(top: Any) -> None:
    if top is not None and (isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1):
        raise ValueError(f"--explain: must be an integer >= 1 (or nothing: the resampled codes), got {top!r}")


@torch.no_grad()
def explain(det: Any, x: Tensor, top: int | None = None, image_ids: Sequence[int] | None = None,
            result: Any = None, limit: int | None = MAX_RESAMPLED) -> list[Explanation]:
    """One :class:`Explanation` per image of x (detector: a :class:`lsr.detect.Detector`).

    Args:
        det: a :class:`lsr.detect.Detector`.
        x (Tensor[B, C, S, S]): images in [0, 1] at the model's size.
        top: None (the resampled codes, at most ``limit`` of them; None: all) or N (the N
            least likely codes, resampled or not).
        image_ids: noise ids as :meth:`Detector.detect` (they decide what is resampled).
        result: a :class:`DetectionResult` of ``det.detect(x, image_ids)`` already computed.
    """
    check_top(top)
    res = result if result is not None else det.detect(x, image_ids)
    layers = [name for name, _ in attention_layers(det.prior)]
    queries = [select_queries(res.likelihood[b], res.resampled[b], top, limit) for b in range(res.codes.shape[0])]
    weights, logits = attention_weights(det.prior, res.codes.to(det.device), queries)
    logp = torch.log_softmax(logits.double(), dim=1).gather(1, res.codes.to(logits.device).unsqueeze(1))[:, 0]
    h, w = res.codes.shape[1:]
    out = []
    for b, (t, wts) in enumerate(zip(queries, weights)):
        n, L = t.numel(), len(layers)
        head = wts.reshape(n, L, -1, h, w).float()
        out.append(Explanation(
            positions=torch.stack([t // w, t % w], dim=1),
            nll=(-logp[b].flatten().cpu()[t]).float(),
            resampled=res.resampled[b].flatten().cpu()[t],
            attention=wts.mean(dim=2).reshape(n, L, h, w).float(),
            head_attention=head,
            codes=res.codes[b].cpu(),
            layers=list(layers)))
    return out


# --------------------------------------------------------------------------- files


def _mark(ax, i: int, j: int, cell_h: float, cell_w: float) -> None:
    from matplotlib.patches import Rectangle

    for colour, lw in (("black", 2.6), ("white", 1.2)):
        ax.add_patch(Rectangle((j * cell_w - 0.5, i * cell_h - 0.5), cell_w, cell_h, fill=False,
                               edgecolor=colour, linewidth=lw))


def save_panel(path: str | os.PathLike, image: Any, exp: Explanation, k: int, title: str = "") -> None:
    """One PNG for explained code k of ``exp``: the input with the code's cell outlined, then
    per attention layer its weights over the code grid and over the image (colour scale
    0 .. the layer's largest weight, a colour bar per layer)."""
    from . import report as R

    img = R.to_rgb_uint8(image)
    H, W = img.shape[:2]
    i, j = (int(v) for v in exp.positions[k])
    h, w = exp.codes.shape
    ch, cw = H / h, W / w
    L = len(exp.layers)
    fig = R._new_figure(1.8 * (1 + 2 * L) + 0.3 * L + 0.4, 1.8 * H / W + 0.8)
    axes = fig.subplots(1, 1 + 2 * L, squeeze=False)[0]
    R._tile(axes[0], img, f"input, code ({i}, {j})")
    _mark(axes[0], i, j, ch, cw)
    for li, name in enumerate(exp.layers):
        a = exp.attention[k, li].numpy()
        hi = float(a.max()) if float(a.max()) > 0 else 1.0
        grid = R._resize_nearest(a, H, W)
        R._tile(axes[1 + 2 * li], R.heatmap(grid, 0.0, hi), f"{name}: code grid")
        R._tile(axes[2 + 2 * li], R.overlay(img, grid, 0.0, hi, alpha=0.6), f"{name}: over image")
        for ax in axes[1 + 2 * li: 3 + 2 * li]:
            _mark(ax, i, j, ch, cw)
        R._colorbar(fig, axes[2 + 2 * li], 0.0, hi, location="right", fraction=0.05, pad=0.02, shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=10)
    R._save_figure(fig, path)


def save_explanation(out_dir: str | os.PathLike, stem: str, image: Any, exp: Explanation,
                     name: str = "", panels: bool = True) -> dict[str, Any]:
    """Write ``<stem>.npz`` (keys in the module doc) and a panel per explained code
    ``<stem>_<i>_<j>.png`` into ``out_dir``; returns the index line of the image."""
    from .io import atomic_write

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    S = int(np.asarray(image).shape[-1])
    arrays = {"positions": exp.positions.numpy().astype(np.int64), "nll": exp.nll.numpy().astype(np.float32),
              "resampled": exp.resampled.numpy().astype(bool),
              "attention": exp.attention.numpy().astype(np.float32),
              "head_attention": exp.head_attention.numpy().astype(np.float32),
              "attention_image": exp.image_attention(S).numpy().astype(np.float32),
              "codes": exp.codes.numpy().astype(np.int64), "layers": np.array(exp.layers, dtype=str)}
    npz = out_dir / f"{stem}.npz"
    with atomic_write(npz, "wb") as f:
        np.savez(f, **arrays)
    codes = []
    for k in range(exp.positions.shape[0]):
        i, j = (int(v) for v in exp.positions[k])
        row: dict[str, Any] = {"position": [i, j], "nll": float(exp.nll[k]), "resampled": bool(exp.resampled[k])}
        if panels:
            png = out_dir / f"{stem}_{i}_{j}.png"
            note = "  (position 0: no earlier codes, no attention)" if i == 0 and j == 0 else ""
            save_panel(png, image, exp, k,
                       title=f"{name or stem}  code ({i}, {j})  -log p {row['nll']:.2f}  "
                             f"{'resampled' if row['resampled'] else 'not resampled'}{note}")
            row["panel"] = str(png)
        codes.append(row)
    return {"npz": str(npz), "codes": codes}


def explain_images(run: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                   top: int | None = None, batch_size: int = 8, device: str | None = None,
                   panels: bool = True, progress: bool = False, **options: Any) -> list[dict[str, Any]]:
    """``lsr detect RUN IMAGES --explain [N]``: the files of the module doc under
    ``OUT/explain/``; image ids (the noise) as ``lsr detect`` gives them, so the resampled
    codes are those of its ``results.jsonl``. Returns the index lines."""
    from .config import OPTION_RULES, check_value
    from .data import list_images
    from .detect import Detector, unique_stems
    from .io import atomic_write, dumps, locks_output

    check_value("batch_size", batch_size, "--batch-size", OPTION_RULES)
    check_top(top)

    @locks_output("out")
    def _run(out: Path) -> list[dict[str, Any]]:
        det = Detector.load(run, device).with_options(**options)
        attention_layers(det.prior)
        paths = list_images(list(inputs))
        stems = unique_stems(paths)
        folder = Path(out) / "explain"
        rows: list[dict[str, Any]] = []
        for start, chunk, _sizes, x, res, _ms in det.detect_paths(paths, batch_size, progress=progress):
            exps = explain(det, x, top, range(start, start + len(chunk)), result=res)
            for i, (path, exp) in enumerate(zip(chunk, exps)):
                rows.append({"image": str(path), **save_explanation(folder, stems[start + i], x[i].numpy(), exp,
                                                                   path.name, panels)})
        with atomic_write(folder / "explain.jsonl", "w") as f:
            for row in rows:
                f.write(dumps(row) + "\n")
        return rows

    return _run(Path(out))


def explain_examples(run: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                     top: int | None = None, device: str | None = None, panels: bool = True,
                     **options: Any) -> list[dict[str, Any]]:
    """``lsr eval RUN DATA --explain [N]``: one explained example per defect type (the first
    test image of each ``test/<defect>`` folder, ``good`` included), written as
    ``OUT/explain/<defect>_<stem>_<i>_<j>.png``, ``<defect>_<stem>.npz`` and
    ``explain.jsonl``; image k of the test list keeps noise id k, as in ``lsr eval``, so the
    resampled codes are those of its results."""
    from .data import scan_mvtec
    from .detect import Detector
    from .io import atomic_write, dumps, locks_output

    check_top(top)
    cat = scan_mvtec(data, require_test=True, require_train=False)

    @locks_output("out")
    def _run(out: Path) -> list[dict[str, Any]]:
        det = Detector.load(run, device).with_options(**options)
        attention_layers(det.prior)
        first: dict[str, int] = {}
        for k, s in enumerate(cat.test):
            first.setdefault(s.defect, k)
        folder = Path(out) / "explain"
        rows = []
        for defect, k in sorted(first.items()):
            path = cat.test[k].path
            x, _ = det.load_batch([path])
            (exp,) = explain(det, x, top, [k])
            rows.append({"image": str(path), "defect": defect,
                         **save_explanation(folder, f"{defect}_{path.stem}", x[0].numpy(), exp,
                                            f"{defect}/{path.name}", panels)})
        with atomic_write(folder / "explain.jsonl", "w") as f:
            for row in rows:
                f.write(dumps(row) + "\n")
        return rows

    return _run(Path(out))


__all__ = ["explain_examples", "Explanation", "attention_weights", "attention_layers", "select_queries", "explain",
           "save_explanation", "save_panel", "explain_images"]
