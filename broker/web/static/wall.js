// The wall view (/board?wall=1): today's procedures in one column per modality (or room with
// &group=room), patients as the broker's privacy setting allows, delays written out, a clock in the
// broker's time zone and the connection state. No controls: it reconnects by itself after a network
// or broker restart, and cycles the pages of a column that does not fit the screen.
"use strict";

const TOKEN_KEY = "broker.wall.token";
const PAGE_SECONDS = 8;
const WATCHDOG_MS = 40000;  // the server pings every 15 s: silence this long means a dead connection
const state = { token: "", source: null, zone: "", offset: 0, lastEvent: 0, retryMs: 1000, page: new Map(),
                pages: new Map(), loadTimer: null, reconnectTimer: null };
const $ = (id) => document.getElementById(id);
const group = new URLSearchParams(location.search).get("group") === "room" ? "room" : "modality";
const RULE_NAMES = { not_started: "late", overrunning: "overrunning", images_missing: "images missing" };

class AuthError extends Error {}

// A token may come in the address's fragment (#token=...), which is never sent to the server: kept in
// this browser and taken out of the address bar, so a screen can be set up from a link once.
function takeToken() {
  const found = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (found) {
    localStorage.setItem(TOKEN_KEY, decodeURIComponent(found[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  state.token = localStorage.getItem(TOKEN_KEY) || "";
}

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${state.token}` }, cache: "no-store" });
  if (response.status === 401 || response.status === 403) throw new AuthError("the wall token was not accepted");
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  return response.json();
}

function serverNow() { return new Date(Date.now() + state.offset); }

function setServerClock(iso) {
  if (iso) state.offset = Date.parse(iso) - Date.now();
}

function viewerZone() { return Intl.DateTimeFormat().resolvedOptions().timeZone; }

function tick() {
  const options = { hour: "2-digit", minute: "2-digit", hourCycle: "h23" };
  if (state.zone) options.timeZone = state.zone;
  $("clock").textContent = new Intl.DateTimeFormat("en-GB", options).format(serverNow());
  $("zone").textContent = state.zone && state.zone !== viewerZone() ? state.zone : "";
}

function setConnection(live, text) {
  const el = $("conn");
  el.className = `conn ${live ? "on" : "off"}`;
  el.textContent = text;
}

function showTokenForm(message) {
  $("token-form").hidden = false;
  $("token-message").textContent = message || "";
  $("token").focus();
}

async function load() {
  try {
    const view = await api(`/api/board/wall?group=${group}`);
    setServerClock(view.now);
    state.zone = view.zone;
    render(view);
    tick();
  } catch (error) {
    if (error instanceof AuthError) { disconnect(); showTokenForm(error.message); }
    else setConnection(false, "Offline — reconnecting");
  }
}

function scheduleLoad() {
  clearTimeout(state.loadTimer);
  state.loadTimer = setTimeout(load, 200);
}

function stateClass(s) { return "s-" + s.replace(/ /g, "-"); }

function item(p, privacy) {
  const el = document.createElement("article");
  el.className = `item ${stateClass(p.state)}${p.flag ? " flagged" : ""}`;
  el.dataset.id = p.id;
  el.dataset.state = p.state;
  const line = document.createElement("div");
  line.className = "line";
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = p.time || "--:--";
  const status = document.createElement("span");
  status.className = "state";
  status.textContent = p.state;
  line.append(time, status);
  el.append(line);
  if (privacy !== "none" && p.patient) {
    const patient = document.createElement("div");
    patient.className = "patient";
    patient.textContent = p.patient;
    el.append(patient);
  }
  const what = document.createElement("div");
  what.className = "what";
  what.textContent = [p.description || p.modality, group === "room" ? p.modality : p.room].filter(Boolean).join(" · ");
  el.append(what);
  if (p.flag) {
    const flag = document.createElement("div");
    flag.className = "flag";
    flag.textContent = `⚠ ${p.flag.label}`;
    el.append(flag);
  }
  return el;
}

function render(view) {
  $("wall-date").textContent = view.date;
  const delayed = Object.entries(view.alerts).filter(([, n]) => n > 0);
  const total = delayed.reduce((sum, [, n]) => sum + n, 0);
  $("wall-alerts").className = `wall-alerts${total ? " some" : ""}`;
  $("wall-alerts").textContent = total
    ? `⚠ ${total} delayed: ` + delayed.map(([rule, n]) => `${n} ${RULE_NAMES[rule] || rule}`).join(", ") : "No delays";
  const container = $("columns");
  container.style.setProperty("--columns", String(Math.max(1, view.columns.length)));
  container.replaceChildren();
  if (!view.columns.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "No procedures today.";
    container.append(empty);
  }
  for (const column of view.columns) {
    const section = document.createElement("section");
    section.className = "column";
    section.dataset.key = column.key;
    const title = document.createElement("h2");
    const name = document.createElement("span");
    name.textContent = column.key;
    const tally = document.createElement("span");
    tally.className = "tally";
    tally.textContent = `${column.done} done · ${column.to_do} to do`;
    const page = document.createElement("span");
    page.className = "page";
    title.append(name, tally, page);
    const items = document.createElement("div");
    items.className = "items";
    for (const p of column.items) items.append(item(p, view.privacy));
    section.append(title, items);
    container.append(section);
  }
  paginate();
}

// Split each column's items into pages that fit its height; show the current page of each.
function paginate() {
  for (const section of document.querySelectorAll(".column")) {
    const key = section.dataset.key;
    const box = section.querySelector(".items");
    const items = [...box.children];
    items.forEach((el) => el.classList.remove("off-page"));
    const height = box.clientHeight;
    const pageOf = [];
    let page = 0, top = items.length ? items[0].offsetTop : 0;
    for (const el of items) {
      if (el.offsetTop + el.offsetHeight - top > height && el.offsetTop > top) { page += 1; top = el.offsetTop; }
      pageOf.push(page);
    }
    const count = page + 1;
    state.pages.set(key, { pageOf, count });
    showPage(section, (state.page.get(key) || 0) % count);
  }
}

function showPage(section, index) {
  const key = section.dataset.key;
  const { pageOf, count } = state.pages.get(key);
  state.page.set(key, index);
  [...section.querySelector(".items").children].forEach((el, i) => el.classList.toggle("off-page", pageOf[i] !== index));
  section.querySelector(".page").textContent = count > 1 ? `page ${index + 1}/${count}` : "";
}

function nextPages() {
  for (const section of document.querySelectorAll(".column")) {
    const pages = state.pages.get(section.dataset.key);
    if (pages && pages.count > 1) showPage(section, ((state.page.get(section.dataset.key) || 0) + 1) % pages.count);
  }
}

function disconnect() {
  if (state.source) state.source.close();
  state.source = null;
  clearTimeout(state.reconnectTimer);
}

function connect() {
  disconnect();
  if (!state.token) { showTokenForm(""); return; }
  const source = new EventSource(`/api/board/wall/stream?token=${encodeURIComponent(state.token)}`);
  state.source = source;
  state.lastEvent = Date.now();
  const heard = () => { state.lastEvent = Date.now(); };
  // The stream reports every change from its opening on: read the view then, so nothing falls in between.
  source.onopen = () => { heard(); state.retryMs = 1000; setConnection(true, "Live"); load(); };
  source.onerror = () => {
    setConnection(false, "Offline — reconnecting");
    // EventSource retries by itself after a network error, but gives up after an HTTP error (a proxy's
    // 502 while the broker restarts): then start again, waiting longer each time (at most 15 s).
    if (source.readyState === EventSource.CLOSED) reconnectLater();
  };
  source.addEventListener("ping", (event) => { heard(); setServerClock(JSON.parse(event.data).now); });
  source.addEventListener("changed", () => { heard(); scheduleLoad(); });
  source.addEventListener("alerts", () => { heard(); scheduleLoad(); });
}

function reconnectLater() {
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = setTimeout(connect, state.retryMs);
  state.retryMs = Math.min(state.retryMs * 2, 15000);
}

function watchdog() {
  if (state.source && Date.now() - state.lastEvent > WATCHDOG_MS) {
    setConnection(false, "Offline — reconnecting");
    connect();
  }
}

function start() {
  takeToken();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token").value.trim();
    localStorage.setItem(TOKEN_KEY, state.token);
    $("token-form").hidden = true;
    connect();
  });
  setInterval(tick, 1000);
  setInterval(nextPages, PAGE_SECONDS * 1000);
  setInterval(watchdog, 5000);
  setInterval(() => { if (state.source) load(); }, 60000);  // reschedules make no event: read again now and then
  window.addEventListener("resize", paginate);
  tick();
  connect();
}

start();
