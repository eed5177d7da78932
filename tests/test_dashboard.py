"""The HTML dashboard: a self-contained page with safely embedded data, and charts that really draw in Chromium."""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import html
import http.server
import json
import math
import re
import subprocess
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from monitoring.dashboard import example_data, jsonable, render_adapter, render_dashboard
from monitoring.detectors import DriftResult

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is missing: run .ci/system-deps (Debian's chromium package)")

# Closes the data <script>, opens one of its own, and sets a flag from an image's onerror: any escape shows.
EVIL = '</script><script>document.body.dataset.pwned="1"</script><img src=x onerror="document.body.dataset.pwned=2">'
SCRIPT_RE = re.compile(r"<script([^>]*)>(.*?)</script>", re.S)


def fake_data() -> dict[str, Any]:
    """example_data (site-a drifts from check 20 of 30, site-b clean) + adapters with no checks, hostile, broken."""
    data: dict[str, Any] = dict(example_data(n_checks=30, seed=0))
    fresh = {"name": "fresh", "champion": 1, "serving_version": 1, "records": 40, "min_window": 100, "status": None,
             "history": [], "confidence_hist": {"edges": [], "counts": []}, "class_counts": {}, "versions": [],
             "events": [], "reports": []}
    checks = [{"checked_at": f"2025-01-06T09:0{k}:00+00:00", "version": EVIL, "score": 0.5 + k, "threshold": 2.0,
               "drift": k == 2} for k in range(3)]
    evil = {"name": EVIL, "champion": EVIL, "serving_version": EVIL,
            "status": {"drift": True, "score": 2.5, "threshold": 2.0, "checked_at": EVIL,
                       "features": {EVIL: {"test": EVIL, "p_value": 0.001, "moved": True}}},
            "history": checks, "class_counts": {EVIL: 3, "ok": 1},
            "events": [{"at": "2025-01-06T09:01:00+00:00", "kind": EVIL, "text": EVIL}],
            "reports": [{"at": EVIL, "url": "javascript:document.body.dataset.pwned=3"}],
            "versions": [{"version": EVIL, "champion": True, "metrics": {EVIL: 1.0}}]}
    broken = {"name": "broken", "champion": 1, "error": "registry row unreadable"}
    for check in data["adapters"][1]["history"]:  # site-b's times as epoch seconds, the other accepted form
        check["checked_at"] = dt.datetime.fromisoformat(check["checked_at"]).timestamp()
    data["adapters"] = [*data["adapters"], fresh, evil, broken]
    return data


def scripts(page: str) -> dict[str, str]:
    """The page's script elements by id ("" for the inline code)."""
    found = {}
    for attrs, body in SCRIPT_RE.findall(page):
        match = re.search(r'id="([^"]+)"', attrs)
        found[match.group(1) if match else ""] = body
    return found


# ------------------------------------------------------------------------------------------- the HTML text


def test_page_is_self_contained_and_csp_allows_exactly_its_script() -> None:
    page = render_dashboard(fake_data())
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"""@import|url\(\s*["']?\s*(?:https?:)?//|<link\b|<iframe\b|<img\b""", page, re.I)
    assert re.findall(r"<script\b[^>]*>", page) == [
        '<script type="application/json" id="dashboard-config">',
        '<script type="application/json" id="dashboard-data">',
        "<script>",
    ]
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page).group(1)
    code = scripts(page)[""]
    digest = base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp  # the browser runs our script and nothing else
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


def test_embedded_json_round_trips_exactly_and_cannot_close_its_tag() -> None:
    data = fake_data()
    page = render_dashboard(data)
    body = scripts(page)["dashboard-data"]
    assert "<" not in body and ">" not in body and "&" not in body
    assert json.loads(body) == data  # hostile strings arrive intact, as data
    assert EVIL not in page and "<img" not in page and page.count("<script") == 3
    assert json.loads(scripts(page)["dashboard-config"]) == {"refresh_s": None, "data_url": None, "adapter": None}


def test_noscript_table_escapes_names_and_labels_status() -> None:
    page = render_dashboard(fake_data())
    noscript = re.search(r"<noscript>(.*)</noscript>", page, re.S).group(1)
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td>", noscript)
    assert rows == [("site-a", "DRIFT", "44.80"), ("site-b", "OK", "0.73"), ("fresh", "no data", "—"),
                    (html.escape(EVIL), "DRIFT", "2.50"), ("broken", "no data", "—")]


@pytest.mark.parametrize(("value", "expected"), [
    (float("nan"), None),
    ({"s": [1.0, float("inf"), -float("inf")]}, {"s": [1.0, None, None]}),
    (np.float32(0.5), 0.5),
    (np.int64(7), 7),
    (np.array([[1, 2]]), [[1, 2]]),
    (np.bool_(True), True),
    ((1, "a"), [1, "a"]),
    ({3: "x"}, {"3": "x"}),
    (dt.datetime(2025, 1, 6, 8, 0, tzinfo=dt.UTC), "2025-01-06T08:00:00+00:00"),
], ids=["nan", "inf-in-list", "np-float", "np-int", "np-array", "np-bool", "tuple", "int-key", "datetime"])
def test_jsonable_makes_strict_json(value: Any, expected: Any) -> None:
    out = jsonable(value)
    assert out == expected and type(out) is type(expected)
    json.dumps(out, allow_nan=False)


def test_jsonable_takes_a_drift_result_and_refuses_unknown_objects() -> None:
    result = DriftResult(drift=True, score=3.2, threshold=2.0, p_value=10 ** -3.2, window_size=120,
                         checked_at="2025-01-06T08:00:00.000+00:00",
                         features={"embedding": {"test": "mmd", "p_value": 0.002, "moved": True}})
    assert jsonable(result) == result.to_dict()
    assert jsonable({"status": result})["status"]["features"]["embedding"]["moved"] is True
    with pytest.raises(TypeError, match=r"^cannot put a set into the dashboard data; convert it to numbers"):
        jsonable({"x": {1, 2}})


def test_non_finite_scores_become_null_so_json_parse_accepts_the_page() -> None:
    data = example_data(n_checks=3)
    data["adapters"][0]["history"][1]["score"] = math.inf
    body = scripts(render_dashboard(data))["dashboard-data"]
    assert "Infinity" not in body and json.loads(body)["adapters"][0]["history"][1]["score"] is None


def test_empty_data_renders_a_page_that_says_so() -> None:
    for data in ({}, {"adapters": []}, {"adapters": None}):
        page = render_dashboard(data)
        assert "No adapters yet." in page
        assert json.loads(scripts(page)["dashboard-data"]) == data


@pytest.mark.parametrize(("kwargs", "meta", "config"), [
    ({}, False, {"refresh_s": None, "data_url": None, "adapter": None}),
    ({"refresh_s": 15}, True, {"refresh_s": 15, "data_url": None, "adapter": None}),
    ({"refresh_s": 5, "data_url": "/dashboard/data"}, False,
     {"refresh_s": 5, "data_url": "/dashboard/data", "adapter": None}),
], ids=["static", "meta-refresh", "polling"])
def test_refresh_modes(kwargs: dict[str, Any], meta: bool, config: dict[str, Any]) -> None:
    page = render_dashboard(example_data(n_checks=3), **kwargs)
    assert ('<meta http-equiv="refresh" content="15">' in page) is meta
    assert json.loads(scripts(page)["dashboard-config"]) == config


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"refresh_s": 0}, "refresh_s must be a positive number of seconds, got 0; use None for a static page."),
    ({"refresh_s": math.nan}, "refresh_s must be a positive number of seconds, got nan; use None for a static page."),
    ({"data_url": "/dashboard/data"},
     "data_url is polled every refresh_s seconds; pass refresh_s too (e.g. refresh_s=10)."),
], ids=["zero", "nan", "url-without-period"])
def test_bad_refresh_options_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        render_dashboard({}, **kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize("data", [{"adapters": {"site-a": {}}}, {"adapters": ["site-a"]}, [1]],
                         ids=["adapters-dict", "adapters-of-strings", "not-a-dict"])
def test_malformed_data_is_refused(data: Any) -> None:
    with pytest.raises(ValueError, match=r"^data must be a dict whose 'adapters' is a list of adapter dicts"):
        render_dashboard(data)


def test_render_adapter_keeps_one_adapter_and_names_the_known_ones() -> None:
    page = render_adapter(example_data(n_checks=3), "site-b", refresh_s=10, data_url="/dashboard/data")
    assert [a["name"] for a in json.loads(scripts(page)["dashboard-data"])["adapters"]] == ["site-b"]
    assert json.loads(scripts(page)["dashboard-config"])["adapter"] == "site-b"  # a poll brings all; JS filters
    assert "<title>adaptserve dashboard — site-b</title>" in page
    with pytest.raises(KeyError, match=r"no adapter named 'site-z' in the dashboard data; known adapters: "
                                       r"\['site-a', 'site-b'\]"):
        render_adapter(example_data(n_checks=3), "site-z")


def test_example_data_tells_a_drift_story() -> None:
    site_a, site_b = example_data(n_checks=30)["adapters"]
    assert [c["drift"] for c in site_a["history"]] == [False] * 20 + [True] * 10
    assert site_a["status"]["drift"] is True and site_b["status"]["drift"] is False
    assert not any(c["drift"] for c in site_b["history"])
    assert [e["kind"] for e in site_a["events"]] == ["promote", "drift", "job", "rejected", "job"]
    assert {c["version"] for c in site_a["history"]} == {1, 2}


# -------------------------------------------------------------------------------------------- in Chromium


class _Dom(HTMLParser):
    """The elements (tag, attributes) and the text of a dumped DOM, in document order: enough to query it."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self._text: list[str] = []
        self.feed(markup)
        self.close()

    @property
    def text(self) -> str:
        return "".join(self._text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {key: value or "" for key, value in attrs}))

    def handle_data(self, data: str) -> None:
        self._text.append(data)

    def find(self, tag: str, class_: str | None = None, **want: str) -> list[dict[str, str]]:
        """Elements of this tag having the class token class_ and attributes want (data_chart= is data-chart=)."""
        want = {key.replace("_", "-"): value for key, value in want.items()}
        return [attrs for name, attrs in self.elements if name == tag
                and (class_ is None or class_ in attrs.get("class", "").split())
                and all(attrs.get(key) == value for key, value in want.items())]


def chromium(tmp_path: Path, url: str, *args: str) -> str:
    """Run headless Chromium on url with 5 s of virtual time (timers, fetches) and return its stdout."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, url]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def sections(dom_text: str) -> dict[str, _Dom]:
    """Parsed DOM of each adapter section, keyed by adapter name."""
    parts = re.split(r'(?=<section class="adapter")', dom_text.split("</main>")[0])[1:]
    parsed = [_Dom(part) for part in parts]
    return {dom.find("section", class_="adapter")[0]["data-adapter"]: dom for dom in parsed}


def points(d: str) -> list[tuple[float, float]]:
    assert re.fullmatch(r"M[\d.]+,[\d.]+( L[\d.]+,[\d.]+)*", d), d
    return [(float(x), float(y)) for x, y in re.findall(r"([\d.]+),([\d.]+)", d)]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The fake data's page after Chromium ran its script (one browser run shared by the DOM tests)."""
    tmp = tmp_path_factory.mktemp("dashboard")
    page = tmp / "dashboard.html"
    page.write_text(render_dashboard(fake_data()), encoding="utf-8")
    return chromium(tmp, page.as_uri(), "--dump-dom"), tmp


@needs_chromium
def test_browser_draws_the_drift_chart(drawn: tuple[str, Path]) -> None:
    dom_text, _ = drawn
    dom = _Dom(dom_text)
    body = dom.find("body")[0]
    assert body.get("data-rendered") == "true" and "data-error" not in body, body.get("data-error")
    site_a = sections(dom_text)["site-a"]
    (chart,) = site_a.find("svg", data_chart="drift")
    assert chart["data-rendered"] == "true" and chart["data-points"] == "30" and chart["data-scale"] == "log"
    (series,) = site_a.find("path", class_="series")
    xy = points(series["d"])
    assert len(xy) == 30 and all(0 <= x <= 860 and 0 <= y <= 290 for x, y in xy)
    assert [x for x, _ in xy] == sorted(x for x, _ in xy) and xy[-1][0] - xy[0][0] > 500  # spans the chart
    assert max(y for _, y in xy[:20]) - min(y for _, y in xy[20:]) > 100  # the onset climbs (SVG y grows down)
    (threshold,) = site_a.find("path", class_="threshold")
    threshold_y = {y for _, y in points(threshold["d"])}
    assert len(threshold_y) == 1 and max(y for _, y in xy[20:]) < threshold_y.pop() < min(y for _, y in xy[:20])
    assert len(site_a.find("circle", class_="pt-drift")) == 10 and len(site_a.find("circle", class_="pt-ok")) == 20
    assert sorted(line["class"] for line in site_a.find("line", class_="ev-line")) == [
        "ev-line k-drift", "ev-line k-job", "ev-line k-job", "ev-line k-promote", "ev-line k-rejected"]
    assert len(site_a.find("rect", class_="band")) == 2  # v1, then v2 promoted
    assert "DRIFT" in site_a.text and site_a.find("span", class_="badge-drift")


@needs_chromium
def test_browser_draws_every_adapter_and_the_empty_state(drawn: tuple[str, Path]) -> None:
    dom_text, _ = drawn
    by_name = sections(dom_text)
    assert list(by_name) == ["site-a", "site-b", "fresh", EVIL, "broken"]
    assert [by_name[name].find("section", class_="adapter")[0]["data-status"] for name in by_name] == [
        "drift", "ok", "none", "drift", "none"]
    assert by_name["site-b"].find("svg", data_chart="drift", data_points="30")  # epoch-second times work too
    assert "could not gather this adapter's data: registry row unreadable" in by_name["broken"].text
    assert by_name["site-b"].find("span", class_="badge-ok")
    assert not by_name["site-b"].find("circle", class_="pt-drift")
    for name in ("site-a", "site-b"):
        assert len(by_name[name].find("svg", data_chart="confidence", data_rendered="true")) == 1
        assert len(by_name[name].find("rect", class_="bar")) == 20  # 10 confidence bins + 10 classes
    fresh = by_name["fresh"]
    assert not fresh.find("svg") and fresh.find("p", class_="no-checks")
    assert "no checks yet — 40 of 100 records" in fresh.text and "no retrain events yet" in fresh.text
    rendered = _Dom(dom_text).find("svg", class_="chart", data_rendered="true")
    assert len(rendered) == 3 * 3 - 1  # drift/confidence/classes for site-a/b; drift + classes for the hostile one
    assert _Dom(dom_text).find("body")[0]["data-chart-count"] == str(len(rendered))


@needs_chromium
def test_browser_shows_hostile_strings_as_text(drawn: tuple[str, Path]) -> None:
    dom_text, _ = drawn
    dom = _Dom(dom_text)
    assert "data-pwned" not in dom.find("body")[0]
    assert not dom.find("img") and len(dom.find("script")) == 3  # nothing was parsed out of the data
    evil = sections(dom_text)[EVIL]
    assert evil.text.count(EVIL) >= 5  # heading, badge row, event, features, class label (title), ...
    assert not evil.find("a")  # the javascript: report URL is shown, not linked
    assert evil.find("li", data_kind="other")


@needs_chromium
def test_browser_screenshot_is_a_real_page(tmp_path: Path) -> None:
    from PIL import Image

    page = tmp_path / "dashboard.html"
    page.write_text(render_dashboard(fake_data()), encoding="utf-8")
    png = tmp_path / "dashboard.png"
    chromium(tmp_path, page.as_uri(), f"--screenshot={png}", "--window-size=1280,1700", "--hide-scrollbars")
    image = Image.open(png).convert("RGB")
    assert image.size == (1280, 1700)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 100  # text, anti-aliased lines and fills: not a blank page
    counts = {rgb: n for n, rgb in colours}
    assert counts.get((0xD4, 0x3C, 0x3C), 0) > 300  # DRIFT badges and alarm points
    assert counts.get((0x2F, 0x6F, 0xDE), 0) > 5000  # the bars of the two bar charts


@needs_chromium
def test_browser_hash_selects_an_adapter_and_hover_shows_a_tooltip(tmp_path: Path) -> None:
    page = render_dashboard(fake_data())
    page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)  # let the test's script run
    page = page.replace("</body>", """<script>
      const svg = document.querySelector('section[data-adapter="site-b"] svg[data-chart="drift"]');
      const r = svg.getBoundingClientRect();
      svg.dispatchEvent(new MouseEvent("mousemove", {clientX: r.right - 3, clientY: r.top + r.height / 2}));
    </script></body>""")
    path = tmp_path / "dashboard.html"
    path.write_text(page, encoding="utf-8")
    dom_text = chromium(tmp_path, path.as_uri() + "#adapter=site-b", "--dump-dom", "--window-size=1280,1000")
    by_name = sections(dom_text)
    assert ["hidden" in by_name[name].find("section", class_="adapter")[0] for name in by_name] == [
        True, False, True, True, True]
    site_b = by_name["site-b"]
    (tip,) = site_b.find("div", class_="tooltip")
    assert "hidden" not in tip and "flip" in tip["class"].split()  # shown, on the left of the pointer
    tip_html = re.search(r'<div class="tooltip flip"[^>]*>(.*?)</div>', dom_text).group(1)
    score = example_data(n_checks=30)["adapters"][1]["history"][-1]["score"]
    assert " ".join(re.sub(r"<[^>]+>", " ", tip_html).split()) == (
        f"2025-01-06 12:50:00 UTC version v2 score {score:.2f} / threshold 2.00 OK")
    hovered = site_b.find("circle", class_="hover")
    assert len(hovered) == 1 and float(hovered[0]["cx"]) > 800  # the last check, at the right edge


@needs_chromium
def test_browser_with_no_adapters_says_so(tmp_path: Path) -> None:
    path = tmp_path / "dashboard.html"
    path.write_text(render_dashboard({"generated_at": "2025-01-06T08:00:00+00:00", "adapters": []}), encoding="utf-8")
    dom = _Dom(chromium(tmp_path, path.as_uri(), "--dump-dom"))
    body = dom.find("body")[0]
    assert body["data-rendered"] == "true" and body["data-chart-count"] == "0" and "data-error" not in body
    assert dom.find("p", id="no-adapters") and "no adapters yet — publish one and it appears here" in dom.text


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server over tmp_path: (base URL, directory)."""
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


@needs_chromium
def test_browser_polls_the_data_url_and_redraws(served: tuple[str, Path]) -> None:
    base, root = served
    data = example_data(n_checks=30)
    (root / "dashboard.html").write_text(render_dashboard(data, refresh_s=0.5, data_url="data.json"), "utf-8")
    newer = example_data(n_checks=30)
    site_b = newer["adapters"][1]
    site_b["history"].append({**site_b["history"][-1], "checked_at": "2025-01-06T13:00:00+00:00", "score": 9.0,
                              "drift": True})
    site_b["status"] = {**site_b["status"], "drift": True, "score": 9.0}
    (root / "data.json").write_text(json.dumps(jsonable(newer)), "utf-8")
    profile_dir = root / "profiles"
    profile_dir.mkdir()
    dom_text = chromium(profile_dir, f"{base}/dashboard.html", "--dump-dom")
    by_name = sections(dom_text)
    assert by_name["site-b"].find("section", class_="adapter")[0]["data-status"] == "drift"
    assert by_name["site-b"].find("svg", data_chart="drift")[0]["data-points"] == "31"
    (live,) = _Dom(dom_text).find("div", id="live")
    assert live["class"] == "live-ok"
    assert re.search(r'<div id="live" class="live-ok">live · every 0.5 s · updated \d\d:\d\d:\d\d UTC</div>', dom_text)


@needs_chromium
def test_browser_poll_failure_keeps_the_data_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "dashboard.html"
    path.write_text(render_dashboard(example_data(n_checks=30), refresh_s=0.5, data_url="missing.json"), "utf-8")
    dom_text = chromium(tmp_path, path.as_uri(), "--dump-dom")  # file:// cannot fetch: every poll fails
    dom = _Dom(dom_text)
    assert dom.find("div", id="live", class_="live-error")
    assert "live update failed (" in dom_text and "showing the data of" in dom_text
    assert len(dom.find("svg", data_chart="drift", data_rendered="true")) == 2  # the embedded data still shows
