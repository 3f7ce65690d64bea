// The fedhive server's live page: polls /api/state and fills the page with text only
// (never HTML from the server: failure reasons come from clients).
"use strict";

const POLL_MS = 1000;

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function fmtNumber(value, digits) {
  return value === null || value === undefined ? "\u2013" : Number(value).toFixed(digits);
}

function fmtBytes(value) {
  const units = [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]];
  for (const [unit, size] of units) {
    if (Math.abs(value) >= size) return (value / size).toPrecision(3) + " " + unit;
  }
  return String(value) + " B";
}

function fmtSeconds(value) {
  if (value === null || value === undefined) return "\u2013";
  return value < 600 ? value.toFixed(1) + " s" : (value / 60).toFixed(1) + " min";
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const [value, cls] of cells) {
    const td = document.createElement("td");
    td.textContent = value;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }
  return tr;
}

function fill(tbody, rows, empty, span) {
  tbody.replaceChildren();
  if (rows.length === 0) {
    const tr = row([[empty, ""]]);
    tr.className = "empty";
    tr.firstChild.colSpan = span;
    tbody.appendChild(tr);
  }
  for (const r of rows) tbody.appendChild(r);
}

function render(state) {
  const status = document.getElementById("status");
  status.className = "";
  status.textContent = state.status;
  text("description", state.description ? "\u00b7 " + state.description : "");
  const current = state.status === "running" ? state.current_round : state.rounds_done;
  text("round", current + " / " + state.rounds_total);
  text("version", state.model_version === null ? "\u2013" : String(state.model_version));
  text("num-clients", String(state.num_clients));
  const last = state.rounds.length ? state.rounds[state.rounds.length - 1] : null;
  text("accuracy", last ? fmtNumber(last.accuracy, 4) : "\u2013");
  text("bytes", fmtBytes(state.bytes_up_total) + " / " + fmtBytes(state.bytes_down_total));
  text("epsilon", fmtNumber(state.epsilon, 3));
  text("failures-total", String(state.failures_total));

  const clients = document.getElementById("clients");
  clients.replaceChildren();
  for (const id of state.clients) {
    const li = document.createElement("li");
    li.textContent = id;
    clients.appendChild(li);
  }
  if (state.clients.length === 0) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "none connected";
    clients.appendChild(li);
  }

  const rounds = state.rounds.slice().reverse().map((r) => row([
    [String(r.round), "num"],
    [r.model_version === null ? "\u2013" : String(r.model_version), "num"],
    [fmtNumber(r.accuracy, 4), "num"],
    [fmtNumber(r.loss, 4), "num"],
    [r.fit_clients ? r.fit_results + " / " + r.fit_clients : "\u2013", "num"],
    [r.evaluate_results === null || r.evaluate_results === undefined ? "\u2013"
      : String(r.evaluate_results), "num"],
    [String(r.failures), r.failures ? "num bad" : "num"],
    [fmtBytes(r.bytes_up), "num"],
    [fmtBytes(r.bytes_down), "num"],
    [fmtNumber(r.epsilon, 3), "num"],
    [fmtSeconds(r.virtual_time_s === null ? r.elapsed_s : r.virtual_time_s), "num"],
  ]));
  fill(document.querySelector("#rounds tbody"), rounds, "no round finished yet", 11);
  const failures = state.failures.slice().reverse().map((f) => row([
    [String(f.round), "num"], [f.client_id, ""], [f.stage, ""], [f.reason, ""],
  ]));
  fill(document.querySelector("#failures tbody"), failures, "none", 4);
  text("updated", "last update " + new Date().toLocaleTimeString());
}

async function poll() {
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (error) {
    const status = document.getElementById("status");
    status.className = "lost";
    status.textContent = "server unreachable (the run may have ended): " + error.message;
  }
  setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", poll);
