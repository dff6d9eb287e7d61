// The department status board: today's procedures grouped by modality or room, kept current by the
// server-sent events of /api/stream. No framework and no network beyond the broker itself.
"use strict";

const state = { procedures: new Map(), token: localStorage.getItem("broker.token") || "", source: null,
                summaryTimer: null, detailId: null, flags: new Map(), zone: "", today: "", lastEvent: 0,
                retryMs: 1000, reconnectTimer: null };
const $ = (id) => document.getElementById(id);
const WATCHDOG_MS = 40000;  // the server pings every 15 s: silence this long means a dead connection

// "Today" is the broker's (its time zone, setting BROKER_TIMEZONE), not the browser's: the summary says
// which day it is there; until it has answered, the date filter stays empty (= the server's today).
function today() { return state.today; }

function viewerZone() { return Intl.DateTimeFormat().resolvedOptions().timeZone; }

// A time sent with its offset, shown in the broker's zone (and the zone named when it is not the viewer's).
function zoned(iso, withSeconds = false) {
  if (!iso) return "--:--";
  const options = { hour: "2-digit", minute: "2-digit", hourCycle: "h23" };
  if (withSeconds) options.second = "2-digit";
  if (state.zone) options.timeZone = state.zone;
  return new Intl.DateTimeFormat("en-GB", options).format(new Date(iso));
}

function setZone(zone) {
  state.zone = zone || "";
  $("zone-note").textContent = state.zone && state.zone !== viewerZone() ? `times: ${state.zone}` : "";
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

// Scheduled starts are the RIS's wall-clock times of the broker's zone, sent without an offset: shown as they are.
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
  const flag = state.flags.get(p.id);
  el.className = `card ${stateClass(p.state)}${flag ? " flagged" : ""}`;
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
  if (flag) {
    const label = document.createElement("div");
    label.className = "flag";
    label.dataset.rule = flag.rule;
    label.textContent = `⚠ ${flag.label}`;
    el.append(label);
  }
  // A card opens its timeline by click, or from the keyboard (Tab to it, Enter or Space).
  el.tabIndex = 0;
  el.setAttribute("role", "button");
  // (its name is its text, as seen: WCAG 2.5.3 "label in name")
  el.addEventListener("click", () => showDetail(p.id));
  el.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); showDetail(p.id); }
  });
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

async function loadAlerts() {
  const f = filters();
  const query = f.date ? `?date=${encodeURIComponent(f.date)}` : "";
  const found = await api(`/api/board/alerts${query}`);
  state.flags = new Map(found.alerts.map((a) => [a.procedure_id, a]));
  const names = { not_started: "late (not started)", overrunning: "overrunning", images_missing: "images missing" };
  const list = $("alert-counts");
  list.replaceChildren();
  for (const [rule, count] of Object.entries(found.counts)) {
    const dt = document.createElement("dt"); dt.textContent = names[rule] || rule;
    const dd = document.createElement("dd"); dd.dataset.rule = rule; dd.textContent = count;
    list.append(dt, dd);
  }
}

async function loadSummary() {
  const f = filters();
  const query = f.date ? `?date=${encodeURIComponent(f.date)}` : "";
  const summary = await api(`/api/board/summary${query}`);
  setZone(summary.zone);
  if (!f.date && !state.today) { state.today = summary.date; $("f-date").value = summary.date; }
  $("figures-title").textContent = summary.date === state.today ? "Today" : summary.date;
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
  const rows = $("modalities").querySelector("tbody");
  rows.replaceChildren();
  for (const [modality, figures] of Object.entries(summary.by_modality)) {
    const tr = document.createElement("tr");
    tr.dataset.modality = modality;
    const head = document.createElement("th");
    head.scope = "row";
    head.textContent = modality || "(none)";
    tr.append(head);
    for (const value of [figures.done, figures.to_do, duration(figures.waiting.median_seconds),
                         duration(figures.start_to_complete.median_seconds)]) {
      const td = document.createElement("td"); td.textContent = value; tr.append(td);
    }
    rows.append(tr);
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

// The timeline as people read it ("MPPS from CT01: in progress"); the stored cause with its UID is
// behind a details toggle.
async function showDetail(id) {
  state.detailId = id;
  const [p, history] = await Promise.all([api(`/api/procedures/${id}`), api(`/api/board/timeline/${id}`)]);
  setZone(history.zone);
  const body = $("detail-body");
  body.replaceChildren();
  const head = document.createElement("p");
  head.textContent = `${p.accession_number} · ${personName(p.patient_name)} · ${p.state}`;
  const list = document.createElement("ol");
  list.className = "timeline";
  for (const t of history.entries) {
    const li = document.createElement("li");
    const when = document.createElement("span");
    when.className = "when";
    when.textContent = `${zoned(t.at, true)} `;
    const what = document.createElement("strong");
    what.textContent = t.to;
    li.append(when, what, document.createTextNode(` — ${t.text}`));
    if (t.ref) {
      const details = document.createElement("details");
      const summary = document.createElement("summary");
      summary.textContent = "details";
      const raw = document.createElement("code");
      raw.textContent = `${t.kind} ${t.ref}: ${t.cause}`;
      details.append(summary, raw);
      li.append(details);
    }
    list.append(li);
  }
  body.append(head, list);
  $("detail").hidden = false;
}

function scheduleSummary() {
  clearTimeout(state.summaryTimer);
  state.summaryTimer = setTimeout(() => Promise.all([loadSummary(), loadAlerts()]).then(() => render())
    .catch((e) => say(e.message)), 300);
}

function offline() { $("live").textContent = "reconnecting"; $("live").className = "live off"; }

function connect() {
  if (state.source) state.source.close();
  state.source = null;
  clearTimeout(state.reconnectTimer);
  if (!state.token) return;
  const source = new EventSource(`/api/stream?token=${encodeURIComponent(state.token)}`);
  state.source = source;
  state.lastEvent = Date.now();
  const heard = () => { state.lastEvent = Date.now(); };
  // The stream reports every change from its opening on: reload then, so nothing falls in between.
  source.onopen = () => {
    heard(); state.retryMs = 1000; $("live").textContent = "live"; $("live").className = "live on"; reload();
  };
  source.onerror = () => {
    offline();
    // EventSource retries by itself after a network error but gives up after an HTTP error (a proxy's
    // 502 during a restart): then start again, waiting longer each time (at most 15 s).
    if (source.readyState === EventSource.CLOSED) {
      state.reconnectTimer = setTimeout(connect, state.retryMs);
      state.retryMs = Math.min(state.retryMs * 2, 15000);
    }
  };
  source.addEventListener("ping", heard);
  source.addEventListener("alerts", () => { heard(); scheduleSummary(); });
  source.addEventListener("procedures", (event) => {
    heard();
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
    await Promise.all([loadSummary(), loadAlerts()]);
    await loadProcedures();
  } catch (error) {
    say(error.message);
  }
}

function start() {
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
  setInterval(() => { if (state.source && Date.now() - state.lastEvent > WATCHDOG_MS) { offline(); connect(); } }, 5000);
}

start();
