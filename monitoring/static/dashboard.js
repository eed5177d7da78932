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
    stat("est. accuracy", accuracyText(a)),
  ]);
}

// the accuracy estimated without labels for the last check's window, and what labels measured for its version
function accuracyText(a) {
  const st = a.status || {}, m = a.measured_accuracy || {};
  const pct = (x) => (100 * x).toFixed(1) + "%";
  const est = isNum(st.estimated_accuracy) ? pct(st.estimated_accuracy) : "\u2014";
  return isNum(m.accuracy) ? `${est} (labels: ${pct(m.accuracy)} of ${m.labels})` : est;
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
      h("td", null, version(a.champion)), h("td", {class: "num"}, accuracyText(a)), h("td", null, when(st.checked_at)),
    ]);
    row.addEventListener("click", () => { location.hash = "adapter=" + encodeURIComponent(nameOf(a)); });
    return row;
  });
  const drifting = adapters.filter((a) => stateOf(a) === "drift").length;
  return card(`Adapters (${adapters.length}, ${drifting} drifting)`, h("table", {id: "overview"}, [
    h("thead", null, h("tr", null, ["adapter", "status", "score / threshold", "serving", "champion", "est. accuracy",
      "last check"].map((x, k) => h("th", {class: k === 2 || k === 5 ? "num" : null}, x)))),
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
