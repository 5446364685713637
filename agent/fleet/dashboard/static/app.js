// The fleet dashboard's page: plain JavaScript, no build step, no dependency.
// Data arrives as JSON (/api/...) and as server-sent events (/api/stream: a snapshot, then the
// changes). Everything a device sent is written with textContent, never as HTML.
"use strict";

const state = {
  devices: new Map(), // id -> row
  rollouts: [],
  events: [],
  counts: {},
  broker: { connected: null, note: "" },
  actions: { available: false, why_not: "", driving: [] },
  offset: 0, // server clock minus ours, ms
  sort: { key: "id", dir: 1 },
  filter: "",
  stateFilter: "",
  device: null, // the device page's data
  view: "devices",
};

// -- small helpers ------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function now() {
  return Date.now() + state.offset;
}

function age(iso) {
  if (!iso) return "never";
  const s = Math.max(0, Math.round((now() - Date.parse(iso)) / 1000));
  if (s >= 86400) return `${Math.floor(s / 86400)}d ago`;
  if (s >= 3600) return `${Math.floor(s / 3600)}h ago`;
  if (s >= 60) return `${Math.floor(s / 60)}m ago`;
  return `${s}s ago`;
}

function fmt(v, digits = 1) {
  if (v === null || v === undefined) return "–";
  return Number(v).toFixed(digits);
}

function badge(text, kind) {
  return el("span", { class: `badge ${kind || text}`, text });
}

function bar(percent, wide) {
  const fill = el("i");
  fill.style.width = `${Math.max(0, Math.min(100, percent || 0))}%`;
  return el("span", { class: wide ? "bar wide" : "bar", title: `${fmt(percent)}%` }, fill);
}

function problems(row) {
  // Messages of this device that could not be read (the newest few), as the fleet saw them.
  if (!row.problems || !row.problems.length) return null;
  return el("div", { class: "problems", title: row.problems.join("\n") }, `${row.problems.length} unreadable message(s)`);
}

function errorCode(err) {
  if (!err) return null;
  return el("span", { class: "code", title: err.message, text: err.code });
}

function toast(text, isError) {
  const t = document.getElementById("toast");
  t.textContent = text;
  t.className = isError ? "error" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 8000);
}

function runtime(text) {
  if (!text) return "";
  const [name, ...rest] = text.split(" ");
  const where = rest.find((t) => !/^\d/.test(t));
  return where ? `${name} ${where.replace(/ExecutionProvider$/, "")}` : name;
}

// -- taking what the server sends ---------------------------------------------------------
function take(doc, full) {
  if (doc.now) state.offset = Date.parse(doc.now) - Date.now();
  if (full) state.devices.clear();
  for (const row of doc.devices || []) state.devices.set(row.id, row);
  if (doc.rollouts) state.rollouts = doc.rollouts;
  if (doc.events) state.events = doc.events;
  if (doc.counts) state.counts = doc.counts;
  if (doc.broker) state.broker = doc.broker;
  if (doc.actions) state.actions = doc.actions;
  document.getElementById("logout").hidden = !doc.auth;
  if (state.view === "device" && state.device) {
    const changed = (doc.devices || []).some((r) => r.id === state.device.id);
    if (changed || full) loadDevice(state.device.id);
  }
  schedule();
}

let pending = false;
function schedule() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    render();
  });
}

function connect() {
  const live = document.getElementById("live");
  const es = new EventSource("/api/stream");
  es.addEventListener("snapshot", (e) => take(JSON.parse(e.data), true));
  es.addEventListener("changes", (e) => take(JSON.parse(e.data), false));
  es.onopen = () => { live.textContent = "live"; live.className = "live on"; };
  es.onerror = async () => {
    live.textContent = "reconnecting…";
    live.className = "live off";
    try { // a login that ran out: back to the form, not "reconnecting" for ever
      const r = await fetch("/api/rollouts", { credentials: "same-origin" });
      if (r.status === 401) { es.close(); location.assign("/login"); return; }
    } catch (e) { /* the dashboard is down: EventSource tries again */ }
    if (es.readyState === EventSource.CLOSED) setTimeout(connect, 3000);
  };
}

// -- the header ---------------------------------------------------------------------------
function renderHeader() {
  const c = state.counts;
  const counts = document.getElementById("counts");
  counts.replaceChildren(
    el("span", {}, el("b", { text: c.devices ?? 0 }), " devices"),
    el("span", {}, el("b", { text: c.online ?? 0 }), " online"),
    el("span", {}, el("b", { text: c.offline ?? 0 }), " offline"),
    el("span", {}, el("b", { text: c.updating ?? 0 }), " updating"),
    el("span", {}, el("b", { text: c.failing ?? 0 }), " with errors"),
  );
  const live = document.getElementById("live");
  if (state.broker.connected === false) {
    live.textContent = `broker: ${state.broker.note}`;
    live.className = "live off";
  } else if (state.broker.connected && live.textContent !== "live") {
    live.textContent = "live";
    live.className = "live on";
  }
  const running = state.rollouts.filter((r) => !["done", "aborted", "rolled-back"].includes(r.status));
  document.getElementById("rollout-count").textContent = running.length ? `(${running.length})` : "";
  document.getElementById("footer").textContent =
    `${state.devices.size} devices · ${state.rollouts.length} rollouts · Prometheus series at /metrics`;
}

// -- devices ------------------------------------------------------------------------------
function haystack(row) {
  const parts = [row.id, row.agent, row.hardware, row.arch, row.deployment, ...(row.groups || [])];
  if (row.error) parts.push(row.error.code, row.error.message);
  for (const m of row.models) {
    parts.push(m.name, m.version, m.variant, m.runtime, m.phase);
    if (m.error) parts.push(m.error.code, m.error.message);
  }
  return parts.filter(Boolean).join(" ").toLowerCase();
}

function failing(row) {
  return Boolean(row.error) || row.models.some((m) => m.error);
}

function sortKey(row, key) {
  switch (key) {
    case "online": return row.online === true ? 0 : row.online === false ? 2 : 1;
    case "seen": return -(row.last_seen ? Date.parse(row.last_seen) : 0);
    case "groups": return (row.groups || []).join(",");
    case "models": return row.models.map((m) => `${m.name} ${m.phase}`).join(",");
    case "load": return -(row.telemetry["cpu.percent"] ?? -1);
    case "error": return failing(row) ? 0 : 1;
    default: return String(row[key] ?? "");
  }
}

function visibleDevices() {
  const words = state.filter.toLowerCase().split(/\s+/).filter(Boolean);
  const rows = [...state.devices.values()].filter((row) => {
    const sf = state.stateFilter;
    if (sf === "online" && row.online !== true) return false;
    if (sf === "offline" && row.online !== false) return false;
    if (sf === "failing" && !failing(row)) return false;
    if (sf === "updating" && !row.models.some((m) => !m.final)) return false;
    if (!words.length) return true;
    const hay = haystack(row);
    return words.every((w) => hay.includes(w));
  });
  const { key, dir } = state.sort;
  rows.sort((a, b) => {
    const x = sortKey(a, key), y = sortKey(b, key);
    if (x < y) return -dir;
    if (x > y) return dir;
    return a.id < b.id ? -1 : 1;
  });
  return rows;
}

function modelLine(m) {
  const parts = [el("span", { class: "name", text: m.name }), el("span", { text: m.version || "–" })];
  if (m.variant) parts.push(el("span", { class: "muted", text: m.variant }));
  if (m.runtime) parts.push(el("span", { class: "muted", text: runtime(m.runtime) }));
  parts.push(badge(m.phase));
  if (!m.final && m.progress !== null && m.progress !== undefined) {
    parts.push(bar(m.progress), el("span", { class: "muted progress", text: `${fmt(m.progress, 0)}%` }));
  }
  if (m.error) parts.push(errorCode(m.error));
  if (m.rps !== null && m.rps !== undefined) {
    parts.push(el("span", { class: "muted", text: `${fmt(m.rps)} req/s · p99 ${fmt(m.p99_ms)} ms` }));
  }
  return el("div", { class: "model", "data-model": m.name, "data-phase": m.phase }, parts);
}

function deviceRow(row) {
  const online = row.online === true ? "on" : row.online === false ? "off" : "";
  const t = row.telemetry || {};
  return el(
    "tr",
    { "data-device": row.id },
    el("td", {}, el("a", { href: `#/device/${encodeURIComponent(row.id)}`, text: row.id })),
    el("td", {}, el("span", { class: `dot ${online}` }), row.online === null ? "?" : row.online ? "yes" : "no"),
    el("td", { class: "seen", "data-at": row.last_seen || "", text: age(row.last_seen) }),
    el("td", { text: (row.groups || []).join(", ") }),
    el("td", { text: row.agent || "–" }),
    el("td", { text: row.hardware }),
    el("td", {}, row.models.length ? row.models.map(modelLine) : el("span", { class: "muted", text: "no model" })),
    el("td", { text: "cpu.percent" in t ? `${fmt(t["cpu.percent"], 0)}% / ${fmt(t["mem.percent"], 0)}%` : "–" }),
    el("td", { class: "device-error" }, row.error ? [errorCode(row.error), " ", el("span", { class: "muted", text: row.error.message })] : null,
      problems(row)),
  );
}

function renderDevices() {
  const rows = visibleDevices();
  const body = document.querySelector("#devices tbody");
  body.replaceChildren(...rows.map(deviceRow));
  document.getElementById("no-devices").hidden = state.devices.size > 0;
  document.getElementById("shown").textContent =
    rows.length === state.devices.size ? "" : `${rows.length} of ${state.devices.size} shown`;
  for (const th of document.querySelectorAll("#devices th[data-sort]")) {
    th.classList.toggle("asc", th.dataset.sort === state.sort.key && state.sort.dir > 0);
    th.classList.toggle("desc", th.dataset.sort === state.sort.key && state.sort.dir < 0);
  }
}

// -- one device ---------------------------------------------------------------------------
async function loadDevice(id) {
  if (loadDevice.busy) { loadDevice.again = id; return; }
  loadDevice.busy = true;
  try {
    const r = await fetch(`/api/devices/${encodeURIComponent(id)}`, { credentials: "same-origin" });
    if (r.ok) state.device = await r.json();
    else state.device = { id, missing: (await r.json()).error };
  } catch (e) {
    state.device = { id, missing: String(e) };
  } finally {
    loadDevice.busy = false;
  }
  schedule();
  if (loadDevice.again) { const next = loadDevice.again; loadDevice.again = null; setTimeout(() => loadDevice(next), 1000); }
}

const CHART_ORDER = [/^cpu\./, /^mem\./, /^proc\./, /^gpu/, /^jetson/, /^temp\./, /^model\./];
const UNITS = { percent: "%", util_pct: "%", used_mb: "MiB", rss_mb: "MiB", mem_used_mb: "MiB", temp_c: "°C", rps: "req/s", errors_per_s: "err/s", p50_ms: "ms", p99_ms: "ms", cpu_percent: "%" };

function unit(name) {
  const last = name.split(".").pop();
  return UNITS[last] || (last.endsWith("_c") ? "°C" : "");
}

function chart(name, points, windowS) {
  // The time axis spans the window, or less while the dashboard has heard less than that.
  const w = 300, h = 60;
  const values = points.map((p) => p[1]);
  const lo = Math.min(0, ...values), hi = Math.max(...values, lo + 1e-9);
  const t1 = now() / 1000;
  windowS = Math.max(10, Math.min(windowS, t1 - points[0][0]));
  const t0 = t1 - windowS;
  const line = points
    .map(([t, v]) => `${(((t - t0) / windowS) * w).toFixed(1)},${(h - 2 - ((v - lo) / (hi - lo)) * (h - 4)).toFixed(1)}`)
    .join(" ");
  const plot = svg("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", role: "img" });
  plot.append(svg("polyline", { points: line }));
  const latest = values[values.length - 1];
  return el(
    "div",
    { class: "chart", "data-metric": name },
    el("div", { class: "title" }, el("span", { text: name }), el("b", { text: `${fmt(latest)} ${unit(name)}` })),
    plot,
    el("div", { class: "axis" }, el("span", { text: windowS >= 120 ? `${Math.round(windowS / 60)} min ago` : `${Math.round(windowS)} s ago` }), el("span", { text: `max ${fmt(hi)}` }), el("span", { text: "now" })),
  );
}

function renderDevice() {
  const box = document.getElementById("device");
  const d = state.device;
  if (!d) { box.replaceChildren(el("p", { class: "muted", text: "loading…" })); return; }
  if (d.missing) { box.replaceChildren(el("p", { class: "empty", text: d.missing })); return; }
  const row = state.devices.get(d.id) || d;
  const online = row.online === true ? "online" : row.online === false ? "offline" : "not said";
  const hw = d.hardware_profile;
  const facts = el("dl", { class: "facts" },
    el("dt", { text: "state" }), el("dd", {}, el("span", { class: `dot ${row.online ? "on" : row.online === false ? "off" : ""}` }), online, `, last seen ${age(row.last_seen)}`),
    el("dt", { text: "agent" }), el("dd", { text: row.agent || "–" }),
    el("dt", { text: "groups" }), el("dd", { text: (row.groups || []).join(", ") || "none" }),
    el("dt", { text: "hardware" }), el("dd", { text: hw ? `${row.hardware}, ${hw.arch}, ${hw.cpu_count} cores, ${hw.memory_mb} MB, ${hw.accelerators.join(" ")}` : row.hardware }),
    ...(hw ? Object.entries(hw.details).map(([k, v]) => [el("dt", { text: k }), el("dd", { class: "muted", text: v })]).flat() : []),
    el("dt", { text: "deployment" }), el("dd", { text: row.deployment || "none" }),
    el("dt", { text: "trust" }), el("dd", { text: d.trust ? `root v${d.trust.root_version}, keyring v${d.trust.keyring_version ?? "–"}` : "–" }),
  );
  if (row.error) facts.append(el("dt", { text: "refused" }), el("dd", { class: "device-error" }, errorCode(row.error), " ", row.error.message));
  if (row.problems && row.problems.length) {
    facts.append(el("dt", { text: "unreadable" }), el("dd", { class: "problems" }, row.problems.map((p) => el("div", { text: p }))));
  }
  const models = el("table", { class: "grid" },
    el("thead", {}, el("tr", {}, ["Model", "Version", "Variant", "Runtime", "Phase", "Error", "req/s", "p50", "p99", "err/s"].map((h) => el("th", { text: h })))),
    el("tbody", {}, row.models.map((m) => el("tr", { "data-model": m.name },
      el("td", { text: m.name }), el("td", { text: `${m.version || "–"}${m.fallback ? ` (falls back to ${m.fallback})` : ""}` }),
      el("td", { text: m.variant || "–" }), el("td", { text: m.runtime || "–" }),
      el("td", {}, badge(m.phase), !m.final && m.progress != null ? [" ", bar(m.progress), ` ${fmt(m.progress, 0)}%`] : null),
      el("td", {}, m.error ? [errorCode(m.error), " ", el("span", { class: "muted", text: m.error.message })] : null),
      el("td", { text: fmt(m.rps) }), el("td", { text: fmt(m.p50_ms) }), el("td", { text: fmt(m.p99_ms) }), el("td", { text: fmt(m.errors_per_s, 2) }),
    ))),
  );
  const names = Object.keys(d.series).sort((a, b) => {
    const ia = CHART_ORDER.findIndex((r) => r.test(a)), ib = CHART_ORDER.findIndex((r) => r.test(b));
    return ia - ib || (a < b ? -1 : 1);
  });
  const windowS = d.window_s || 3600;
  const charts = el("div", { class: "charts" }, names.map((n) => chart(n, d.series[n], windowS)));
  const events = el("table", { class: "grid", id: "device-events" },
    el("thead", {}, el("tr", {}, ["Time", "#", "Kind", "Model", "Phase", "Code", "Message"].map((h) => el("th", { text: h })))),
    el("tbody", {}, d.events.map(eventRow)),
  );
  box.replaceChildren(
    el("div", { class: "card", "data-device": d.id },
      el("h2", {}, d.id, badge(online, row.online ? "active" : row.online === false ? "failed" : "pending")),
      facts),
    el("div", { class: "card" }, el("h3", { text: "Models" }), row.models.length ? models : el("p", { class: "muted", text: "no model" })),
    el("div", { class: "card" }, el("h3", { text: `Telemetry, last ${Math.round(windowS / 60)} minutes` }), names.length ? charts : el("p", { class: "muted", text: "no telemetry heard since the dashboard started" })),
    el("div", { class: "card" }, el("h3", { text: "Events (newest first, since the dashboard started)" }), d.events.length ? events : el("p", { class: "muted", text: "no event yet" })),
  );
}

function eventRow(e) {
  return el("tr", { "data-kind": e.kind },
    el("td", { text: new Date(e.at).toLocaleTimeString() }),
    el("td", { text: e.seq }),
    el("td", { text: e.kind + (e.count > 1 ? ` ×${e.count}` : "") }),
    el("td", { text: e.model || "" }),
    el("td", {}, e.phase ? badge(e.phase) : null),
    el("td", {}, e.error ? errorCode(e.error) : null),
    el("td", { class: "muted", text: e.error ? e.error.message : e.topic || "" }),
  );
}

// -- rollouts -----------------------------------------------------------------------------
const ACTION_TEXT = {
  pause: ["Pause", "Start no further wave. Devices already reached keep what they run."],
  resume: ["Resume", "Carry the rollout on from where it stopped (past a gate's halt too), driven from this dashboard."],
  abort: ["Abort", "Stop the rollout for good. Devices keep what they run now."],
  rollback: ["Roll back", "Return every device the rollout reached to what it ran before, driven from this dashboard."],
};

function rolloutCard(r) {
  const models = Object.entries(r.models || {}).map(([n, v]) => `${n} ${v}`).join(", ");
  const where = r.group ? `group ${r.group}` : "named devices";
  const sel = (r.selectors || []).length ? ` where ${r.selectors.join(" and ")}` : "";
  const g = r.gate || {};
  const gate = [`wave timeout ${g.wave_timeout_s}s`, `failures allowed ${g.max_failures ?? `${g.max_failures_percent}%`}`];
  if (g.soak_s) gate.push(`soak ${g.soak_s}s (errors +${g.max_error_rate_increase}, p99 ×${g.max_p99_ratio})`);
  const waves = el("table", { class: "grid waves" },
    el("thead", {}, el("tr", {}, ["Wave", "Devices", "Where they stand"].map((h) => el("th", { text: h })))),
    el("tbody", {}, (r.waves || []).map((w) => el("tr", { "data-wave": w.wave, class: r.status === "running" && w.wave === r.wave ? "current" : "" },
      el("td", { text: w.wave === r.wave && r.status === "running" ? `${w.wave} ◀` : w.wave }),
      el("td", { text: w.devices }),
      el("td", {}, Object.entries(w.phases).sort().map(([p, n]) => [badge(`${n} ${p}`, p), " "])),
    ))),
  );
  const failures = (r.failures || []).length ? el("table", { class: "grid failures" },
    el("thead", {}, el("tr", {}, ["Device", "Wave", "Code", "Why"].map((h) => el("th", { text: h })))),
    el("tbody", {}, r.failures.slice(0, 100).map((f) => el("tr", { "data-device": f.device },
      el("td", {}, el("a", { href: `#/device/${encodeURIComponent(f.device)}`, text: f.device })),
      el("td", { text: f.wave + 1 }), el("td", { class: "code", text: f.code }), el("td", { class: "muted", text: f.message }),
    ))),
  ) : el("p", { class: "muted", text: "no failure" });
  const buttons = el("div", { class: "buttons" }, Object.entries(ACTION_TEXT).map(([action, [label]]) => {
    const allowed = (r.actions || []).includes(action);
    const why = !state.actions.available ? state.actions.why_not : allowed ? "" : `not while it is ${r.status}`;
    return el("button", {
      type: "button", "data-action": action, disabled: !allowed || !state.actions.available, title: why,
      class: action === "abort" || action === "rollback" ? "danger" : "",
      onclick: () => ask(r.rollout, action),
    }, label);
  }));
  return el("div", { class: "card", "data-rollout": r.rollout, "data-status": r.status },
    el("h2", {}, r.rollout, badge(r.status, r.status), r.driven ? el("span", { class: "muted", text: `driven by ${r.owner}` }) : el("span", { class: "muted", text: "no controller driving" })),
    el("div", {}, `${models} to ${where}${sel}`),
    el("div", {}, bar(r.percent, true), ` ${r.active} of ${r.devices} active (${fmt(r.percent)}%)`, r.status === "running" ? ` · wave ${r.wave} of ${(r.waves || []).length}` : ""),
    r.reason ? el("div", { class: "reason" }, el("b", { text: "reason: " }), r.reason) : null,
    el("div", { class: "muted" }, `gate: ${gate.join(", ")} · created ${age(r.created)} by ${r.created_by}`),
    el("h3", { text: "Waves" }), waves,
    el("h3", { text: "Failures" }), failures,
    buttons,
  );
}

function renderRollouts() {
  const box = document.getElementById("rollouts");
  box.replaceChildren(...state.rollouts.map((r) => (r.waves ? rolloutCard(r) : el("div", { class: "card", "data-rollout": r.rollout, "data-status": "?" },
    el("h2", {}, r.rollout, badge("no state yet", "pending")),
    el("p", { class: "muted", text: "Its plan is on the broker, its state is not (yet): no controller has written it." })))));
  document.getElementById("no-rollouts").hidden = state.rollouts.length > 0;
  const note = document.getElementById("actions-note");
  note.textContent = state.actions.available
    ? (state.actions.driving.length ? `This dashboard drives: ${state.actions.driving.join(", ")}` : "")
    : `Read-only: ${state.actions.why_not}`;
}

function ask(rollout, action) {
  const dialog = document.getElementById("confirm");
  const [label, text] = ACTION_TEXT[action];
  document.getElementById("confirm-title").textContent = `${label} rollout ${rollout}?`;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-ok").textContent = label;
  dialog.returnValue = "";
  dialog.onclose = () => {
    if (dialog.returnValue === "ok") act(rollout, action);
  };
  dialog.showModal();
}

async function act(rollout, action) {
  toast(`${ACTION_TEXT[action][0]} ${rollout}…`);
  try {
    const r = await fetch(`/api/rollouts/${encodeURIComponent(rollout)}/${action}`, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Edge-Fleet": "dashboard" },
      body: JSON.stringify({ confirm: rollout }),
    });
    const doc = await r.json();
    if (r.ok) toast(`${rollout}: ${doc.message}`);
    else toast(`${rollout}: ${action} refused: ${doc.error}`, true);
  } catch (e) {
    toast(`${rollout}: ${action} failed: ${e}`, true);
  }
}

// -- events -------------------------------------------------------------------------------
function renderEvents() {
  document.querySelector("#events tbody").replaceChildren(...state.events.map((e) => {
    const tr = eventRow(e);
    tr.children[1].replaceChildren(el("a", { href: `#/device/${encodeURIComponent(e.device)}`, text: e.device }));
    return tr;
  }));
}

// -- views --------------------------------------------------------------------------------
function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [view, ...rest] = hash.split("/");
  state.view = ["devices", "device", "rollouts", "events"].includes(view) ? view : "devices";
  for (const v of ["devices", "device", "rollouts", "events"]) {
    document.getElementById(`view-${v}`).hidden = v !== state.view;
  }
  for (const a of document.querySelectorAll("header nav a")) {
    a.classList.toggle("current", a.dataset.view === state.view || (state.view === "device" && a.dataset.view === "devices"));
  }
  if (state.view === "device") {
    let id = rest.join("/");
    try { id = decodeURIComponent(id); } catch (e) { /* shown as typed */ }
    if (!state.device || state.device.id !== id) state.device = null;
    loadDevice(id);
  }
  schedule();
}

function render() {
  renderHeader();
  if (state.view === "devices") renderDevices();
  else if (state.view === "device") renderDevice();
  else if (state.view === "rollouts") renderRollouts();
  else renderEvents();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("filter").addEventListener("input", (e) => { state.filter = e.target.value; schedule(); });
  document.getElementById("state-filter").addEventListener("change", (e) => { state.stateFilter = e.target.value; schedule(); });
  for (const th of document.querySelectorAll("#devices th[data-sort]")) {
    th.addEventListener("click", () => {
      const key = th.dataset.sort;
      state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
      schedule();
    });
  }
  window.addEventListener("hashchange", route);
  setInterval(() => {
    for (const td of document.querySelectorAll("td.seen")) td.textContent = age(td.dataset.at || null);
  }, 5000);
  route();
  connect();
});
