// shoal's live dashboard: polls /dashboard/data (the same origin, so a browser resends the
// Basic credentials it was asked for) and redraws. No dependencies, nothing fetched elsewhere.
"use strict";

const POLL_MS = 500;
const HISTORY_POINTS = 240; // two minutes at POLL_MS
const history = [];
let seq = 0;

function fmt(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "-";
  return Number(value).toFixed(digits === undefined ? 0 : digits);
}

function ms(seconds) {
  return seconds === null || seconds === undefined ? "-" : fmt(seconds * 1000, 1) + " ms";
}

function setValue(id, value, text) {
  const el = document.getElementById(id);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
  el.textContent = text === undefined ? fmt(value) : text;
}

function cell(row, text, attrs) {
  const td = document.createElement("td");
  if (typeof text === "object" && text !== null) td.appendChild(text);
  else td.textContent = text;
  for (const [k, v] of Object.entries(attrs || {})) td.setAttribute(k, v);
  row.appendChild(td);
  return td;
}

function kvBar(usage) {
  const wrap = document.createElement("span");
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = fmt(Math.min(Math.max(usage, 0), 1) * 100) + "%";
  bar.appendChild(fill);
  wrap.appendChild(bar);
  wrap.appendChild(document.createTextNode(fmt(usage * 100, 1) + "%"));
  return wrap;
}

function renderEngines(engines) {
  const body = document.querySelector("#engines tbody");
  body.replaceChildren();
  for (const e of engines) {
    const row = document.createElement("tr");
    row.id = "engine-" + e.engine;
    cell(row, "EngineCore_" + e.engine);
    const state = cell(row, e.state, { title: e.down_reason || "" });
    if (e.state !== "up") state.className = "down";
    cell(row, fmt(e.running), { "data-field": "running", "data-value": e.running });
    cell(row, fmt(e.waiting), { "data-field": "waiting", "data-value": e.waiting });
    cell(row, kvBar(e.kv_cache_usage), { "data-field": "kv_cache_usage", "data-value": e.kv_cache_usage });
    const hit = e.prefix_cache_hit_rate;
    cell(row, hit === null ? "-" : fmt(hit * 100, 1) + "%", { "data-field": "prefix_cache_hit_rate", "data-value": hit === null ? "" : hit });
    cell(row, fmt(e.prompt_tokens_per_s, 1), { "data-field": "prompt_tokens_per_s", "data-value": e.prompt_tokens_per_s });
    cell(row, fmt(e.generation_tokens_per_s, 1), { "data-field": "generation_tokens_per_s", "data-value": e.generation_tokens_per_s });
    cell(row, ms(e.ttft_s.p50) + " / " + ms(e.ttft_s.p99));
    cell(row, ms(e.itl_s.p50) + " / " + ms(e.itl_s.p99));
    cell(row, fmt(e.preemptions_total), { "data-field": "preemptions_total", "data-value": e.preemptions_total });
    cell(row, fmt(e.prompt_tokens_total), { "data-field": "prompt_tokens_total", "data-value": e.prompt_tokens_total });
    cell(row, fmt(e.generation_tokens_total), { "data-field": "generation_tokens_total", "data-value": e.generation_tokens_total });
    body.appendChild(row);
  }
}

function renderLatency(latency, windowS) {
  document.getElementById("latency-window").textContent = "last " + fmt(windowS / 60, 1) + " min";
  const body = document.querySelector("#latency tbody");
  body.replaceChildren();
  for (const [name, key] of [["time to first token", "ttft_s"], ["inter-token latency", "itl_s"]]) {
    const l = latency[key];
    const row = document.createElement("tr");
    row.id = "latency-" + key;
    cell(row, name);
    for (const p of ["p50", "p90", "p99"]) cell(row, ms(l[p]), { "data-field": p, "data-value": l[p] === null ? "" : l[p] });
    cell(row, fmt(l.count), { "data-field": "count", "data-value": l.count });
    body.appendChild(row);
  }
}

function renderRequests(requests) {
  const body = document.querySelector("#requests tbody");
  body.replaceChildren();
  const rows = [["received", "received_total", requests.received_total]];
  for (const [reason, n] of Object.entries(requests.finished_total)) rows.push(["finished: " + reason, "finished_" + reason, n]);
  rows.push(["rejected (queue full)", "rejected_total", requests.rejected_total]);
  for (const [label, key, value] of rows) {
    const row = document.createElement("tr");
    cell(row, label);
    cell(row, fmt(value), { id: "requests-" + key, "data-value": value === null ? "" : value });
    body.appendChild(row);
  }
}

function renderServers(servers) {
  const body = document.querySelector("#servers tbody");
  body.replaceChildren();
  for (const s of servers) {
    const row = document.createElement("tr");
    row.id = "server-" + s.index;
    cell(row, s.name);
    cell(row, String(s.pid));
    cell(row, fmt(s.in_flight), { "data-field": "in_flight", "data-value": s.in_flight === null ? "" : s.in_flight });
    body.appendChild(row);
  }
}

function renderErrors(errors) {
  const list = document.getElementById("errors");
  list.replaceChildren();
  if (!errors.length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = "none";
    list.appendChild(li);
  }
  for (const e of errors) {
    const li = document.createElement("li");
    const when = new Date(e.time * 1000).toLocaleTimeString();
    li.textContent = when + "  ApiServer_" + e.server + "  " + e.kind + ": " + e.message;
    list.appendChild(li);
  }
}

function drawRates() {
  const canvas = document.getElementById("rates");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const peak = Math.max(1, ...history.map((p) => Math.max(p.in, p.out)));
  ctx.fillStyle = "#8a96a3";
  ctx.font = "11px sans-serif";
  ctx.fillText(fmt(peak, 0) + " tok/s", 4, 12);
  for (const [key, color] of [["in", "#4aa3df"], ["out", "#7ccf7c"]]) {
    ctx.strokeStyle = color;
    ctx.beginPath();
    history.forEach((p, i) => {
      const x = (i / (HISTORY_POINTS - 1)) * w;
      const y = h - 4 - (p[key] / peak) * (h - 20);
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
}

function render(view) {
  document.getElementById("model").textContent = view.model;
  const t = view.totals;
  setValue("total-running", t.running);
  setValue("total-waiting", t.waiting);
  setValue("total-in-rate", t.prompt_tokens_per_s, fmt(t.prompt_tokens_per_s, 1));
  setValue("total-out-rate", t.generation_tokens_per_s, fmt(t.generation_tokens_per_s, 1));
  setValue("in-flight", view.requests.in_flight);
  setValue("total-generated", t.generation_tokens_total);
  renderEngines(view.engines);
  renderLatency(view.latency, view.latency_window_s);
  renderRequests(view.requests);
  renderServers(view.servers);
  renderErrors(view.errors);
  history.push({ in: t.prompt_tokens_per_s, out: t.generation_tokens_per_s });
  while (history.length > HISTORY_POINTS) history.shift();
  drawRates();
  seq += 1;
  const updated = document.getElementById("updated");
  updated.dataset.seq = String(seq);
  updated.textContent = new Date(view.time * 1000).toLocaleTimeString();
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("/dashboard/data", { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    status.textContent = "live";
    status.className = "status live";
  } catch (err) {
    status.textContent = "no data: " + err.message;
    status.className = "status stale";
  }
  setTimeout(poll, POLL_MS);
}

poll();
