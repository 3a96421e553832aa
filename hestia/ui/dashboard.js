"use strict";
// The Hestia dashboard: services and lifecycle events, kept live by /v1/events (SSE).
const rows = new Map(); // service name -> its status, as /v1/services gives it
const MAX_EVENTS = 100;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function ago(epochSeconds) {
  const s = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.max(0, Math.round(seconds));
  return s < 120 ? `${s} s` : `${Math.floor(s / 60)} min ${s % 60} s`;
}

function showProblem(message) {
  const p = document.getElementById("problem");
  p.textContent = message || "";
  p.hidden = !message;
}

async function act(name, action) {
  showProblem("");
  try {
    const r = await fetch(`/v1/services/${encodeURIComponent(name)}/${action}`, {
      method: "POST",
      headers: { "Accept": "application/json" },
    });
    const body = await r.json();
    if (!r.ok) {
      showProblem(`${action} ${name}: ${body.error ? body.error.message : r.status}`);
      return;
    }
    update(body);
  } catch (err) {
    showProblem(`${action} ${name}: ${err}`);
  }
}

function showConfig(error) {
  const box = document.getElementById("config-error");
  if (!error) {
    box.hidden = true;
    return;
  }
  const problems = (error.errors || []).map((p) => `${p.path}: ${p.reason}`);
  box.replaceChildren(
    el("strong", {}, `${error.file || "the config file"} was not applied`),
    " (the running configuration stays):",
    el("ul", {}, ...problems.map((p) => el("li", {}, p))),
  );
  box.hidden = false;
}

function render() {
  const tbody = document.querySelector("#services tbody");
  const names = [...rows.keys()].sort();
  tbody.replaceChildren(
    ...names.map((name) => {
      const s = rows.get(name);
      const managed = s.backend !== "url";
      const err = s.last_error ? s.last_error.message || JSON.stringify(s.last_error) : "";
      return el(
        "tr",
        { "data-service": name },
        el("td", {}, el("strong", {}, name), el("div", { class: "muted" }, s.backend)),
        el("td", {}, el("span", { class: `state ${s.state}`, "data-state": s.state }, s.state)),
        el("td", {}, s.upstream || "—"),
        el("td", {}, ago(s.last_activity)),
        el("td", { class: "num", "data-idle": "" }, duration(s.idle_deadline_in_s)),
        el("td", { class: "num" }, s.waiting),
        el("td", { class: "num" }, s.in_flight),
        el("td", { class: "error" }, err),
        el(
          "td",
          {},
          el("button", {
            "data-action": "start",
            onclick: () => act(name, "start"),
            ...(managed && s.state !== "ready" && s.state !== "starting" ? {} : { disabled: "" }),
          }, "Start"),
          el("button", {
            "data-action": "stop",
            onclick: () => act(name, "stop"),
            ...(managed && s.state !== "stopped" && s.state !== "stopping" ? {} : { disabled: "" }),
          }, "Stop"),
        ),
      );
    }),
  );
  document.getElementById("empty").hidden = names.length > 0;
}

function update(status) {
  rows.set(status.name, { ...status, received: Date.now() / 1000 });
  render();
}

function addEvent(ev, atTop) {
  const list = document.getElementById("events");
  const when = new Date(ev.at * 1000).toLocaleTimeString();
  const item = el(
    "li",
    {},
    el("span", { class: "muted" }, when, " "),
    el("strong", {}, ev.service),
    ` ${ev.from_state} → ${ev.to_state} (${ev.cause})`,
    ev.reason ? el("span", { class: "muted" }, ` ${ev.reason}`) : "",
  );
  if (atTop) list.prepend(item);
  else list.append(item);
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
}

// the idle countdown ticks between updates
setInterval(() => {
  const now = Date.now() / 1000;
  for (const tr of document.querySelectorAll("#services tbody tr")) {
    const s = rows.get(tr.dataset.service);
    const cell = tr.querySelector("[data-idle]");
    if (s && cell && s.idle_deadline_in_s !== null && s.idle_deadline_in_s !== undefined) {
      cell.textContent = duration(s.idle_deadline_in_s - (now - s.received));
    }
  }
}, 1000);

async function load() {
  const r = await fetch("/v1/services", { headers: { "Accept": "application/json" } });
  if (r.status === 401) {
    location.href = "/login?next=/ui";
    return;
  }
  const body = await r.json();
  for (const s of body.services) update(s);
  render();
  const config = await fetch("/v1/config");
  if (config.ok) showConfig((await config.json()).error);
  const ev = await fetch("/v1/events/recent?limit=50");
  if (ev.ok) for (const e of (await ev.json()).events) addEvent(e, false);
}

function follow() {
  const live = document.getElementById("live");
  const source = new EventSource("/v1/events");
  source.onopen = () => { live.textContent = "live"; live.className = "badge"; };
  source.onerror = () => { live.textContent = "reconnecting…"; live.className = "badge off"; };
  source.addEventListener("services", (m) => {
    const data = JSON.parse(m.data);
    const seen = new Set();
    for (const s of data.services) { seen.add(s.name); rows.set(s.name, { ...s, received: Date.now() / 1000 }); }
    for (const name of [...rows.keys()]) if (!seen.has(name)) rows.delete(name);
    render();
  });
  source.addEventListener("config", (m) => {
    const data = JSON.parse(m.data);
    showConfig(data.result === "invalid" ? data.error : null);
  });
  source.addEventListener("transition", (m) => {
    const data = JSON.parse(m.data);
    update(data.status);
    addEvent(data, true);
  });
}

load().then(follow, (err) => showProblem(`loading the services failed: ${err}`));
