"""The HTML dashboard (GET /dashboard): one self-contained page, a section per adapter. Pure rendering, no I/O.

render_dashboard(data) returns a single HTML document with inline CSS and inline vanilla JavaScript and nothing
else: no CDN, no fonts, no images, so it works offline, behind a proxy and opened from file://. A Content-Security-
Policy meta tag (script allowed by its sha256 only, connect-src 'self') makes the browser enforce that. The page
template, CSS and JavaScript are files packaged beside this module (monitoring/static/dashboard.{html,css,js},
shipped by pyproject's package-data and bentofile.yaml's include), read once at import through importlib.resources;
the script's hash is computed from the file then, so editing dashboard.js needs no other change. The data
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
import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from string import Template
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
    measured_accuracy: dict[str, Any] | None  # {"accuracy", "labels", "version"}: labels of served predictions
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


# ------------------------------------------------------------------------------------------ page assets


def _asset(name: str) -> str:
    """The text of monitoring/static/<name>, wherever the package is installed (a checkout, a wheel, a Bento)."""
    return resources.files("monitoring").joinpath("static").joinpath(name).read_text(encoding="utf-8")


# Each asset starts on the line after its opening tag, so view-source reads like the file. The CSP hash covers
# exactly the text between <script> and </script>: that is _JS, newline included.
# Template: its $names are filled with values that are never scanned for placeholders themselves, so the "$" of
# the script's template literals, or of an adapter name, goes through as it is.
_PAGE = Template(_asset("dashboard.html"))
_CSS = "\n" + _asset("dashboard.css")
_JS = "\n" + _asset("dashboard.js")
_CSP = ("default-src 'none'; script-src 'sha256-"
        + base64.b64encode(hashlib.sha256(_JS.encode("utf-8")).digest()).decode("ascii")
        + "'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'")


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
    return _PAGE.substitute(csp=_CSP, meta_refresh=meta_refresh, title=html.escape(title), css=_CSS,
                            noscript=_noscript(adapters or []), config=_script_json(config),
                            data=_script_json(clean), js=_JS)


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


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "dashboard-example.html")
    out.write_text(render_dashboard(example_data()), encoding="utf-8")
    print(f"wrote {out}")
