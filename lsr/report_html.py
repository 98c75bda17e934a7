"""A static, browsable HTML report of detection results (``index.html``).

One self-contained page: no server, no network, no external script or style sheet. The
images stay files beside it (thumbnails, panels, the inputs) and are referenced by
relative, percent-encoded URLs, so the folder opens from disk (``file://``) in any browser
and can be moved or archived as a whole. The result rows are embedded as JSON and drawn by
inline JavaScript: a table sortable by score, normalised score, name, verdict and region
count (nulls last), filterable by verdict, defect type and name, with the view kept in the
URL fragment (``index.html#sort=score&dir=desc&verdict=reject&defect=crack&q=017``), so a
view can be shared or bookmarked. Without JavaScript a plain table is shown instead.

Standard library, NumPy and Pillow only (no matplotlib: :func:`save_thumbnail` is cheap
enough to run for every image).
"""
from __future__ import annotations

import html
import os
import urllib.parse
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lsr.io import atomic_write, dumps, save_png

__all__ = ["save_thumbnail", "write_index"]

# the 'turbo' colormap (lsr.report.CMAP) at 17 evenly spaced points, interpolated to 256
_TURBO = np.array([[48, 18, 59], [64, 64, 161], [70, 107, 227], [65, 147, 254], [40, 187, 235], [23, 220, 194],
                   [50, 241, 151], [109, 253, 98], [164, 252, 59], [205, 235, 52], [237, 207, 57], [253, 171, 51],
                   [250, 125, 32], [234, 80, 13], [208, 47, 4], [169, 21, 1], [122, 4, 2]], np.float32)
_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_TURBO)), _TURBO[:, c])
                 for c in range(3)], axis=1).round().astype(np.uint8)


def _numpy(x: Any) -> np.ndarray:
    for step in ("detach", "cpu", "numpy"):              # torch tensors, without importing torch
        if hasattr(x, step) and not isinstance(x, np.ndarray):
            x = getattr(x, step)()
    return np.asarray(x)


def save_thumbnail(path: str | os.PathLike, image: Any, anomaly_map: Any, size: int = 160, *,
                   vmin: float | None = None, vmax: float | None = None, alpha: float = 0.5) -> None:
    """Save a small PNG (atomically): the image and, beside it, its anomaly map as a heat
    overlay (turbo colours blended over the image), each tile fitted in ``size`` x ``size``.

    Args:
        image: float (C, H, W) with C in {1, 3}, or (H, W), values in [0, 1] (clipped).
        anomaly_map: float (h, w), any size (resized bilinearly to the tile).
        vmin, vmax: the map values shown coldest / hottest (default: the map's finite
            range); pass a fixed range (e.g. 0 and twice the pixel threshold) to make the
            colours comparable between images.
        alpha: weight of the heat colours in the overlay.
    """
    from PIL import Image

    a = _numpy(image).astype(np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"image: expected (C, H, W) with C 1 or 3, or (H, W); got shape {_numpy(image).shape}")
    rgb = np.rint(np.clip(np.nan_to_num(a), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb
    H, W = rgb.shape[:2]
    scale = size / max(H, W)
    tw, th = max(1, round(W * scale)), max(1, round(H * scale))
    tile = np.asarray(Image.fromarray(rgb).resize((tw, th), Image.Resampling.BILINEAR), np.float32)

    m = _numpy(anomaly_map).astype(np.float32).squeeze()
    if m.ndim != 2:
        raise ValueError(f"anomaly_map: expected (H, W); got shape {_numpy(anomaly_map).shape}")
    finite = m[np.isfinite(m)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    m = np.asarray(Image.fromarray(np.nan_to_num(m, nan=lo, posinf=hi, neginf=lo), mode="F")
                   .resize((tw, th), Image.Resampling.BILINEAR))
    t = np.clip((m - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    heat = _LUT[np.rint(t * 255).astype(np.uint8)].astype(np.float32)
    blend = (1 - alpha) * tile + alpha * heat
    out = np.full((th, 2 * tw + 2, 3), 255, np.uint8)
    out[:, :tw] = tile.astype(np.uint8)
    out[:, tw + 2:] = np.rint(np.clip(blend, 0, 255)).astype(np.uint8)
    save_png(path, out)


# --------------------------------------------------------------------------- the page


def _href(path: Any, out: Path, base: Path | None = None) -> str | None:
    """A relative, percent-encoded URL from ``out`` to ``path`` (a relative ``path`` is
    taken from ``base``, default the current folder); None when there is none."""
    if not path:
        return None
    p = Path(path)
    if not p.is_absolute() and base is not None:
        p = base / p
    try:
        rel = os.path.relpath(os.path.abspath(p), os.path.abspath(out))
    except ValueError:                                   # another drive (Windows)
        return None
    return urllib.parse.quote(rel.replace(os.sep, "/"), safe="/")


def _names(paths: list[str]) -> list[str]:
    """Display names: each image's path below the images' common folder."""
    absd = [os.path.dirname(os.path.abspath(p)) for p in paths if p]
    try:
        common = os.path.commonpath(absd) if absd else ""
    except ValueError:
        common = ""
    return [os.path.relpath(os.path.abspath(p), common) if common and p else os.path.basename(str(p or ""))
            for p in paths]


def _num(v: Any) -> float | int | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _fmt(v: Any) -> str:
    if v is None:
        return "\u2014"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _e(v: Any) -> str:
    return html.escape(_fmt(v), quote=True)


def _kv_table(d: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    """A two-column table of ``d``; nested dicts become nested tables."""
    cells = []
    for k, v in d.items():
        if k in skip:
            continue
        val = _kv_table(v) if isinstance(v, Mapping) else _e(v)
        cells.append(f"<tr><th>{_e(k)}</th><td>{val}</td></tr>")
    return f"<table class=kv>{''.join(cells)}</table>" if cells else ""


def _matrix(rows: Mapping[str, Mapping[str, Any]], corner: str) -> str:
    """A table with one row per key of ``rows`` and one column per scalar field."""
    cols: list[str] = []
    for r in rows.values():
        cols += [k for k, v in r.items() if not isinstance(v, (Mapping, list)) and k not in cols]
    head = "".join(f"<th>{_e(c)}</th>" for c in [corner, *cols])
    body = "".join(f"<tr><th>{_e(name)}</th>" + "".join(f"<td>{_e(r.get(c))}</td>" for c in cols) + "</tr>"
                   for name, r in rows.items())
    return f"<table class=grid><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _metrics_html(m: Mapping[str, Any]) -> str:
    parts = [("Summary", _kv_table({k: v for k, v in m.items() if not isinstance(v, (Mapping, list))}))]
    methods = m.get("methods") or {}
    if methods:
        parts.append(("Methods (threshold-free)", _matrix(methods, "method")))
        main = "lsr" if "lsr" in methods else next(iter(methods))
        per = (methods.get(main) or {}).get("per_defect") or {}
        if per:
            parts.append((f"Per defect type ({main}, each against the good images)", _matrix(per, "defect")))
    if m.get("operating_point"):
        parts.append(("Operating point (stored thresholds)", _kv_table(m["operating_point"])))
    if m.get("detect"):
        parts.append(("Detect settings", _kv_table(m["detect"])))
    return "<section class=metrics>" + "".join(f"<div><h2>{_e(h)}</h2>{t}</div>" for h, t in parts) + "</section>"


def _row_data(rows: list[Mapping[str, Any]], out: Path, columns: Sequence[str]) -> list[dict[str, Any]]:
    names = _names([str(r.get("image") or "") for r in rows])
    data = []
    for r, name in zip(rows, names):
        regs = [[reg.get("bbox"), reg.get("area"), reg.get("peak")] for reg in (r.get("regions") or [])]
        data.append({
            "name": name, "href": _href(r.get("image"), out), "thumb": _href(r.get("thumbnail"), out),
            "panel": _href(r.get("panel"), out), "defect": r.get("defect"), "label": r.get("label"),
            "score": _num(r.get("score")), "norm": _num(r.get("normalised_score")),
            "verdict": r.get("anomalous") if isinstance(r.get("anomalous"), bool) else None,
            "n_regions": _num(r.get("n_regions")), "regions": regs,
            "extra": [r.get(c) if isinstance(r.get(c), (str, int, float, bool)) or r.get(c) is None else _fmt(r.get(c))
                      for c in columns]})
    return data


def _verdict(v: bool | None) -> str:
    return "REJECT" if v is True else "pass" if v is False else "\u2014"


def _noscript(data: list[dict[str, Any]], has_defect: bool) -> str:
    head = "<th>#</th><th>image</th>" + ("<th>defect</th>" if has_defect else "") + \
           "<th>score</th><th>normalised</th><th>verdict</th><th>regions</th>"
    body = []
    for i, r in enumerate(data):
        link = r["panel"] or r["href"]
        name = f'<a href="{html.escape(link)}">{_e(r["name"])}</a>' if link else _e(r["name"])
        body.append(f"<tr><td>{i + 1}</td><td>{name}</td>" + (f"<td>{_e(r['defect'])}</td>" if has_defect else "")
                    + f"<td>{_e(r['score'])}</td><td>{_e(r['norm'])}</td><td>{_verdict(r['verdict'])}</td>"
                      f"<td>{_e(r['n_regions'])}</td></tr>")
    return f"<table class=grid><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def write_index(out: str | os.PathLike, rows: Iterable[Mapping[str, Any]], *, title: str,
                metrics: Mapping[str, Any] | None = None, pictures: Sequence[str | os.PathLike] = (),
                columns: Sequence[str] | None = None) -> Path:
    """Write ``out/index.html`` (atomically) and return its path.

    Args:
        out: the report folder (created if missing); every link in the page is relative
            to it, so keep the files it points to where they are relative to it.
        rows: result rows (the dicts of results.jsonl). Read: ``image`` (path of the
            input, absolute or relative to the current folder: the name shown, below the
            images' common folder, and its link), ``thumbnail`` (path of a
            :func:`save_thumbnail` PNG shown in the row; without it ``panel`` is shown
            scaled down), ``panel`` (path of the panel PNG the row's picture links to),
            ``score``, ``normalised_score``, ``anomalous`` (True REJECT, False pass,
            None no verdict), ``n_regions`` and ``regions`` (listed by bounding box, area
            and peak), and ``defect`` / ``label`` where present (``lsr eval``: the
            defect filter). Other fields are ignored unless named in ``columns``.
        title: the page title.
        metrics: the ``lsr eval`` metrics (metrics.json) shown as tables: the summary
            scalars, ``methods`` (one row per method), the main method's ``per_defect``,
            ``operating_point`` and ``detect``.
        pictures: PNGs shown above the table (e.g. ``report.png`` with the ROC curves);
            relative paths are taken from ``out``.
        columns: extra row fields shown as sortable columns (default: ``nll_score``
            where the rows have it).
    """
    out = Path(out)
    rows = list(rows)
    if columns is None:
        columns = [c for c in ("nll_score",) if any(c in r for r in rows)]
    data = _row_data(rows, out, list(columns))
    has_defect = any(r["defect"] is not None for r in data)
    payload = dumps({"rows": data, "columns": list(columns), "has_defect": has_defect})
    # '<' escaped as \u003c: no file or defect name can close the script element
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    pics = []
    for p in pictures:
        href = _href(p, out, base=out)
        if href:
            pics.append(f'<figure><a href="{href}"><img src="{href}" alt="{_e(Path(p).name)}"></a>'
                        f"<figcaption>{_e(Path(p).name)}</figcaption></figure>")
    side = ""
    if metrics is not None:
        side += _metrics_html(metrics)
    if (out / "metrics.json").is_file():
        side += '\n<p><a href="metrics.json">metrics.json</a></p>'
    if (out / "results.jsonl").is_file():
        side += '\n<p><a href="results.jsonl">results.jsonl</a></p>'
    page = _PAGE.format(title=html.escape(title), n=len(data), metrics=side,
                        pictures="<section class=pictures>" + "".join(pics) + "</section>" if pics else "",
                        noscript=_noscript(data, has_defect), data=payload, css=_CSS, js=_JS)
    path = out / "index.html"
    with atomic_write(path, "wb") as f:                  # UTF-8 as the page declares, whatever the locale
        f.write(page.encode("utf-8"))
    return path


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin:1.2em 0 .4em}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;vertical-align:top}
table.grid td,table.grid th,#results td,#results th{border-bottom:1px solid #ddd}
table.kv th{font-weight:normal;color:#555}table.kv table.kv{margin:0}
#results thead th{position:sticky;top:0;background:#f4f4f4}
#results th button{font:inherit;font-weight:bold;border:0;background:none;cursor:pointer;padding:0}
#results th[aria-sort=ascending] button::after{content:" \\25B2"}
#results th[aria-sort=descending] button::after{content:" \\25BC"}
#results td.num{text-align:right;font-variant-numeric:tabular-nums}
img.thumb{height:100px;width:auto;display:block}
tr.reject{background:#fff0f0}
.badge{padding:1px 6px;border-radius:3px;font-weight:bold}
.badge.reject{background:#c62828;color:#fff}.badge.pass{background:#2e7d32;color:#fff}
#controls{margin:.8em 0}#controls label{margin-right:1.2em}
.metrics{display:flex;flex-wrap:wrap;gap:0 3em;align-items:flex-start}
.pictures img{max-width:100%;height:auto}figure{margin:0 0 1em}
details ol{margin:0;padding-left:1.5em;font-size:.9em}
"""

_JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("lsr-data").textContent);
  var rows = data.rows, table = document.getElementById("results");
  var tbody = table.tBodies[0], count = document.getElementById("count");
  var vsel = document.getElementById("verdict"), dsel = document.getElementById("defect");
  var qbox = document.getElementById("q");
  var cols = [["index", "#"], ["picture", ""], ["name", "image"]];
  if (data.has_defect) cols.push(["defect", "defect"]);
  cols.push(["score", "score"], ["norm", "normalised"], ["verdict", "verdict"], ["n_regions", "regions"]);
  data.columns.forEach(function (c, j) { cols.push(["x" + j, c]); });
  var keys = cols.map(function (c) { return c[0]; });
  var state = {sort: "index", dir: "asc", verdict: "all", defect: "all", q: ""};

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "\u2014";
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(4)));
    return String(v);
  }
  function key(r, k) {
    if (k === "index") return r.index;
    if (k === "verdict") return r.verdict === null ? null : (r.verdict ? 1 : 0);
    if (k.charAt(0) === "x") { var v = r.extra[+k.slice(1)]; return v === undefined ? null : v; }
    var x = r[k];
    return x === undefined ? null : x;
  }
  function cell(tr, cls, text) { var td = el("td", cls, text); tr.appendChild(td); return td; }

  var head = el("tr");
  cols.forEach(function (c) {
    var th = el("th"), b = el("button", "", c[1]);
    head.appendChild(th);
    if (c[0] === "picture") return;
    b.type = "button"; b.dataset.sort = c[0];
    b.addEventListener("click", function () {
      var first = (c[0] === "name" || c[0] === "index" || c[0] === "defect") ? "asc" : "desc";
      state.dir = state.sort === c[0] ? (state.dir === "asc" ? "desc" : "asc") : first;
      state.sort = c[0]; apply(true);
    });
    th.appendChild(b);
  });
  table.tHead.appendChild(head);

  rows.forEach(function (r, i) {
    r.index = i + 1;
    var tr = el("tr", r.verdict ? "reject" : ""), td = cell(tr, "num", String(r.index));
    tr.dataset.name = r.name;
    td = cell(tr, "");
    var pic = r.thumb || r.panel, link = r.panel || r.href;
    if (pic) {
      var img = el("img", "thumb"); img.src = pic; img.alt = r.name;
      if (link) { var a0 = el("a"); a0.href = link; a0.appendChild(img); td.appendChild(a0); }
      else td.appendChild(img);
    }
    td = cell(tr, "name");
    if (r.href) { var a = el("a", "", r.name); a.href = r.href; td.appendChild(a); } else td.textContent = r.name;
    if (data.has_defect) cell(tr, "", fmt(r.defect));
    cell(tr, "num", fmt(r.score));
    cell(tr, "num", fmt(r.norm));
    td = cell(tr, "");
    td.appendChild(el("span", r.verdict === null ? "" : (r.verdict ? "badge reject" : "badge pass"),
                      r.verdict === null ? "\u2014" : (r.verdict ? "REJECT" : "pass")));
    td = cell(tr, "num");
    if (r.regions.length) {
      var det = el("details"), ol = el("ol"), lines = [];
      det.appendChild(el("summary", "", fmt(r.n_regions)));
      r.regions.forEach(function (g) {
        var s = "bbox " + (g[0] || []).join(",") + "  area " + fmt(g[1]) + "  peak " + fmt(g[2]);
        lines.push(s); ol.appendChild(el("li", "", s));
      });
      if (r.n_regions > r.regions.length) lines.push("(" + r.regions.length + " of " + r.n_regions + " listed)");
      det.title = lines.join("\n"); det.appendChild(ol); td.appendChild(det);
    } else td.textContent = fmt(r.n_regions);
    r.extra.forEach(function (v) { cell(tr, typeof v === "number" ? "num" : "", fmt(v)); });
    r.tr = tr;
  });

  var defects = [];
  rows.forEach(function (r) { if (r.defect !== null && defects.indexOf(r.defect) < 0) defects.push(r.defect); });
  defects.sort().forEach(function (d) { var o = el("option", "", d); o.value = d; dsel.appendChild(o); });
  if (!data.has_defect) dsel.parentNode.hidden = true;

  function visible(r) {
    if (state.verdict === "reject" && r.verdict !== true) return false;
    if (state.verdict === "pass" && r.verdict !== false) return false;
    if (state.verdict === "none" && r.verdict !== null) return false;
    if (state.defect !== "all" && r.defect !== state.defect) return false;
    return !state.q || r.name.toLowerCase().indexOf(state.q.toLowerCase()) >= 0;
  }
  function apply(writeHash) {
    var k = state.sort, sign = state.dir === "desc" ? -1 : 1;
    var order = rows.slice().sort(function (a, b) {
      var x = key(a, k), y = key(b, k);
      if (x === null || y === null) return x === y ? a.index - b.index : (x === null ? 1 : -1);
      var c = (typeof x === "number" && typeof y === "number") ? x - y
            : String(x).localeCompare(String(y), undefined, {numeric: true});
      return c ? sign * c : a.index - b.index;
    });
    var shown = 0;
    order.forEach(function (r) { var ok = visible(r); r.tr.hidden = !ok; shown += ok; tbody.appendChild(r.tr); });
    count.textContent = shown + " of " + rows.length + " images";
    count.dataset.shown = shown;
    Array.prototype.forEach.call(head.cells, function (th, j) {
      if (keys[j] === k) th.setAttribute("aria-sort", state.dir === "asc" ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    });
    vsel.value = state.verdict; dsel.value = state.defect; qbox.value = state.q;
    if (writeHash) {
      var h = "#" + new URLSearchParams(state).toString();
      try { history.replaceState(null, "", h); } catch (e) { /* some browsers refuse on file:// */ }
    }
  }
  function fromHash() {
    var p = new URLSearchParams(location.hash.slice(1));
    state.sort = keys.indexOf(p.get("sort")) >= 0 ? p.get("sort") : "index";
    state.dir = p.get("dir") === "desc" ? "desc" : "asc";
    state.verdict = ["reject", "pass", "none"].indexOf(p.get("verdict")) >= 0 ? p.get("verdict") : "all";
    state.defect = defects.indexOf(p.get("defect")) >= 0 ? p.get("defect") : "all";
    state.q = p.get("q") || "";
    apply(false);
  }
  vsel.addEventListener("change", function () { state.verdict = vsel.value; apply(true); });
  dsel.addEventListener("change", function () { state.defect = dsel.value; apply(true); });
  qbox.addEventListener("input", function () { state.q = qbox.value; apply(true); });
  window.addEventListener("hashchange", fromHash);
  document.getElementById("controls").hidden = false;
  table.hidden = false;
  fromHash();
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>{css}</style>
</head>
<body>
<h1>{title}</h1>
{metrics}
{pictures}
<h2>Images ({n})</h2>
<div id="controls" hidden>
<label>verdict <select id="verdict"><option value="all">all</option><option value="reject">reject</option>
<option value="pass">pass</option><option value="none">no verdict</option></select></label>
<label>defect <select id="defect"><option value="all">all</option></select></label>
<label>name <input id="q" type="search" size="16"></label>
<span id="count"></span>
</div>
<table id="results" hidden><thead></thead><tbody></tbody></table>
<noscript>{noscript}</noscript>
<script type="application/json" id="lsr-data">{data}</script>
<script>{js}</script>
</body>
</html>
"""


def thumbnail_scale(d: dict[str, Any]) -> dict[str, float]:
    """One colour scale for every thumbnail of a command (0 to twice the pixel threshold,
    so colours compare across images), or each map's own range without a threshold."""
    t = d.get("pixel_threshold")
    return {"vmin": 0.0, "vmax": 2.0 * t} if t is not None and t > 0 else {}
