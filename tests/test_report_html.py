"""The static HTML report (lsr.report_html): the page holds every row with relative,
escaped, percent-encoded links (a hostile file name neither breaks the page nor its image
links), no absolute path and no network URL; and, in headless Chromium loaded from disk,
it draws every row, every image loads, sorting by a header click and the verdict / defect
filters work, the view in the URL fragment is honoured on load, and no JavaScript error or
failed resource is reported.

The browser test drives Chromium through the DevTools protocol over
``--remote-debugging-pipe`` (standard library only). It skips when no Chromium binary is
found (``$LSR_CHROMIUM``, else chromium / chromium-browser / google-chrome on PATH), unless
``LSR_REQUIRE_CHROMIUM=1`` (CI installs the Debian package and sets it), which makes a
missing binary a failure.
"""
import html.parser
import json
import os
import re
import select
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lsr.report_html import save_thumbnail, write_index

HOSTILE = 'a"<b>&c d#?.png'
NAMES = [HOSTILE, "défaut ü 1.png", "plain.png", "x&y=1.png", "good 02.png", "nan score.png", "big.png"]
SCORES = [0.9, 0.3, 0.7, None, 0.1, None, 1.4]
DEFECTS = ["crack", "crack", "scratch </script><b>x", "scratch </script><b>x", "good", "good", "crack"]


def _rows(tmp_path, thumbnails=True):
    data = tmp_path / "data dir"
    out = tmp_path / "out"
    data.mkdir()
    (out / "panels").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (name, score, defect) in enumerate(zip(NAMES, SCORES, DEFECTS)):
        img = rng.random((3, 48, 64)).astype(np.float32)
        Image.fromarray((np.moveaxis(img, 0, -1) * 255).astype(np.uint8)).save(data / name, format="PNG")
        row = {"image": str(data / name), "score": score, "nll_score": 100.0 + i, "defect": defect,
               "label": int(defect != "good"), "threshold": 0.5, "false_alarm_rate": 0.01,
               "anomalous": None if score is None else score > 0.5,
               "normalised_score": None if score is None else score / 0.5,
               "n_regions": i % 3, "regions": [{"area": 5 + j, "bbox": [j, 1, j + 4, 6], "peak": 0.8,
                                                "peak_xy": [j, 2]} for j in range(i % 3)]}
        if thumbnails:
            row["thumbnail"] = str(out / "thumbs" / name)
            save_thumbnail(row["thumbnail"], img, rng.random((12, 16)))
        if i % 2 == 0:                                   # a panel for some rows
            row["panel"] = str(out / "panels" / name)
            Image.new("RGB", (220, 40), (200, 100, 50)).save(row["panel"], format="PNG")
        rows.append(row)
    Image.new("RGB", (120, 60), (10, 120, 200)).save(out / "report.png")
    return out, rows


METRICS = {"category": "grass", "n_test": 7, "n_anomalous": 5,
           "methods": {"lsr": {"image_auroc": 0.91, "pixel_auroc": 0.95, "aupro": 0.8, "image_f1_max": 0.9,
                               "pixel_f1_max": 0.5, "per_defect": {"crack": {"image_auroc": 0.93}}},
                       "nll": {"image_auroc": 0.7, "image_f1_max": 0.6, "per_defect": {}}},
           "operating_point": {"image_threshold": 0.5, "false_alarm_rate_chosen": 0.01,
                               "false_alarm_rate_measured": 0.0, "false_alarm_rate_ci95": [0.0, 0.65],
                               "detection_rate_per_defect": {"crack": 0.66, "scratch": 0.5},
                               "pixel_precision": 0.4, "pixel_recall": None}}


class _Checker(html.parser.HTMLParser):
    """Nesting check plus every URL-bearing attribute."""
    VOID = {"meta", "link", "img", "br", "input", "hr", "col", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.urls, self.errors, self.scripts = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("href", "src")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "script":
            self.scripts.append(data)


def test_thumbnail_small(tmp_path):
    img = np.random.default_rng(0).random((3, 256, 384)).astype(np.float32)
    save_thumbnail(tmp_path / "t.png", img, np.random.default_rng(1).random((64, 96)), size=160)
    with Image.open(tmp_path / "t.png") as im:
        assert im.size == (2 * 160 + 2, 107) and im.mode == "RGB"
    save_thumbnail(tmp_path / "g.png", img[0], np.full((8, 8), np.nan), size=32)   # grey, constant map
    with pytest.raises(ValueError, match="anomaly_map"):
        save_thumbnail(tmp_path / "bad.png", img, np.zeros((2, 3, 4)))


def test_page_rows_links_escaping(tmp_path):
    out, rows = _rows(tmp_path)
    page_path = write_index(out, rows, title="lsr eval <grass> & co", metrics=METRICS, pictures=["report.png"])
    assert page_path == out / "index.html"
    text = page_path.read_text(encoding="utf-8")
    p = _Checker()
    p.feed(text)
    p.close()
    assert not p.errors and p.stack == [], (p.errors, p.stack)
    assert "<title>lsr eval &lt;grass&gt; &amp; co</title>" in text
    assert HOSTILE not in text and "</script><b>x" not in text       # only escaped forms
    assert str(tmp_path) not in text and not re.search(r"https?://", text)
    data = json.loads(next(s for s in p.scripts if s.lstrip().startswith("{")))
    assert [r["name"] for r in data["rows"]] == NAMES
    assert [r["score"] for r in data["rows"]] == SCORES and data["columns"] == ["nll_score"]
    urls = p.urls + [r[k] for r in data["rows"] for k in ("href", "thumb", "panel") if r[k]]
    assert len(urls) > 2 * len(NAMES)
    for u in urls:
        if u.startswith("data:"):
            continue
        assert not urllib.parse.urlsplit(u).scheme and not u.startswith("/"), u
        if u not in ("metrics.json", "results.jsonl"):
            assert (out / urllib.parse.unquote(u)).is_file(), u           # every link resolves on disk
    assert data["rows"][0]["href"] == "../data%20dir/a%22%3Cb%3E%26c%20d%23%3F.png"
    for needle in ("image_auroc", "0.91", "detection_rate_per_defect", "[0, 0.65]", "per_defect", "report.png"):
        assert needle in text, needle
    assert text.count("<tr>") >= len(NAMES) + 1                       # the <noscript> table


def test_page_minimal_rows(tmp_path):
    """A detect row without thresholds, defect or pictures; no rows at all."""
    out = tmp_path / "o"
    write_index(out, [{"image": "rel/x.png", "score": 0.2, "nll_score": 3.0, "anomalous": None,
                       "threshold": None, "normalised_score": None}], title="t")
    data = json.loads(re.search(r'id="lsr-data">(.*?)</script>', (out / "index.html").read_text(), re.S)[1])
    assert data["has_defect"] is False and data["rows"][0]["name"] == "x.png"
    assert data["rows"][0]["href"] == urllib.parse.quote(os.path.relpath(os.path.abspath("rel/x.png"), out))
    write_index(out, [], title="empty", columns=())
    assert "Images (0)" in (out / "index.html").read_text()


# --------------------------------------------------------------------------- Chromium


def _chromium_binary():
    env = os.environ.get("LSR_CHROMIUM")
    found = env if env and shutil.which(env) else next(
        (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
         if shutil.which(b)), None)
    if found is None:
        if os.environ.get("LSR_REQUIRE_CHROMIUM") == "1":
            pytest.fail("no Chromium binary found (LSR_REQUIRE_CHROMIUM=1): apt-get install chromium, "
                        "or set LSR_CHROMIUM")
        pytest.skip("no Chromium binary (apt-get install chromium, or set LSR_CHROMIUM); "
                    "LSR_REQUIRE_CHROMIUM=1 makes this a failure")
    return found


class _Browser:
    """Headless Chromium driven over the DevTools protocol on fds 3 (in) and 4 (out)."""

    def __init__(self, binary, profile, log):
        cmd_r, self.cmd_w = os.pipe()
        self.resp_r, resp_w = os.pipe()

        def fds():                                       # in the child: the pipes become fds 3 and 4
            a, b = os.dup(cmd_r), os.dup(resp_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.log = open(log, "wb")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--allow-file-access-from-files", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=fds, close_fds=False, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        os.close(cmd_r)
        os.close(resp_w)
        self.buf, self.next_id, self.events = b"", 0, []

    def _recv(self, deadline):
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.resp_r], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self.resp_r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method, session=None, timeout=30, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._recv(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def wait_event(self, method, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.events):
                if m.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._recv(deadline))

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.cmd_w)
        os.close(self.resp_r)
        self.log.close()


class _Page:
    def __init__(self, browser):
        self.b = browser
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        self.sid = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.call(f"{domain}.enable", self.sid)

    def load(self, url):
        self.b.call("Page.navigate", self.sid, url="about:blank")
        self.b.wait_event("Page.loadEventFired")
        self.b.call("Page.navigate", self.sid, url=url)
        self.b.wait_event("Page.loadEventFired")

    def js(self, expr):
        r = self.b.call("Runtime.evaluate", self.sid, expression=expr, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def errors(self):
        bad = []
        for m in self.b.events:
            p = m.get("params", {})
            if m.get("method") == "Runtime.exceptionThrown":
                bad.append(p["exceptionDetails"])
            elif m.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                bad.append(p)
            elif m.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                bad.append(p["entry"])
        return bad

    def shown(self):
        return self.js("Array.from(document.querySelectorAll('#results tbody tr'))"
                       ".filter(t => !t.hidden).map(t => t.dataset.name)")

    def select(self, sel, value):
        self.js(f"(() => {{ const s = document.querySelector({json.dumps(sel)}); s.value = {json.dumps(value)};"
                f" s.dispatchEvent(new Event('change')); }})()")


def _order(desc, keep=lambda i: True):
    idx = [i for i in range(len(NAMES)) if keep(i)]
    have = sorted((i for i in idx if SCORES[i] is not None), key=lambda i: SCORES[i], reverse=desc)
    return [NAMES[i] for i in have + [i for i in idx if SCORES[i] is None]]


def test_chromium_loads_sorts_filters(tmp_path):
    binary = _chromium_binary()
    out, rows = _rows(tmp_path)
    rows[2].pop("thumbnail")                              # row 2 shows its panel, row 3 no picture
    rows[3].pop("thumbnail")
    index = write_index(out, rows, title="report", metrics=METRICS, pictures=["report.png"])
    url = index.resolve().as_uri()
    t0 = time.monotonic()
    b = _Browser(binary, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        page = _Page(b)
        page.load(url)
        assert page.shown() == NAMES
        assert page.js("document.getElementById('count').textContent") == f"{len(NAMES)} of {len(NAMES)} images"
        imgs = page.js("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        assert len(imgs) == len(NAMES) - 1 + 1            # row 3 has no picture; + report.png
        assert all(ok and w > 0 for _, ok, w in imgs), imgs
        assert "panels/plain.png" in [src for src, _, _ in imgs]
        assert page.js("document.querySelector('#results tbody tr a').href").endswith("a%22%3Cb%3E%26c%20d%23%3F.png")
        tip = page.js("document.querySelectorAll('#results tbody tr')[2].querySelector('details').title")
        assert tip.splitlines() == ["bbox 0,1,4,6  area 5  peak 0.8", "bbox 1,1,5,6  area 6  peak 0.8"]

        page.js("document.querySelector('button[data-sort=score]').click()")
        assert page.shown() == _order(desc=True)
        assert page.js("document.querySelector('button[data-sort=score]').parentNode.getAttribute('aria-sort')") \
            == "descending"
        assert "sort=score&dir=desc" in page.js("location.hash")
        page.js("document.querySelector('button[data-sort=score]').click()")
        assert page.shown() == _order(desc=False)          # nulls still last

        page.select("#verdict", "reject")
        assert page.shown() == _order(False, lambda i: SCORES[i] is not None and SCORES[i] > 0.5)
        page.select("#verdict", "all")
        page.select("#defect", "scratch </script><b>x")
        assert page.shown() == _order(False, lambda i: DEFECTS[i].startswith("scratch"))
        assert page.js("document.getElementById('count').dataset.shown") == "2"
        page.js("document.querySelector('button[data-sort=name]').click()")
        assert page.shown() == sorted(_order(False, lambda i: DEFECTS[i].startswith("scratch")))

        # a shared view: the fragment is honoured on load
        page.load(url + "#sort=score&dir=desc&verdict=pass&defect=good")
        assert page.shown() == _order(True, lambda i: DEFECTS[i] == "good" and SCORES[i] is not None
                                      and SCORES[i] <= 0.5)
        assert page.js("document.getElementById('verdict').value") == "pass"
        assert page.errors() == []

        # without JavaScript: the <noscript> table, every row
        b.call("Emulation.setScriptExecutionDisabled", page.sid, value=True)
        page.load(url)
        assert page.js("document.querySelectorAll('noscript tbody tr').length") == len(NAMES)
        assert page.js("document.getElementById('results').hidden") is True
    finally:
        b.close()
    print(f"chromium test: {time.monotonic() - t0:.1f} s")


# --------------------------------------------------------------------------- the commands write it

@pytest.mark.parametrize("command", ["eval", "detect"])
def test_commands_write_a_browsable_index(command, tiny_run, tiny_dataset, tmp_path):
    """`lsr eval` and `lsr detect` write index.html listing every image with its thumbnail,
    score and verdict; it loads in Chromium with every image and no error."""
    from lsr.cli import main

    out = tmp_path / "o"
    images = sorted((tiny_dataset / "test").rglob("*.png"))
    argv = (["eval", str(tiny_run), str(tiny_dataset)] if command == "eval"
            else ["detect", str(tiny_run), *map(str, images), "--no-panels"])
    assert main(["--no-progress", *argv, "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(images)
    page = (out / "index.html").read_text()
    for r in rows:
        assert Path(r["thumbnail"]).is_file() and "anomalous" in r
    binary = _chromium_binary()
    b = _Browser(binary, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        p = _Page(b)
        p.load((out / "index.html").resolve().as_uri())
        assert len(p.shown()) == len(rows)
        imgs = p.js("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        assert len(imgs) >= len(rows) and all(ok and w > 0 for _, ok, w in imgs), imgs
        assert not p.errors(), p.errors()
        if command == "eval":
            assert "operating_point" in page or "false_alarm_rate" in page
    finally:
        b.close()
