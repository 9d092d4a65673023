// The usage dashboard: /v1/usage over a range in the browser's time zone, live engine gauges, batch jobs.
//
// The range inputs are local times; the browser turns them into Unix seconds, and its IANA time zone
// goes to /v1/usage as `tz` so that "day" groups are the reader's days. The totals are the server's
// own ungrouped report (percentiles do not add up across groups), not sums made here. What a key may
// see is decided by /v1/usage: a team key gets its team's rows only.

import { formatMs, formatUsd, getJson } from "./api.js";

const $ = (id) => document.getElementById(id);
const TZ = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
const LIVE_MS = 2000;

let costChart = null;
let latencyChart = null;
let liveTimer = null;
let previous = new Map();  // deployment id -> {time, tokens}: the last poll, for tokens/s
let usageSeq = 0;          // only the latest request's answer is drawn, whatever order answers come in

function localInput(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:`
    + `${pad(date.getMinutes())}`;
}

// the last `days` local days, today included: [midnight days-1 ago, midnight tomorrow)
function setRange(days) {
  const end = new Date();
  end.setHours(24, 0, 0, 0);
  const start = new Date(end);
  start.setDate(start.getDate() - days);
  $("range-start").value = localInput(start);
  $("range-end").value = localInput(end);
}

function seconds(input) {
  // a datetime-local value has no zone: Date reads it as local time, as the person meant it
  return new Date(input.value).getTime() / 1000;
}

const formatShare = (v) => `${(v * 100).toFixed(1)}%`;

const COLUMNS = [
  ["requests", "Requests", String],
  ["errors", "Errors", String],
  ["prompt_tokens", "Prompt", String],
  ["completion_tokens", "Completion", String],
  ["cached_share", "Cached", formatShare],
  ["cost_usd", "Cost", formatUsd],
  ["latency_p50_s", "P50", formatMs],
  ["latency_p95_s", "P95", formatMs],
  ["latency_p99_s", "P99", formatMs],
  ["ttft_p50_s", "TTFT P50", formatMs],
  ["ttft_p95_s", "TTFT P95", formatMs],
  ["ttft_p99_s", "TTFT P99", formatMs],
];

const TOTALS = [
  ["requests", "Requests", String],
  ["errors", "Errors", String],
  ["total_tokens", "Tokens", String],
  ["cached_share", "Cached share", formatShare],
  ["cost_usd", "Cost", formatUsd],
  ["latency_p50_s", "Latency P50", formatMs],
  ["latency_p95_s", "Latency P95", formatMs],
  ["latency_p99_s", "Latency P99", formatMs],
  ["ttft_p50_s", "TTFT P50", formatMs],
  ["ttft_p95_s", "TTFT P95", formatMs],
  ["ttft_p99_s", "TTFT P99", formatMs],
];

function cell(tag, text, attrs = {}) {
  const el = document.createElement(tag);
  el.textContent = text;
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function renderTotals(total) {
  $("totals").replaceChildren(...TOTALS.map(([key, label, fmt]) => {
    const card = document.createElement("div");
    card.className = "card";
    // the raw number rides along so that what is shown can be checked against the API exactly
    card.append(cell("div", label, { class: "label" }),
                cell("div", fmt(total[key]), { class: "value", "data-total": key, "data-value": String(total[key]) }));
    return card;
  }));
}

function renderTable(groupBy, rows) {
  const table = $("usage-table");
  const head = document.createElement("tr");
  if (groupBy) head.append(cell("th", groupBy, { scope: "col", class: "group" }));
  for (const [, label] of COLUMNS) head.append(cell("th", label, { scope: "col" }));
  table.tHead.replaceChildren(head);
  table.tBodies[0].replaceChildren(...rows.map((row) => {
    const tr = document.createElement("tr");
    if (groupBy) tr.append(cell("th", row[groupBy], { scope: "row", class: "group" }));
    for (const [key, , fmt] of COLUMNS) {
      tr.append(cell("td", fmt(row[key]), { "data-key": key, "data-value": String(row[key]) }));
    }
    return tr;
  }));
  if (!rows.length) {
    const tr = document.createElement("tr");
    tr.append(cell("td", "No requests in this range.", { colspan: String(COLUMNS.length + 1) }));
    table.tBodies[0].append(tr);
  }
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function renderCharts(groupBy, rows) {
  if (!window.Chart) return;  // the library failed to load: the table still says everything
  const labels = rows.map((r) => (groupBy ? r[groupBy] : "total"));
  const fg = cssVar("--fg");
  const grid = cssVar("--line");
  const scale = (title, position, extra = {}) => ({
    position, title: { display: true, text: title, color: fg }, ticks: { color: fg }, grid: { color: grid }, ...extra,
  });
  const common = { responsive: true, maintainAspectRatio: false, animation: false,
                   plugins: { legend: { labels: { color: fg } } } };
  if (costChart) costChart.destroy();
  costChart = new window.Chart($("chart-cost"), {
    type: "bar",
    data: { labels, datasets: [
      { label: "Cost (USD)", data: rows.map((r) => r.cost_usd), backgroundColor: cssVar("--chart-1"),
        yAxisID: "cost" },
      { label: "Tokens", data: rows.map((r) => r.total_tokens), backgroundColor: cssVar("--chart-2"),
        yAxisID: "tokens" },
    ] },
    options: { ...common, scales: {
      x: scale("", "bottom"),
      cost: scale("USD", "left", { beginAtZero: true }),
      tokens: scale("tokens", "right", { beginAtZero: true, grid: { drawOnChartArea: false } }),
    } },
  });
  if (latencyChart) latencyChart.destroy();
  const ms = (key) => rows.map((r) => (r[key] === null ? null : r[key] * 1000));
  latencyChart = new window.Chart($("chart-latency"), {
    type: "bar",
    data: { labels, datasets: [
      { label: "P50 ms", data: ms("latency_p50_s"), backgroundColor: cssVar("--chart-3") },
      { label: "P95 ms", data: ms("latency_p95_s"), backgroundColor: cssVar("--chart-2") },
      { label: "P99 ms", data: ms("latency_p99_s"), backgroundColor: cssVar("--chart-4") },
      { label: "TTFT P50 ms", data: ms("ttft_p50_s"), backgroundColor: cssVar("--chart-1") },
    ] },
    options: { ...common, scales: { x: scale("", "bottom"), y: scale("ms", "left", { beginAtZero: true }) } },
  });
}

export async function loadUsage(event) {
  if (event) event.preventDefault();
  $("usage-error").textContent = "";
  const start = seconds($("range-start"));
  const end = seconds($("range-end"));
  if (!(end > start)) {
    $("usage-error").textContent = "The range must end after it starts.";
    return;
  }
  const groupBy = $("group-by").value;
  const range = { start, end, tz: TZ };
  $("totals").setAttribute("aria-busy", "true");
  const seq = ++usageSeq;
  try {
    const [total, grouped] = await Promise.all([
      getJson("/v1/usage", range),
      groupBy ? getJson("/v1/usage", { ...range, group_by: groupBy }) : null,
    ]);
    if (seq !== usageSeq) return;
    renderTotals(total.data[0]);
    const rows = grouped ? grouped.data : total.data;
    renderTable(groupBy, rows);
    renderCharts(groupBy, rows);
    $("totals").dataset.start = String(start);
    $("totals").dataset.end = String(end);
    $("totals").dataset.groupBy = groupBy;
  } catch (err) {
    if (seq === usageSeq) $("usage-error").textContent = err.message;
  } finally {
    if (seq === usageSeq) $("totals").removeAttribute("aria-busy");
  }
}

async function loadLive() {
  try {
    const body = await getJson("/v1/deployments");
    $("live-error").textContent = "";
    const rows = body.data.map((d) => {
      const tr = document.createElement("tr");
      const e = d.engine;
      let tps = "–";
      if (e) {
        const before = previous.get(d.id);
        if (before && body.time > before.time) {
          tps = ((e.generation_tokens_total - before.tokens) / (body.time - before.time)).toFixed(1);
        }
        previous.set(d.id, { time: body.time, tokens: e.generation_tokens_total });
      }
      const kv = document.createElement("td");
      if (e) {
        const meter = cell("meter", "", { min: "0", max: "1", value: String(e.kv_cache_usage),
                                          "aria-label": `KV cache ${(e.kv_cache_usage * 100).toFixed(0)}% used` });
        kv.append(meter, ` ${(e.kv_cache_usage * 100).toFixed(0)}%`);
      } else {
        kv.textContent = "–";
      }
      tr.append(cell("th", d.model, { scope: "row" }), cell("td", `${d.id} (${d.kind})`),
                cell("td", d.healthy ? "yes" : "no"), cell("td", String(d.in_flight)),
                cell("td", e ? String(e.running) : "–"), cell("td", e ? String(e.waiting) : "–"), kv,
                cell("td", tps, { "data-key": "tps" }));
      tr.dataset.deployment = d.id;
      return tr;
    });
    $("live-table").tBodies[0].replaceChildren(...rows);
  } catch (err) {
    $("live-error").textContent = err.message;
  }
}

async function loadBatches() {
  try {
    const body = await getJson("/v1/batches", { limit: 20 });
    $("batch-error").textContent = "";
    const rows = body.data.map((b) => {
      const counts = b.request_counts || { total: 0, completed: 0, failed: 0 };
      const done = counts.completed + counts.failed;
      const progress = cell("progress", "", { max: String(Math.max(counts.total, 1)), value: String(done),
                                              "aria-label": `${done} of ${counts.total} lines done` });
      const td = document.createElement("td");
      td.append(progress, ` ${done}/${counts.total}`);
      const created = b.created_at ? new Date(b.created_at * 1000).toLocaleString() : "–";
      const tr = document.createElement("tr");
      tr.append(cell("th", b.id, { scope: "row" }), cell("td", b.status), cell("td", b.endpoint),
                cell("td", created), td);
      return tr;
    });
    if (!rows.length) {
      const tr = document.createElement("tr");
      tr.append(cell("td", "No batch jobs.", { colspan: "5" }));
      rows.push(tr);
    }
    $("batch-table").tBodies[0].replaceChildren(...rows);
  } catch (err) {
    $("batch-error").textContent = err.message;
  }
}

export function showDashboard(visible) {
  clearInterval(liveTimer);
  liveTimer = null;
  if (!visible) return;
  loadUsage();
  loadLive();
  loadBatches();
  liveTimer = setInterval(() => { loadLive(); loadBatches(); }, LIVE_MS);
}

export function initDashboard() {
  $("tz-name").textContent = TZ;
  setRange(7);
  $("range-form").addEventListener("submit", loadUsage);
  for (const button of document.querySelectorAll("[data-range]")) {
    button.addEventListener("click", () => { setRange(Number(button.dataset.range)); loadUsage(); });
  }
}
