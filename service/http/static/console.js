// The qa-serve console: polls /console/state and /progress, asks through /console/ask, writes the system
// prompt through POST /system_prompt. Plain JS, no build step, no network beyond this service.
"use strict";

const $ = (id) => document.getElementById(id);
const OVERRIDES = ["max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty"];
const INTEGER = new Set(["max_new_tokens", "top_k"]);
let promptEdited = false;
let settingsShown = "";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function eta(seconds) {
  if (seconds === null || seconds === undefined) return "?";
  return seconds < 120 ? `${Math.round(seconds)} s` : `${(seconds / 60).toFixed(1)} min`;
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  return [response.status, await response.json()];
}

function showState(state) {
  const health = state.health || {};
  const word = state.phase === "warming" ? "warming" : (health.status === "error" ? "error"
    : (state.serving ? "ready" : health.status || "?"));
  const badge = $("status");
  badge.textContent = word;
  badge.dataset.state = word;
  const detail = [health.detail, health.degraded].filter(Boolean).join("; ");
  $("status-detail").textContent = detail;
  $("backend").textContent = `backend ${state.backend}, model ${state.model_dir}, context ${state.max_model_len} tokens` +
    (state.ready_after_s ? `, ready after ${state.ready_after_s.toFixed(1)} s` : "") +
    `, ${state.restarts} restarts`;
  $("workers").replaceChildren(...state.workers.map((w) => el("tr", {},
    el("td", {}, w.label), el("td", {}, w.state + (w.failure ? ` (${w.failure})` : "")), el("td", {}, w.pid ?? ""),
    el("td", {}, w.calls), el("td", {}, w.in_flight),
    el("td", {}, w.has_scheduler ? w.running : "-"), el("td", {}, w.has_scheduler ? w.waiting : "-"))));
  if (!promptEdited && document.activeElement !== $("system-prompt")) $("system-prompt").value = state.system_prompt;
  $("admin-token").placeholder = state.admin_token_required ? "required" : "not set: loopback only";
  const errors = state.errors.map((e) => el("li", { class: "error" },
    `${new Date(e.at * 1000).toLocaleTimeString()} request ${e.request} item ${e.index}: ${e.error} (${e.question})`));
  $("errors").replaceChildren(...(errors.length ? errors : [el("li", { class: "quiet" }, "none")]));
  showSettings(state.settings);
}

function showSettings(settings) {
  const filter = $("settings-filter").value.toLowerCase();
  const key = JSON.stringify(settings) + filter;
  if (key === settingsShown) return;
  settingsShown = key;
  const rows = settings.filter((s) => !filter || s.key.toLowerCase().includes(filter))
    .map((s) => el("tr", {}, el("td", {}, s.key), el("td", {}, JSON.stringify(s.value)), el("td", {}, s.source)));
  $("settings").replaceChildren(...rows);
}

function requestView(r) {
  const bar = el("progress", { max: String(r.questions), value: String(r.done) });
  const parts = r.workers.length > 1 ? " [" + r.workers.map((w) => `${w.worker}: ${w.done}/${w.questions}`).join(", ") + "]" : "";
  const text = `${r.kind} ${r.id}: ${r.done}/${r.questions} questions, ${r.tokens_per_s.toFixed(0)} tokens/s, ` +
    (r.state === "running" ? `ETA ${eta(r.eta_s)}` : `${r.state} in ${r.elapsed_s.toFixed(1)} s`) + parts;
  return el("div", { class: "req", "data-id": String(r.id), "data-state": r.state, "data-kind": r.kind }, bar, " ", el("span", {}, text));
}

function showProgress(progress) {
  const warmup = progress.in_flight.find((r) => r.kind === "warmup");
  if (warmup && $("status").dataset.state === "warming") {
    $("status-detail").textContent = `warmup: ${warmup.done}/${warmup.questions} questions, ETA ${eta(warmup.eta_s)}`;
  }
  const running = progress.in_flight.map(requestView);
  $("progress").replaceChildren(...(running.length ? running : [el("p", { class: "quiet" }, "none")]));
  const finished = progress.recent.map(requestView);
  $("finished").replaceChildren(...(finished.length ? finished : [el("p", { class: "quiet" }, "none yet")]));
}

// /progress every second, /console/state every third poll (and at once while warming); the page is redrawn
// only where an answer changed, so an open console costs the service (and a shared machine) next to nothing.
let polls = 0;
let shownState = "";
let shownProgress = "";

async function poll() {
  try {
    if (polls % 3 === 0 || $("status").dataset.state !== "ready") {
      const [, state] = await getJSON("/console/state");
      const text = JSON.stringify(state);
      if (text !== shownState) { shownState = text; showState(state); }
    }
    const [, progress] = await getJSON("/progress");
    const text = JSON.stringify(progress);
    if (text !== shownProgress) { shownProgress = text; showProgress(progress); }
  } catch (err) {
    $("status").textContent = "unreachable";
    $("status").dataset.state = "error";
    $("status-detail").textContent = String(err);
  }
  polls += 1;
  setTimeout(poll, 1000);
}

async function ask(event) {
  event.preventDefault();
  let questions = $("questions").value.split("\n").map((q) => q.trim()).filter(Boolean);
  const repeat = parseInt($("repeat").value, 10);
  if (questions.length && repeat > questions.length) {
    questions = Array.from({ length: repeat }, (_, i) => questions[i % questions.length]);
  }
  if (!questions.length) { $("ask-status").textContent = "type a question first"; return; }
  const body = { prompt: questions };
  for (const name of OVERRIDES) {
    const raw = $(name).value.trim();
    if (raw !== "") body[name] = INTEGER.has(name) ? parseInt(raw, 10) : parseFloat(raw);
  }
  $("ask").disabled = true;
  $("ask-status").textContent = `asking ${questions.length} question${questions.length > 1 ? "s" : ""}…`;
  try {
    const response = await fetch("/console/ask", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    const reply = await response.json();
    if (!response.ok) { $("ask-status").textContent = `${response.status} ${reply.error}: ${reply.detail}`; return; }
    const shown = reply.answers.slice(0, 50);
    $("answers").replaceChildren(...shown.map((a, i) => el("tr", { class: "answer-row" },
      el("td", {}, i), el("td", {}, a.question), el("td", { class: a.error ? "answer error" : "answer" }, a.error ? `error: ${a.error}` : a.answer),
      el("td", {}, `${a.route} (≤${a.budget})`), el("td", {}, a.tokens ?? "-"), el("td", {}, a.seconds === null ? "-" : `${a.seconds.toFixed(2)} s`))));
    const more = reply.answers.length - shown.length;
    $("ask-status").textContent = `${reply.questions} answered in ${reply.seconds.toFixed(2)} s, ${reply.tokens} tokens` +
      (more > 0 ? ` (first 50 shown, ${more} more)` : "");
  } catch (err) {
    $("ask-status").textContent = `failed: ${err}`;
  } finally {
    $("ask").disabled = false;
  }
}

async function savePrompt() {
  const headers = { "content-type": "application/json" };
  const token = $("admin-token").value;
  if (token) headers.authorization = `Bearer ${token}`;
  const response = await fetch("/system_prompt", { method: "POST", headers, body: JSON.stringify({ system_prompt: $("system-prompt").value }) });
  const reply = await response.json();
  $("prompt-status").textContent = response.ok ? "saved" : `${response.status} ${reply.error}: ${reply.detail}`;
  if (response.ok) promptEdited = false;
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask-form").addEventListener("submit", ask);
  $("save-prompt").addEventListener("click", savePrompt);
  $("system-prompt").addEventListener("input", () => { promptEdited = true; });
  $("settings-filter").addEventListener("input", () => { settingsShown = ""; });
  poll();
});
