// The department status board: today's procedures grouped by modality or room, kept current by the
// server-sent events of /api/stream. No framework and no network beyond the broker itself.
"use strict";

const state = { procedures: new Map(), token: localStorage.getItem("broker.token") || "", source: null,
                summaryTimer: null, detailId: null };
const $ = (id) => document.getElementById(id);

function today() {
  const d = new Date();
  return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, "0")}-${String(d.getDate()).padStart(2, "0")}`;
}

function filters() {
  return { date: $("f-date").value, group: $("f-group").value, modality: $("f-modality").value.trim().toUpperCase(),
           station: $("f-station").value.trim(), status: $("f-status").value, patient: $("f-patient").value.trim() };
}

function say(text) { $("message").textContent = text || ""; }

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${state.token}` } });
  if (response.status === 401 || response.status === 403) throw new Error("the API token was not accepted");
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function personName(pn) {
  const [family = "", given = ""] = (pn || "").split("=")[0].split("^");
  return given ? `${family}, ${given}` : family;
}

function clock(iso) { return iso ? iso.slice(11, 16) : "--:--"; }

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const minutes = Math.round(seconds / 60);
  return minutes < 60 ? `${minutes} min` : `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function stateClass(s) { return "s-" + s.replace(/ /g, "-"); }

// Whether a procedure (summary) passes the filters: the same rules as the API's (broker/web/listing.py):
// literal text, no wildcards; patient = the Patient ID exactly or the start of the upper-cased name.
function matches(p, f) {
  const days = p.steps.map((s) => (s.scheduled_start || "").slice(0, 10));
  if (f.date && !days.includes(f.date)) return false;
  if (f.modality && !p.steps.some((s) => s.modality === f.modality)) return false;
  if (f.station && !p.steps.some((s) => [s.station_ae_title, s.station_name, s.location].includes(f.station))) return false;
  if (f.status && p.state !== f.status) return false;
  if (f.patient && p.patient_id !== f.patient && !p.patient_name.toUpperCase().startsWith(f.patient.toUpperCase())) return false;
  return true;
}

function card(p) {
  const el = document.createElement("article");
  el.className = `card ${stateClass(p.state)}`;
  el.dataset.id = p.id;
  el.dataset.accession = p.accession_number;
  el.dataset.state = p.state;
  const row1 = document.createElement("div");
  row1.className = "row";
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = clock(p.scheduled_start);
  const badge = document.createElement("span");
  badge.className = `state ${stateClass(p.state)}`;
  badge.textContent = p.state;
  row1.append(time, badge);
  const patient = document.createElement("div");
  patient.className = "patient";
  patient.textContent = `${personName(p.patient_name)} (${p.patient_id})`;
  const desc = document.createElement("div");
  desc.className = "desc";
  desc.textContent = `${p.accession_number} · ${p.description || p.modality}`;
  el.append(row1, patient, desc);
  el.addEventListener("click", () => showDetail(p.id));
  return el;
}

function render(flashIds = new Set()) {
  const f = filters();
  const groups = new Map();
  const shown = [...state.procedures.values()].filter((p) => matches(p, f))
    .sort((a, b) => (a.scheduled_start || "").localeCompare(b.scheduled_start || "") || a.id - b.id);
  for (const p of shown) {
    const key = (f.group === "room" ? p.room : p.modality) || "(unassigned)";
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(p);
  }
  const container = $("groups");
  container.replaceChildren();
  if (!shown.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = state.token ? "No procedures for these filters." : "Enter an API token to see procedures.";
    container.append(empty);
  }
  for (const key of [...groups.keys()].sort()) {
    const section = document.createElement("section");
    section.className = "group";
    section.dataset.group = key;
    const title = document.createElement("h2");
    title.textContent = key + " ";
    const count = document.createElement("small");
    count.textContent = `${groups.get(key).length}`;
    title.append(count);
    section.append(title);
    for (const p of groups.get(key)) {
      const el = card(p);
      if (flashIds.has(p.id)) {
        el.classList.add("flash");
        setTimeout(() => el.classList.remove("flash"), 1500);
      }
      section.append(el);
    }
    container.append(section);
  }
}

async function loadProcedures() {
  const f = filters();
  const query = new URLSearchParams({ limit: "1000" });
  for (const key of ["date", "modality", "station", "status", "patient"]) if (f[key]) query.set(key, f[key]);
  const page = await api(`/api/procedures?${query}`);
  state.procedures = new Map(page.items.map((p) => [p.id, p]));
  render();
}

async function loadSummary() {
  const f = filters();
  const summary = await api(`/api/board/summary?date=${encodeURIComponent(f.date || today())}`);
  const counts = $("counts");
  counts.replaceChildren();
  const entries = [["total", summary.total], ...Object.entries(summary.by_state).sort()];
  for (const [name, value] of entries) {
    const dt = document.createElement("dt"); dt.textContent = name;
    const dd = document.createElement("dd"); dd.textContent = value;
    counts.append(dt, dd);
  }
  const labels = { order_to_start: "order → start", start_to_complete: "start → complete",
                   complete_to_images: "complete → images available" };
  const turnaround = $("turnaround");
  turnaround.replaceChildren();
  for (const [key, label] of Object.entries(labels)) {
    const figure = summary.turnaround[key];
    const dt = document.createElement("dt"); dt.textContent = label;
    const dd = document.createElement("dd");
    dd.dataset.figure = key;
    dd.textContent = `${duration(figure.median_seconds)} (${figure.count})`;
    turnaround.append(dt, dd);
  }
  drawChart(summary.by_hour);
}

// Bars per hour: the day's procedures (light) and those done (dark), as inline SVG.
function drawChart(hours) {
  const ns = "http://www.w3.org/2000/svg";
  const width = 240, height = 110, base = 95, barWidth = width / 24;
  const max = Math.max(1, ...hours.map((h) => h.total));
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "procedures by hour");
  for (const h of hours) {
    for (const [kind, value] of [["total", h.total], ["done", h.done]]) {
      if (!value) continue;
      const bar = document.createElementNS(ns, "rect");
      const barHeight = (value / max) * (base - 10);
      bar.setAttribute("x", String(h.hour * barWidth + 1));
      bar.setAttribute("y", String(base - barHeight));
      bar.setAttribute("width", String(barWidth - 2));
      bar.setAttribute("height", String(barHeight));
      bar.setAttribute("class", `bar-${kind}`);
      const title = document.createElementNS(ns, "title");
      title.textContent = `${String(h.hour).padStart(2, "0")}:00 ${kind}: ${value}`;
      bar.append(title);
      svg.append(bar);
    }
    if (h.hour % 3 === 0) {
      const label = document.createElementNS(ns, "text");
      label.setAttribute("x", String(h.hour * barWidth));
      label.setAttribute("y", String(height - 3));
      label.textContent = String(h.hour).padStart(2, "0");
      svg.append(label);
    }
  }
  const axis = document.createElementNS(ns, "line");
  axis.setAttribute("x1", "0"); axis.setAttribute("x2", String(width));
  axis.setAttribute("y1", String(base)); axis.setAttribute("y2", String(base));
  axis.setAttribute("stroke", "#495057");
  svg.append(axis);
  $("chart").replaceChildren(svg);
}

async function showDetail(id) {
  state.detailId = id;
  const p = await api(`/api/procedures/${id}`);
  const body = $("detail-body");
  body.replaceChildren();
  const head = document.createElement("p");
  head.textContent = `${p.accession_number} · ${personName(p.patient_name)} · ${p.state}`;
  const list = document.createElement("ol");
  list.className = "timeline";
  const lines = [{ at: (p.ordered_at || "").replace("T", " "), to: "SCHEDULED", cause: "order received" },
                 ...p.timeline];
  for (const t of lines) {
    const li = document.createElement("li");
    const when = document.createElement("span");
    when.className = "when";
    when.textContent = `${(t.at || "").slice(11, 19)} `;
    const what = document.createElement("strong");
    what.textContent = t.to;
    li.append(when, what, document.createTextNode(` — ${t.cause}`));
    list.append(li);
  }
  body.append(head, list);
  $("detail").hidden = false;
}

function scheduleSummary() {
  clearTimeout(state.summaryTimer);
  state.summaryTimer = setTimeout(() => loadSummary().catch((e) => say(e.message)), 300);
}

function connect() {
  if (state.source) state.source.close();
  if (!state.token) return;
  const source = new EventSource(`/api/stream?token=${encodeURIComponent(state.token)}`);
  state.source = source;
  // The stream reports every change from its opening on: reload then, so nothing falls in between.
  source.onopen = () => { $("live").textContent = "live"; $("live").className = "live on"; reload(); };
  source.onerror = () => { $("live").textContent = "reconnecting"; $("live").className = "live off"; };
  source.addEventListener("procedures", (event) => {
    const changed = JSON.parse(event.data);
    const ids = new Set();
    for (const p of changed) { state.procedures.set(p.id, p); ids.add(p.id); }
    render(ids);
    scheduleSummary();
    if (state.detailId !== null && ids.has(state.detailId)) showDetail(state.detailId).catch(() => {});
  });
}

async function reload() {
  say("");
  try {
    await Promise.all([loadProcedures(), loadSummary()]);
  } catch (error) {
    say(error.message);
  }
}

function start() {
  $("f-date").value = today();
  $("token").value = state.token;
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token").value.trim();
    localStorage.setItem("broker.token", state.token);
    connect();
    reload();
  });
  for (const id of ["f-date", "f-modality", "f-station", "f-status", "f-patient"]) {
    $(id).addEventListener("change", reload);
  }
  $("f-group").addEventListener("change", () => render());
  $("detail-close").addEventListener("click", () => { $("detail").hidden = true; state.detailId = null; });
  render();
  if (state.token) { connect(); reload(); }
  // Changes without a state transition (a reschedule, a patient update) are not pushed: reload now and then.
  setInterval(() => { if (state.token) reload(); }, 60000);
}

start();
