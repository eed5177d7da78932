"""The HTML dashboard (GET /dashboard): one self-contained page, a section per adapter. Pure rendering, no I/O.

render_dashboard(data) returns a single HTML document with inline CSS and inline vanilla JavaScript and nothing
else: no CDN, no fonts, no images, so it works offline, behind a proxy and opened from file://. A Content-Security-
Policy meta tag (script allowed by its sha256 only, connect-src 'self') makes the browser enforce that. The data
travels as JSON in a <script type="application/json"> tag ("<", ">" and "&" written as \\u escapes, so no string can
close the tag); the script draws everything with DOM calls and textContent, never innerHTML, so adapter names,
labels and event texts cannot inject markup. A <noscript> table gives the status of every adapter without JS.

Per adapter (selected by the table at the top, or by the URL: /dashboard#adapter=site-a): a status badge (OK /
DRIFT / no data), the last check's numbers, an SVG line chart of the drift score over time (threshold dashed,
points red when the check alarmed, the served version as background bands, retrain events as vertical lines,
axes, hover tooltip; log scale when the score dwarfs the threshold), bar charts of the current window's
confidence histogram and predicted classes, the last check's per-feature tests, versions, events and report links.
Empty states say so in words ("no checks yet — 40 of 100 records") instead of drawing an empty chart.

Live updates: render_dashboard(data, refresh_s=10, data_url="/dashboard/data") polls that URL (same JSON shape,
serve jsonable(data)) every 10 s and redraws in place, keeping the selected adapter; without data_url, refresh_s
becomes a <meta http-equiv="refresh">. A failed poll keeps the last data and says so in the header.

Hooks for tests: every drawn chart is <svg class="chart" data-chart="drift|confidence|classes" data-rendered="true">;
the drift chart holds <path class="series">, <path class="threshold">, <circle class="pt pt-ok|pt-drift"> and
<line class="ev-line k-KIND">; sections are <section class="adapter" data-adapter=NAME data-status=ok|drift|none>;
after rendering <body> carries data-rendered="true" and data-chart-count=N, and a script error sets data-error.

Input (DashboardData below; every key but adapters[].name optional; times ISO 8601 strings or epoch seconds;
versions int or str; unknown keys are ignored):

    {"generated_at": "2025-01-06T13:00:00+00:00", "base_model": "digits-resnet18", "engine": "onnx-cpu",
     "adapters": [{
        "name": "site-a", "champion": 2, "serving_version": 2,
        "records": 480, "min_window": 100,          # records in the current window / needed for a check
        "error": "...",                              # only when gathering this adapter failed: shown in red
        "status": DriftResult.to_dict() of the last check, or {} / None before the first one:
            {"drift": true, "score": 41.2, "threshold": 2.0, "p_value": 6e-42, "window_size": 480,
             "checked_at": "...", "features": {"embedding": {"test": "mmd", "statistic": 0.08, "p_value": 0.0025,
             "p_adjusted": 0.005, "level": 0.005, "moved": true}, ...}},
        "history": [{"checked_at": "...", "version": 2, "score": 0.4, "threshold": 2.0, "drift": false}, ...],
        "confidence_hist": {"edges": [0.0, 0.1, ..., 1.0], "counts": [0, 1, ..., 310]},   # len(edges) = n + 1
        "class_counts": {"cat": 120, "dog": 98},
        "versions": [{"version": 2, "champion": true, "created_at": "...", "metrics": {"accuracy": 0.97}}],
        "events": [{"at": "...", "kind": "drift"|"job"|"promote"|"rollback"|"rejected"|"failed", "text": "..."}],
        "reports": [{"at": "...", "url": "/reports/site-a/20250106-1200.html"}]}]}

Send a bounded history (say the last 500 checks); the page draws whatever it gets. `python -m monitoring.dashboard
out.html` writes the page for example_data(), a realistic made-up drift story.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import html
import json
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Required, TypedDict

EventKind = Literal["drift", "job", "promote", "rollback", "rejected", "failed"]
EVENT_KINDS: tuple[str, ...] = ("drift", "job", "promote", "rollback", "rejected", "failed")  # others: grey


class FeatureTest(TypedDict, total=False):
    """One feature's test in a check (DriftResult.features[name])."""

    test: str
    statistic: float
    p_value: float
    p_adjusted: float
    level: float
    moved: bool


class CheckStatus(TypedDict, total=False):
    """The last check: DriftResult.to_dict(); drift None (or an empty dict) before the first check."""

    drift: bool | None
    score: float
    threshold: float
    p_value: float
    window_size: int
    checked_at: str
    features: dict[str, FeatureTest]


class CheckPoint(TypedDict, total=False):
    """One past check, oldest first in AdapterData.history."""

    checked_at: str
    version: int | str
    score: float
    threshold: float
    drift: bool


class Histogram(TypedDict):
    edges: list[float]  # n + 1 bin edges
    counts: list[int]  # n counts


class VersionInfo(TypedDict, total=False):
    version: int | str
    champion: bool
    created_at: str
    metrics: dict[str, float]


class Event(TypedDict):
    at: str
    kind: EventKind
    text: str


class Report(TypedDict):
    at: str
    url: str  # relative (/reports/...) or http(s); other schemes (javascript:) are shown as text, not linked


class AdapterData(TypedDict, total=False):
    name: Required[str]
    champion: int | str | None
    serving_version: int | str | None
    records: int  # records in the current window
    min_window: int  # records a check needs (DriftConfig.min_window); "min_records" is read as an alias
    error: str  # gathering this adapter's data failed: the page says so in its section
    status: CheckStatus | None
    history: list[CheckPoint]
    confidence_hist: Histogram
    class_counts: dict[str, int]
    versions: list[VersionInfo]
    events: list[Event]
    reports: list[Report]


class DashboardData(TypedDict, total=False):
    generated_at: str
    base_model: str
    engine: str
    adapters: list[AdapterData]


# ------------------------------------------------------------------------------------------------ rendering


def jsonable(value: Any) -> Any:
    """value in strict-JSON types: NaN/inf become None, numpy scalars/arrays lists, datetimes ISO, dataclasses dicts.

    Serve this as /dashboard/data: the page's poller parses it with JSON.parse, which rejects NaN.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return jsonable(value.tolist())
    raise TypeError(f"cannot put a {type(value).__name__} into the dashboard data; "
                    "convert it to numbers, strings, lists or dicts first.")


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element: no "</script", "<!--" or "&..." can appear in the text."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def _status_label(adapter: Mapping[str, Any]) -> str:
    drift = (adapter.get("status") or {}).get("drift")
    return "DRIFT" if drift is True else "OK" if drift is False else "no data"


def _noscript(adapters: list[dict[str, Any]]) -> str:
    """A plain status table for browsers without JS (and for curl)."""
    rows = []
    for adapter in adapters:
        status = adapter.get("status") or {}
        score = status.get("score")
        score_text = f"{score:.2f}" if isinstance(score, int | float) else "—"
        cells = (adapter.get("name"), _status_label(adapter), score_text, adapter.get("serving_version", "—"),
                 status.get("checked_at", "—"))
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>")
    body = "".join(rows) or '<tr><td colspan="5">No adapters yet.</td></tr>'
    return ("<noscript><p>This page draws its charts with JavaScript; the status table works without it.</p>"
            "<table><tr><th>adapter</th><th>status</th><th>score</th><th>serving</th><th>last check</th></tr>"
            f"{body}</table></noscript>")


def render_dashboard(data: DashboardData | Mapping[str, Any], *, refresh_s: float | None = None,
                     data_url: str | None = None, title: str = "adaptserve dashboard",
                     adapter: str | None = None) -> str:
    """The whole dashboard as one self-contained HTML page (see the module docstring for the data shape).

    refresh_s: reload the data every refresh_s seconds: by polling data_url when given (JS, in place), else with a
    meta refresh of the page. adapter: show only that adapter (render_adapter), also after a poll.
    """
    if refresh_s is not None and not (math.isfinite(refresh_s) and refresh_s > 0):
        raise ValueError(f"refresh_s must be a positive number of seconds, got {refresh_s}; "
                         "use None for a static page.")
    if data_url is not None and refresh_s is None:
        raise ValueError("data_url is polled every refresh_s seconds; pass refresh_s too (e.g. refresh_s=10).")
    clean = jsonable(data)
    adapters = (clean.get("adapters") or []) if isinstance(clean, dict) else None
    if not isinstance(adapters, list) or not all(isinstance(item, dict) for item in adapters):
        raise ValueError("data must be a dict whose 'adapters' is a list of adapter dicts (see monitoring.dashboard).")
    config = {"refresh_s": refresh_s, "data_url": data_url, "adapter": adapter}
    meta_refresh = f'<meta http-equiv="refresh" content="{refresh_s:g}">' if refresh_s and not data_url else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">{meta_refresh}'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
        f'<body><header><h1>{html.escape(title)}</h1><div id="meta"></div><div id="live"></div></header>'
        '<div id="error" hidden></div><main id="app">'
        f"{_noscript(adapters or [])}</main>\n"
        f'<script type="application/json" id="dashboard-config">{_script_json(config)}</script>\n'
        f'<script type="application/json" id="dashboard-data">{_script_json(clean)}</script>\n'
        f"<script>{_JS}</script>\n</body></html>\n"
    )


def render_adapter(data: DashboardData | Mapping[str, Any], name: str, **kwargs: Any) -> str:
    """The page of one adapter (e.g. GET /dashboard/{name}); KeyError naming the known adapters when absent."""
    adapters = list(data.get("adapters") or [])
    chosen = [item for item in adapters if item.get("name") == name]
    if not chosen:
        known = sorted(str(item.get("name")) for item in adapters)
        raise KeyError(f"no adapter named {name!r} in the dashboard data; known adapters: {known}.")
    kwargs.setdefault("title", f"adaptserve dashboard — {name}")
    return render_dashboard({**data, "adapters": chosen}, adapter=name, **kwargs)


# ------------------------------------------------------------------------------------------ example data


def _iso(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _example_adapter(name: str, rng: random.Random, start: dt.datetime, n_checks: int, onset: int | None,
                     every: dt.timedelta) -> dict[str, Any]:
    """One adapter's made-up data: v1 -> v2 promoted early on, optionally drifting from check `onset` on."""
    promote_at = min(5, n_checks - 1)
    history, events = [], [{"at": _iso(start + promote_at * every - every / 2), "kind": "promote",
                            "text": "v2 promoted: target accuracy 0.962 -> 0.975"}]
    for i in range(n_checks):
        drifting = onset is not None and i >= onset
        score = 3.0 + 4.0 * (i - onset) + rng.uniform(0, 6) if drifting else min(1.8, -math.log10(rng.random()))
        history.append({"checked_at": _iso(start + i * every), "version": 1 if i < promote_at else 2,
                        "score": round(score, 3), "threshold": 2.0, "drift": score >= 2.0})
    if onset is not None:
        at = start + onset * every
        events += [{"at": _iso(at), "kind": "drift", "text": f"drift on {name}: embedding, brightness, confidence"},
                   {"at": _iso(at + every / 2), "kind": "job", "text": "retrain job 7 started (412 new labels)"},
                   {"at": _iso(at + 4 * every), "kind": "rejected", "text": "v3 rejected: source accuracy -6.1%"},
                   {"at": _iso(at + 5 * every), "kind": "job", "text": "retrain job 8 started (655 new labels)"}]
    last = history[-1]
    features = {
        "embedding": {"test": "mmd", "statistic": 0.004, "p_value": 0.31, "p_adjusted": 0.62, "level": 0.005},
        **{stat: {"test": "ks", "statistic": 0.05, "p_value": 0.4, "p_adjusted": 1.0, "level": 0.000625}
           for stat in ("brightness", "contrast", "sharpness", "colourfulness", "confidence", "entropy")},
        "predicted_class": {"test": "chisquare", "statistic": 7.1, "p_value": 0.6, "p_adjusted": 1.0,
                            "level": 0.000625},
    }
    for feature in features.values():
        feature["moved"] = False
    if onset is not None:
        features["embedding"].update(statistic=0.081, p_value=0.0025, p_adjusted=0.005, moved=True)
        features["brightness"].update(statistic=0.41, p_value=1e-40, p_adjusted=10 ** -last["score"], moved=True)
        features["confidence"].update(statistic=0.22, p_value=2e-9, p_adjusted=3e-8, moved=True)
    confident = [2, 3, 5, 9, 14, 22, 35, 60, 120, 410] if onset is None else [4, 11, 25, 41, 58, 66, 61, 55, 64, 95]
    return {
        "name": name, "champion": 2, "serving_version": 2, "records": 480, "min_window": 100,
        "status": {"drift": last["drift"], "score": last["score"], "threshold": 2.0,
                   "p_value": 10 ** -last["score"], "window_size": 480, "checked_at": last["checked_at"],
                   "features": features},
        "history": history,
        "confidence_hist": {"edges": [round(0.1 * k, 1) for k in range(11)], "counts": confident},
        "class_counts": {str(digit): 40 + rng.randrange(20) + (60 if onset is not None and digit == 1 else 0)
                         for digit in range(10)},
        "versions": [{"version": 1, "champion": False, "created_at": _iso(start - 3 * every),
                      "metrics": {"accuracy": 0.962, "macro_f1": 0.958, "source_accuracy": 0.971}},
                     {"version": 2, "champion": True, "created_at": _iso(start + (promote_at - 1) * every),
                      "metrics": {"accuracy": 0.975, "macro_f1": 0.973, "source_accuracy": 0.969}}]
        + ([{"version": 3, "champion": False, "created_at": _iso(start + (onset + 3) * every),
             "metrics": {"accuracy": 0.981, "macro_f1": 0.979, "source_accuracy": 0.908}}] if onset else []),
        "events": events,
        "reports": [{"at": item["checked_at"], "url": f"/reports/{name}/{i:03d}.html"}
                    for i, item in enumerate(history) if i % 10 == 9 or (onset is not None and i == onset)],
    }


def example_data(n_checks: int = 30, seed: int = 0) -> DashboardData:
    """Two adapters, n_checks checks 10 min apart: site-a drifts from two thirds on, site-b stays clean."""
    rng = random.Random(seed)
    start = dt.datetime(2025, 1, 6, 8, 0, tzinfo=dt.UTC)
    every = dt.timedelta(minutes=10)
    adapters = [_example_adapter("site-a", rng, start, n_checks, (2 * n_checks) // 3, every),
                _example_adapter("site-b", rng, start, n_checks, None, every)]
    return {"generated_at": _iso(start + n_checks * every), "base_model": "digits-resnet18", "engine": "onnx-cpu",
            "adapters": adapters}  # type: ignore[typeddict-item]


# ------------------------------------------------------------------------------------------ page assets

_CSS = """
:root{--bg:#f5f6f8;--card:#fff;--fg:#1c2230;--muted:#5f6b7d;--line:#dfe3e9;--grid:#edf0f4;--accent:#2f6fde;
--ok:#1e9e56;--drift:#d43c3c;--none:#8791a3;--thr:#c07000;--band:#eef3fc;--tip:#1c2230;--tipfg:#fff;
--ev-drift:#d43c3c;--ev-job:#7a5af8;--ev-promote:#1e9e56;--ev-rollback:#e08600;--ev-rejected:#8791a3;
--ev-failed:#9c2f6e}
@media (prefers-color-scheme:dark){:root{--bg:#12151b;--card:#1b1f27;--fg:#e4e8ef;--muted:#99a3b3;--line:#2d333f;
--grid:#252a34;--accent:#6ea1ff;--band:#222a3a;--tip:#e4e8ef;--tipfg:#12151b}}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
background:var(--bg);color:var(--fg)}
header{display:flex;flex-wrap:wrap;gap:4px 24px;align-items:baseline;padding:12px 24px;background:var(--card);
border-bottom:1px solid var(--line)}
header h1{font-size:18px;margin:0}
#meta,#live{color:var(--muted);font-size:13px}
#live{margin-left:auto}
#live.live-error{color:var(--drift)}
#error{background:#fde8e8;color:#8a1c1c;padding:8px 24px;font-family:monospace}
.adapter-error{background:#fde8e8;color:#8a1c1c;padding:8px 12px;border-radius:6px;margin:0 0 12px}
main{max-width:1180px;margin:0 auto;padding:16px 24px 40px}
h2{font-size:17px;margin:0}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 16px;margin:0 0 16px;
min-width:0}
.card-head{display:flex;flex-wrap:wrap;gap:4px 16px;align-items:baseline;margin-bottom:6px}
.card h3{margin:0;font-size:13px;color:var(--muted);font-weight:600}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:16px;margin-bottom:16px}
.grid2>.card{margin:0}
.adapter-head{display:flex;flex-wrap:wrap;gap:6px 12px;align-items:center;margin:8px 0 12px}
.muted{color:var(--muted)}
.role{white-space:nowrap;margin-right:6px}
.badge{display:inline-block;padding:1px 9px;border-radius:999px;font-size:12px;font-weight:700;letter-spacing:.03em;
color:#fff;background:var(--none);white-space:nowrap}
.badge-ok{background:var(--ok)}.badge-drift{background:var(--drift)}
dl.stats{display:grid;grid-template-columns:repeat(auto-fit,minmax(130px,1fr));gap:8px 16px;margin:0 0 16px}
dl.stats div{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px 12px}
dl.stats dt{color:var(--muted);font-size:12px}dl.stats dd{margin:0;font-size:16px;font-weight:600;
font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
td{overflow-wrap:anywhere}
th{color:var(--muted);font-weight:600;font-size:12px}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
#overview tbody tr{cursor:pointer}#overview tbody tr:hover,#overview tr.selected{background:var(--band)}
#overview a{color:inherit;font-weight:600;text-decoration:none}
.moved{color:var(--drift);font-weight:700}
.chart-box{position:relative}
svg.chart{display:block;width:100%;height:auto}
svg.chart text{fill:var(--muted);font-size:11px}
svg.chart .axis{stroke:var(--muted);stroke-width:1}svg.chart .grid{stroke:var(--grid);stroke-width:1}
.series{fill:none;stroke:var(--accent);stroke-width:2;stroke-linejoin:round;stroke-linecap:round}
.threshold{fill:none;stroke:var(--thr);stroke-width:1.5;stroke-dasharray:6 4}
svg.chart text.threshold-label{fill:var(--thr)}
.pt{stroke:var(--card);stroke-width:1}.pt-ok{fill:var(--accent)}.pt-drift{fill:var(--drift)}
.pt.hover{stroke:var(--fg);stroke-width:2}
.band-odd{fill:var(--band)}.band-even{fill:transparent}svg.chart text.band-label{font-size:10px;font-weight:600}
.guide{stroke:var(--muted);stroke-width:1;stroke-dasharray:2 2}
.k-drift{--k:var(--ev-drift)}.k-job{--k:var(--ev-job)}.k-promote{--k:var(--ev-promote)}
.k-rollback{--k:var(--ev-rollback)}.k-rejected{--k:var(--ev-rejected)}.k-failed{--k:var(--ev-failed)}
.k-other{--k:var(--muted)}
.ev-line{stroke:var(--k);stroke-width:1.5;stroke-dasharray:3 3}.ev-dot{fill:var(--k)}
.chip{display:inline-block;min-width:64px;text-align:center;padding:0 6px;border-radius:4px;font-size:11px;
font-weight:700;color:#fff;background:var(--k)}
.bar{fill:var(--accent)}.bar:hover{opacity:.75}
.tooltip{position:absolute;pointer-events:none;background:var(--tip);color:var(--tipfg);padding:6px 9px;
border-radius:6px;font-size:12px;line-height:1.4;white-space:nowrap;transform:translate(12px,-50%);z-index:2}
.tooltip.flip{transform:translate(calc(-100% - 12px),-50%)}
.empty{color:var(--muted);font-style:italic;padding:22px;text-align:center;border:1px dashed var(--line);
border-radius:6px;margin:0}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;color:var(--muted)}
.sw{display:inline-block;width:16px;height:0;vertical-align:middle;margin-right:5px;border-top:2px solid}
.sw-series{border-color:var(--accent)}.sw-thr{border-top:2px dashed var(--thr)}
.sw-dot{width:9px;height:9px;border:0;border-radius:50%;background:var(--drift)}
.sw-ev{border-top:2px dotted var(--k)}
ul.plain{list-style:none;margin:0;padding:0}ul.plain li{padding:4px 0;border-bottom:1px solid var(--line)}
ul.plain li:last-child{border-bottom:0}
.when{color:var(--muted);font-variant-numeric:tabular-nums;margin-right:8px}
"""

_JS = r"""
(() => {
"use strict";
const SVG_NS = "http://www.w3.org/2000/svg";
const KINDS = ["drift", "job", "promote", "rollback", "rejected", "failed"];
const BADGE = {drift: "DRIFT", ok: "OK", none: "no data"};
const W = 860, H = 290, M = {l: 54, r: 20, t: 26, b: 42};
const config = readJson("dashboard-config") || {};
let shown = null;  // JSON text of the data on screen: a poll that brings the same data redraws nothing

function readJson(id) {
  const node = document.getElementById(id);
  return node ? JSON.parse(node.textContent) : null;
}
function fill(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(key, String(value));
  }
  for (const child of [].concat(children === undefined ? [] : children)) {
    if (child === null || child === undefined || child === false) continue;
    node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
  }
  return node;
}
const h = (tag, attrs, children) => fill(document.createElement(tag), attrs, children);
const s = (tag, attrs, children) => fill(document.createElementNS(SVG_NS, tag), attrs, children);

const isNum = (x) => typeof x === "number" && isFinite(x);
const list = (x) => (Array.isArray(x) ? x.filter((item) => item && typeof item === "object") : []);
const nameOf = (a) => String(a.name === undefined || a.name === null ? "" : a.name);
function fmt(x, digits) {
  if (!isNum(x)) return "\u2014";
  if (x !== 0 && (Math.abs(x) >= 1e5 || Math.abs(x) < 1e-3)) return x.toExponential(1);
  return x.toFixed(digits === undefined ? 2 : digits);
}
const fmtP = (p) => (!isNum(p) ? "\u2014" : p < 1e-3 ? p.toExponential(1) : p.toPrecision(2));
function version(v) {
  if (v === null || v === undefined || v === "") return "\u2014";
  return /^\d+$/.test(String(v)) ? "v" + v : String(v);
}
function time(value) {  // ms since the epoch, from an ISO 8601 string or a number of seconds; null if neither
  const t = isNum(value) ? value * 1000 : typeof value === "string" ? Date.parse(value) : NaN;
  return isNaN(t) ? null : t;
}
const fmtTime = (t) => new Date(t).toISOString().replace("T", " ").slice(0, 19) + " UTC";
const when = (value) => (time(value) !== null ? fmtTime(time(value))
  : value === null || value === undefined || value === "" ? "\u2014" : String(value));
const kindOf = (k) => (KINDS.includes(k) ? k : "other");
function stateOf(a) {
  const drift = (a.status || {}).drift;
  return drift === true ? "drift" : drift === false ? "ok" : "none";
}
const badge = (a) => h("span", {class: "badge badge-" + stateOf(a), "data-status": stateOf(a)}, BADGE[stateOf(a)]);
function safeHref(url) {
  try {
    const parsed = new URL(String(url), location.href);
    return ["http:", "https:", "file:"].includes(parsed.protocol) ? parsed.href : null;
  } catch (err) {
    return null;
  }
}

// ---------------------------------------------------------------------------------------------- scales
function niceStep(span) {
  const exp = Math.pow(10, Math.floor(Math.log10(span)));
  const f = span / exp;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * exp;
}
function linearTicks(max) {
  const step = niceStep(Math.max(max, 1e-9) / 4);
  const ticks = [];
  for (let v = 0; v < max + step * 0.999; v += step) ticks.push(+v.toPrecision(12));
  return ticks.length > 1 ? ticks : [0, step];
}
function logTicks(max) {
  const ticks = [0, 1];  // 0, 1, 3, 10, 30, 100, ...: evenly spaced on the log1p axis
  for (let k = 0; ticks[ticks.length - 1] < max; k++) ticks.push(k % 2 ? 10 ** ((k + 1) / 2) : 3 * 10 ** (k / 2));
  return ticks;
}
const MIN = 60e3, HOUR = 3600e3, DAY = 86400e3;
const TIME_STEPS = [MIN, 2 * MIN, 5 * MIN, 10 * MIN, 15 * MIN, 30 * MIN, HOUR, 2 * HOUR, 3 * HOUR, 6 * HOUR,
  12 * HOUR, DAY, 2 * DAY, 7 * DAY, 14 * DAY, 30 * DAY];
function timeTicks(x0, x1) {  // at most 7 ticks on round UTC times
  const step = TIME_STEPS.find((st) => (x1 - x0) / st <= 6) || 30 * DAY * Math.ceil((x1 - x0) / (180 * DAY));
  const out = [];
  for (let t = Math.ceil(x0 / step) * step; t <= x1; t += step) out.push(t);
  return {ticks: out, step: step};
}
function timeLabel(t, step, span) {
  const iso = new Date(t).toISOString();
  if (step >= DAY) return iso.slice(5, 10);
  return span <= 36 * HOUR ? iso.slice(11, 16) : iso.slice(5, 10) + " " + iso.slice(11, 16);
}

// ------------------------------------------------------------------------------------------ drift chart
const minWindow = (a) => (isNum(a.min_window) ? a.min_window : a.min_records);
function noChecksText(a) {
  if (!isNum(a.records) || !isNum(minWindow(a))) return "no checks yet";
  if (a.records < minWindow(a)) return `no checks yet \u2014 ${a.records} of ${minWindow(a)} records`;
  return `no checks yet \u2014 ${a.records} records collected, the first check is due`;
}

function driftChart(a) {
  const checks = list(a.history).filter((c) => isNum(c.score));
  if (!checks.length) return h("p", {class: "empty no-checks"}, noChecksText(a));
  const status = a.status || {};
  const times = checks.map((c) => time(c.checked_at));
  const byTime = times.every((t) => t !== null);
  const events = byTime ? list(a.events).filter((e) => time(e.at) !== null) : [];
  const xs = byTime ? times.concat(events.map((e) => time(e.at))) : checks.map((c, k) => k);
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  if (x1 === x0) { x0 -= byTime ? 60e3 : 1; x1 += byTime ? 60e3 : 1; }
  const px = (v) => M.l + (v - x0) / (x1 - x0) * (W - M.l - M.r);
  const xAt = (k) => px(byTime ? times[k] : k);
  const thr = checks.map((c) => (isNum(c.threshold) ? c.threshold : status.threshold));
  const thrMax = Math.max(0, ...thr.filter(isNum));
  const max = Math.max(1e-9, 1.2 * thrMax, ...checks.map((c) => c.score));  // headroom above the threshold
  const log = thrMax > 0 && max > 8 * thrMax;
  const f = log ? (v) => Math.log10(1 + Math.max(0, v)) : (v) => Math.max(0, v);
  const ticks = log ? logTicks(max) : linearTicks(max);
  const top = f(ticks[ticks.length - 1]);
  const py = (v) => H - M.b - f(v) / top * (H - M.t - M.b);

  const svg = s("svg", {class: "chart drift-chart", viewBox: `0 0 ${W} ${H}`, "data-chart": "drift",
    "data-points": checks.length, "data-scale": log ? "log" : "linear", role: "img",
    "aria-label": `drift score of ${nameOf(a)} over ${checks.length} checks`});
  versionBands(svg, checks, xAt);
  for (const v of ticks) {
    svg.appendChild(s("line", {class: "grid", x1: M.l, x2: W - M.r, y1: py(v), y2: py(v)}));
    svg.appendChild(s("text", {x: M.l - 6, y: py(v) + 4, "text-anchor": "end"}, String(v)));
  }
  const xTicks = byTime ? timeTicks(x0, x1) : {ticks: linearTicks(x1).filter((v) => v <= x1)};
  for (const v of xTicks.ticks) {
    svg.appendChild(s("line", {class: "axis", x1: px(v), x2: px(v), y1: H - M.b, y2: H - M.b + 4}));
    svg.appendChild(s("text", {x: px(v), y: H - M.b + 16, "text-anchor": "middle"},
      byTime ? timeLabel(v, xTicks.step, x1 - x0) : String(v + 1)));
  }
  svg.appendChild(s("line", {class: "axis", x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b}));
  svg.appendChild(s("line", {class: "axis", x1: M.l, x2: M.l, y1: M.t, y2: H - M.b}));
  svg.appendChild(s("text", {x: 14, y: (H - M.b + M.t) / 2, "text-anchor": "middle",
    transform: `rotate(-90 14 ${(H - M.b + M.t) / 2})`}, "score (\u2212log10 p)" + (log ? " \u00b7 log scale" : "")));
  svg.appendChild(s("text", {x: (W + M.l - M.r) / 2, y: H - 6, "text-anchor": "middle"},
    byTime ? "check time (UTC" + (x1 - x0 <= 36 * 3600e3 ? ", " + new Date(x0).toISOString().slice(0, 10) : "") + ")"
      : "check number"));
  drawThreshold(svg, checks, thr, xAt, py);
  for (const e of events) {
    const x = px(time(e.at));
    const label = `${kindOf(e.kind)} \u00b7 ${when(e.at)}${e.text ? " \u00b7 " + e.text : ""}`;
    svg.appendChild(s("line", {class: "ev-line k-" + kindOf(e.kind), x1: x, x2: x, y1: M.t, y2: H - M.b},
      s("title", null, label)));
    svg.appendChild(s("circle", {class: "ev-dot k-" + kindOf(e.kind), cx: x, cy: M.t, r: 4}, s("title", null, label)));
  }
  const d = checks.map((c, k) => (k ? "L" : "M") + xAt(k).toFixed(1) + "," + py(c.score).toFixed(1)).join(" ");
  svg.appendChild(s("path", {class: "series", d: d}));
  const dots = checks.map((c, k) => svg.appendChild(s("circle",
    {class: "pt " + (c.drift ? "pt-drift" : "pt-ok"), cx: xAt(k), cy: py(c.score), r: c.drift ? 4 : 3.2},
    s("title", null, tipLines(c).join(" \u00b7 ")))));
  const box = h("div", {class: "chart-box"}, svg);
  hover(box, svg, checks, dots, xAt, py);
  svg.setAttribute("data-rendered", "true");
  return box;
}

function versionBands(svg, checks, xAt) {
  const runs = [];
  checks.forEach((c, k) => {
    const v = version(c.version);
    if (runs.length && runs[runs.length - 1].v === v) runs[runs.length - 1].last = k;
    else runs.push({v: v, first: k, last: k});
  });
  runs.forEach((run, i) => {
    const left = i ? (xAt(runs[i - 1].last) + xAt(run.first)) / 2 : M.l;
    const right = i < runs.length - 1 ? (xAt(run.last) + xAt(runs[i + 1].first)) / 2 : W - M.r;
    svg.appendChild(s("rect", {class: "band " + (i % 2 ? "band-odd" : "band-even"), x: left, y: M.t,
      width: Math.max(0, right - left), height: H - M.t - M.b}, s("title", null, "served " + run.v)));
    if (right - left > 26) {
      svg.appendChild(s("text", {class: "band-label", x: left + 5, y: M.t - 6}, run.v));
    }
  });
}

function drawThreshold(svg, checks, thr, xAt, py) {
  const pts = [];
  thr.forEach((t, k) => { if (isNum(t)) pts.push([xAt(k), py(t)]); });
  if (!pts.length) return;
  pts.unshift([M.l, pts[0][1]]);
  pts.push([W - M.r, pts[pts.length - 1][1]]);
  const d = pts.map((p, k) => (k ? "L" : "M") + p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" ");
  svg.appendChild(s("path", {class: "threshold", d: d}));
  const last = thr.filter(isNum).pop();
  svg.appendChild(s("text", {class: "threshold-label", x: W - M.r - 4, y: pts[pts.length - 1][1] - 5,
    "text-anchor": "end"}, "threshold " + fmt(last)));
}

function tipLines(c) {
  return [when(c.checked_at), "version " + version(c.version), "score " + fmt(c.score) + " / threshold " +
    fmt(c.threshold), c.drift ? "DRIFT" : "OK"];
}

function hover(box, svg, checks, dots, xAt, py) {
  const guide = s("line", {class: "guide", y1: M.t, y2: H - M.b, visibility: "hidden"});
  svg.appendChild(guide);
  const tip = h("div", {class: "tooltip", hidden: ""});
  box.appendChild(tip);
  let current = -1;
  svg.addEventListener("mousemove", (ev) => {
    const rect = svg.getBoundingClientRect();
    const vx = (ev.clientX - rect.left) / rect.width * W;
    let best = 0;
    checks.forEach((c, k) => { if (Math.abs(xAt(k) - vx) < Math.abs(xAt(best) - vx)) best = k; });
    if (current >= 0) dots[current].classList.remove("hover");
    current = best;
    dots[best].classList.add("hover");
    guide.setAttribute("x1", xAt(best));
    guide.setAttribute("x2", xAt(best));
    guide.setAttribute("visibility", "visible");
    tip.textContent = "";
    tipLines(checks[best]).forEach((line, k) => fill(tip, null, k ? [h("br"), line] : h("strong", null, line)));
    tip.hidden = false;
    tip.classList.toggle("flip", xAt(best) > W * 0.6);
    tip.style.left = (xAt(best) / W * rect.width) + "px";
    tip.style.top = (py(checks[best].score) / H * rect.height) + "px";
  });
  svg.addEventListener("mouseleave", () => {
    tip.hidden = true;
    guide.setAttribute("visibility", "hidden");
    if (current >= 0) dots[current].classList.remove("hover");
    current = -1;
  });
}

// -------------------------------------------------------------------------------------------- bar charts
function barChart(kind, bars, opts) {
  const w = 440, hh = 230, m = {l: 46, r: 10, t: 18, b: opts.rotate ? 62 : 40};
  const max = Math.max(1, ...bars.map((b) => b.value));
  const ticks = linearTicks(max);
  const top = ticks[ticks.length - 1];
  const py = (v) => hh - m.b - v / top * (hh - m.t - m.b);
  const slot = (w - m.l - m.r) / bars.length;
  const gap = opts.edges ? Math.min(2, slot * 0.1) : slot * 0.22;
  const svg = s("svg", {class: "chart bar-chart", viewBox: `0 0 ${w} ${hh}`, "data-chart": kind,
    "data-bars": bars.length, role: "img", "aria-label": opts.title});
  for (const v of ticks) {
    svg.appendChild(s("line", {class: "grid", x1: m.l, x2: w - m.r, y1: py(v), y2: py(v)}));
    svg.appendChild(s("text", {x: m.l - 6, y: py(v) + 4, "text-anchor": "end"}, String(v)));
  }
  bars.forEach((b, k) => {
    const x = m.l + k * slot + gap / 2;
    svg.appendChild(s("rect", {class: "bar", x: x, y: py(b.value), width: Math.max(0.5, slot - gap),
      height: hh - m.b - py(b.value)}, s("title", null, b.title)));
    if (bars.length <= 16 && b.value > 0) {
      svg.appendChild(s("text", {x: x + (slot - gap) / 2, y: py(b.value) - 4, "text-anchor": "middle"}, b.value));
    }
    if (!opts.edges && (bars.length <= 24 || k % Math.ceil(bars.length / 24) === 0)) {
      const short = b.label.length > 12 ? b.label.slice(0, 11) + "\u2026" : b.label;
      const y = hh - m.b + 15, x0 = x + (slot - gap) / 2;
      svg.appendChild(s("text", opts.rotate ? {x: x0, y: y, "text-anchor": "end", transform: `rotate(-40 ${x0} ${y})`}
        : {x: x0, y: y, "text-anchor": "middle"}, short));
    }
  });
  if (opts.edges) {
    const every = Math.ceil((opts.edges.length - 1) / 5);
    opts.edges.forEach((e, k) => {
      if (k % every && k !== opts.edges.length - 1) return;
      svg.appendChild(s("text", {x: m.l + k * slot, y: hh - m.b + 15, "text-anchor": "middle"}, fmt(e, 1)));
    });
  }
  svg.appendChild(s("line", {class: "axis", x1: m.l, x2: w - m.r, y1: hh - m.b, y2: hh - m.b}));
  svg.appendChild(s("text", {x: (w + m.l - m.r) / 2, y: hh - 4, "text-anchor": "middle"}, opts.xTitle));
  svg.setAttribute("data-rendered", "true");
  return h("div", {class: "chart-box"}, svg);
}

function confidenceChart(a) {
  const hist = a.confidence_hist || {};
  const edges = Array.isArray(hist.edges) ? hist.edges : [], counts = Array.isArray(hist.counts) ? hist.counts : [];
  const ok = counts.length && edges.length === counts.length + 1 && counts.every(isNum) && edges.every(isNum);
  if (!ok || !counts.some((c) => c > 0)) return h("p", {class: "empty"}, "no predictions in the current window");
  const bars = counts.map((c, k) => ({value: c, label: fmt(edges[k], 1),
    title: `confidence ${fmt(edges[k])}\u2013${fmt(edges[k + 1])}: ${c} predictions`}));
  return barChart("confidence", bars, {edges: edges, xTitle: "top-1 confidence", title: "confidence histogram"});
}

function classChart(a) {
  let entries = Object.entries(a.class_counts || {}).filter((e) => isNum(e[1]));
  if (!entries.some((e) => e[1] > 0)) return h("p", {class: "empty"}, "no predictions in the current window");
  if (entries.length > 30) {
    entries.sort((p, q) => q[1] - p[1]);
    const rest = entries.slice(29).reduce((sum, e) => sum + e[1], 0);
    entries = entries.slice(0, 29).concat([[`${entries.length - 29} others`, rest]]);
  }
  const total = entries.reduce((sum, e) => sum + e[1], 0);
  const bars = entries.map(([label, c]) => ({value: c, label: label,
    title: `${label}: ${c} predictions (${(100 * c / total).toFixed(1)}%)`}));
  const rotate = bars.length > 10 || bars.some((b) => b.label.length > 4);
  return barChart("classes", bars, {rotate: rotate, xTitle: "predicted class", title: "predicted class counts"});
}

// ------------------------------------------------------------------------------------------ tables, lists
function table(headers, rows, numeric) {
  return h("table", null, [
    h("thead", null, h("tr", null, headers.map((x, k) => h("th", {class: numeric.includes(k) ? "num" : null}, x)))),
    h("tbody", null, rows.map((cells) => h("tr", null,
      cells.map((x, k) => h("td", {class: numeric.includes(k) ? "num" : null}, x))))),
  ]);
}

function featureTable(features) {
  const rows = Object.entries(features || {}).filter((e) => e[1] && typeof e[1] === "object");
  if (!rows.length) return h("p", {class: "empty"}, "no feature tests yet");
  const p = (f) => (isNum(f.p_adjusted) ? f.p_adjusted : isNum(f.p_value) ? f.p_value : 1);
  rows.sort((x, y) => p(x[1]) - p(y[1]));
  return table(["feature", "test", "statistic", "p-value", "adjusted p", ""], rows.map(([name, f]) => [
    name, String(f.test || "\u2014"), fmt(f.statistic, 3), fmtP(f.p_value), fmtP(f.p_adjusted),
    f.moved ? h("span", {class: "moved"}, "moved") : "",
  ]), [2, 3, 4]);
}

function metricsText(metrics) {
  return Object.entries(metrics || {}).filter((e) => isNum(e[1])).slice(0, 4)
    .map(([k, v]) => `${k} ${fmt(v, 3)}`).join(" \u00b7 ") || "\u2014";
}

function versionTable(a) {
  const versions = list(a.versions);
  if (!versions.length) return h("p", {class: "empty"}, "no versions published");
  const serving = version(a.serving_version);
  return table(["version", "role", "created", "metrics"], versions.map((v) => [
    h("strong", null, version(v.version)),
    [v.champion ? "champion" : "", version(v.version) === serving ? "serving" : ""].filter(Boolean)
      .map((role) => h("span", {class: "role"}, role)),
    when(v.created_at), metricsText(v.metrics),
  ]), []);
}

function eventList(events) {
  const items = list(events).slice().sort((x, y) => (time(y.at) || 0) - (time(x.at) || 0));
  if (!items.length) return h("p", {class: "empty"}, "no retrain events yet");
  return h("ul", {class: "plain events"}, items.map((e) => h("li", {"data-kind": kindOf(e.kind)}, [
    h("span", {class: "when"}, when(e.at)), h("span", {class: "chip k-" + kindOf(e.kind)}, String(e.kind || "event")),
    " ", String(e.text || ""),
  ])));
}

function reportList(reports) {
  const items = list(reports).slice().sort((x, y) => (time(y.at) || 0) - (time(x.at) || 0));
  if (!items.length) return h("p", {class: "empty"}, "no reports yet");
  return h("ul", {class: "plain reports"}, items.map((r) => {
    const href = safeHref(r.url);
    const text = String(r.url || "");
    return h("li", null, [h("span", {class: "when"}, when(r.at)),
      href ? h("a", {href: href, target: "_blank", rel: "noopener"}, text) : h("span", {class: "muted"}, text)]);
  }));
}

// ------------------------------------------------------------------------------------------------ page
function card(title, body, extra) {
  return h("section", {class: "card"}, [h("div", {class: "card-head"}, [h("h3", null, title), extra || null]), body]);
}

function chartCard(title, chart) {  // the legend only beside a drawn chart, not beside "no checks yet"
  return card(title, chart, chart.classList.contains("chart-box") ? legend() : null);
}

function legend() {
  const item = (cls, text) => h("span", null, [h("i", {class: "sw " + cls}), text]);
  return h("div", {class: "legend"}, [item("sw-series", "score"), item("sw-dot", "alarm"),
    item("sw-thr", "threshold"), h("span", null, "events:"), ...KINDS.map((k) => item("sw-ev k-" + k, k))]);
}

function statGrid(a) {
  const st = a.status || {};
  const stat = (label, value) => h("div", null, [h("dt", null, label), h("dd", null, value)]);
  return h("dl", {class: "stats"}, [
    stat("status", badge(a)), stat("score", fmt(st.score)), stat("threshold", fmt(st.threshold)),
    stat("p-value", fmtP(st.p_value)), stat("window", isNum(st.window_size) ? st.window_size + " records" : "\u2014"),
    stat("records now", isNum(a.records) ? (isNum(minWindow(a)) ? `${a.records} (min ${minWindow(a)})` : a.records)
      : "\u2014"),
    stat("last check", when(st.checked_at)),
  ]);
}

function section(a, i) {
  const st = a.status || {};
  return h("section", {class: "adapter", id: "adapter-" + i, "data-adapter": nameOf(a), "data-status": stateOf(a)}, [
    h("div", {class: "adapter-head"}, [h("h2", null, nameOf(a)), badge(a), h("span", {class: "muted"},
      `serving ${version(a.serving_version)} \u00b7 champion ${version(a.champion)}`)]),
    a.error ? h("p", {class: "adapter-error"}, "could not gather this adapter's data: " + String(a.error)) : null,
    statGrid(a),
    chartCard("Drift score over time", driftChart(a)),
    h("div", {class: "grid2"}, [card("Confidence (current window)", confidenceChart(a)),
      card("Predicted classes (current window)", classChart(a))]),
    card("Feature tests (last check)", featureTable(st.features)),
    h("div", {class: "grid2"}, [card("Versions", versionTable(a)), card("Retrain events", eventList(a.events))]),
    card("Drift reports", reportList(a.reports)),
  ]);
}

function overview(adapters) {
  const rows = adapters.map((a, i) => {
    const st = a.status || {};
    const row = h("tr", {"data-index": i, "data-adapter": nameOf(a)}, [
      h("td", null, h("a", {href: "#adapter=" + encodeURIComponent(nameOf(a))}, nameOf(a))), h("td", null, badge(a)),
      h("td", {class: "num"}, fmt(st.score) + " / " + fmt(st.threshold)), h("td", null, version(a.serving_version)),
      h("td", null, version(a.champion)), h("td", null, when(st.checked_at)),
    ]);
    row.addEventListener("click", () => { location.hash = "adapter=" + encodeURIComponent(nameOf(a)); });
    return row;
  });
  const drifting = adapters.filter((a) => stateOf(a) === "drift").length;
  return card(`Adapters (${adapters.length}, ${drifting} drifting)`, h("table", {id: "overview"}, [
    h("thead", null, h("tr", null, ["adapter", "status", "score / threshold", "serving", "champion", "last check"]
      .map((x, k) => h("th", {class: k === 2 ? "num" : null}, x)))),
    h("tbody", null, rows)]));
}

function selectedName(adapters) {
  const match = /^#adapter=(.*)$/.exec(location.hash);
  let wanted = null;
  try { wanted = match ? decodeURIComponent(match[1]) : null; } catch (err) { wanted = null; }
  return adapters.some((a) => nameOf(a) === wanted) ? wanted : nameOf(adapters[0]);
}

function select(adapters) {
  const name = selectedName(adapters);
  document.querySelectorAll("section.adapter").forEach((sec) => { sec.hidden = sec.dataset.adapter !== name; });
  for (const tr of document.querySelectorAll("#overview tbody tr")) {
    tr.classList.toggle("selected", tr.dataset.adapter === name);
  }
}

function render(data) {
  data = data && typeof data === "object" ? data : {};
  let adapters = list(data.adapters);
  if (typeof config.adapter === "string") adapters = adapters.filter((a) => nameOf(a) === config.adapter);
  document.getElementById("meta").textContent = [data.base_model ? "base " + data.base_model : "",
    data.engine ? "engine " + data.engine : "", data.generated_at ? "data of " + when(data.generated_at) : ""]
    .filter(Boolean).join(" \u00b7 ");
  const app = document.getElementById("app");
  app.textContent = "";
  if (!adapters.length) {
    app.appendChild(h("p", {class: "empty", id: "no-adapters"}, config.adapter ? `no adapter named ${config.adapter}`
      : "no adapters yet \u2014 publish one and it appears here"));
  } else {
    if (adapters.length > 1) app.appendChild(overview(adapters));
    adapters.forEach((a, i) => app.appendChild(section(a, i)));
    select(adapters);
  }
  window.onhashchange = () => select(adapters);
  document.body.dataset.chartCount = document.querySelectorAll("svg.chart[data-rendered='true']").length;
  document.body.dataset.rendered = "true";
}

function setLive(text, failed) {
  const live = document.getElementById("live");
  live.textContent = text;
  live.className = failed ? "live-error" : "live-ok";
}
const clock = () => new Date().toISOString().slice(11, 19) + " UTC";

function poll() {
  let busy = false;
  setInterval(() => {
    if (busy) return;
    busy = true;
    fetch(config.data_url, {cache: "no-store", headers: {Accept: "application/json"}})
      .then((r) => { if (!r.ok) throw new Error("HTTP " + r.status); return r.text(); })
      .then((text) => {
        if (text !== shown) { render(JSON.parse(text)); shown = text; }
        setLive(`live \u00b7 every ${config.refresh_s} s \u00b7 updated ${clock()}`, false);
      })
      .catch((err) => setLive(`live update failed (${err.message}); showing the data of ${clock()}`, true))
      .finally(() => { busy = false; });
  }, config.refresh_s * 1000);
}

function fail(message) {
  const box = document.getElementById("error");
  box.hidden = false;
  box.textContent = "dashboard error: " + message;
  document.body.dataset.error = message;
}
window.addEventListener("error", (ev) => fail(ev.message));
try {
  render(readJson("dashboard-data"));
  if (config.refresh_s && config.data_url) {
    setLive(`live \u00b7 every ${config.refresh_s} s`, false);
    poll();
  } else {
    setLive(config.refresh_s ? `reloads every ${config.refresh_s} s` : "snapshot", false);
  }
} catch (err) {
  fail(err && err.stack ? err.stack : String(err));
}
})();
"""

_CSP = ("default-src 'none'; script-src 'sha256-"
        + base64.b64encode(hashlib.sha256(_JS.encode("utf-8")).digest()).decode("ascii")
        + "'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'")


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "dashboard-example.html")
    out.write_text(render_dashboard(example_data()), encoding="utf-8")
    print(f"wrote {out}")
