// The rwkvstate chat page. It uses only the public HTTP API (docs/server.md):
//   POST /v1/chat/completions with stream and a session id: replies arrive as server-sent events;
//   the session endpoints: create, fork, rollback {"turns": 1}, snapshot, create from a state file.
// Every chat request is one turn of its session, so "undo" and "regenerate" are a one-turn rollback
// of the recurrent state (plus, for regenerate, the same message sent again): nothing is re-read.
// Conversations (session id and transcript) and the API key are kept in localStorage.
"use strict";

const KEYS = { apiKey: "rwkvstate.apiKey", conversations: "rwkvstate.conversations", saved: "rwkvstate.saved" };
const $ = (id) => document.getElementById(id);

const app = {
  key: localStorage.getItem(KEYS.apiKey) || "",
  conversations: load(KEYS.conversations),  // [{id, title, loaded, messages: [{role, content, meta, restored}]}]
  saved: load(KEYS.saved),                  // [{name, title, tokens, messages}]
  current: null,                            // id of the conversation shown
  model: null,                              // the served model id, from /v1/models
  busy: false,
  notice: "",                               // a line for the status bar from the last action
  abort: null,                              // AbortController of the reply being streamed
};

function load(key) {
  try { const value = JSON.parse(localStorage.getItem(key) || "[]"); return Array.isArray(value) ? value : []; }
  catch { return []; }
}

function persist() {
  localStorage.setItem(KEYS.conversations, JSON.stringify(app.conversations));
  localStorage.setItem(KEYS.saved, JSON.stringify(app.saved));
}

// ---- HTTP ------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code; }
}

async function errorOf(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON: fall back to the status line */ }
  const e = body && body.error;
  return new ApiError(response.status, e && e.message ? e.message : `${response.status} ${response.statusText}`, e && e.code);
}

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

// A request to the API with the bearer key. A session still finishing a stopped reply answers
// 409 session_busy for a moment: those are retried briefly.
async function api(method, path, body, signal) {
  for (let attempt = 0; ; attempt++) {
    const headers = { "content-type": "application/json" };
    if (app.key) headers.authorization = `Bearer ${app.key}`;
    let response;
    try {
      response = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, `cannot reach the server (${e.message})`, "network");
    }
    if (response.ok) return response;
    const error = await errorOf(response);
    if (error.code === "session_busy" && attempt < 20) { await sleep(150); continue; }
    throw error;
  }
}

const json = async (method, path, body) => (await api(method, path, body)).json();

// The `data:` payloads of a server-sent event stream.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) if (line.startsWith("data: ")) yield line.slice(6);
    }
  }
}

// ---- errors and status -------------------------------------------------------------------------
function showError(error) {
  if (error && error.name === "AbortError") return;
  let text = error instanceof ApiError && error.status ? `Error ${error.status}: ${error.message}` : `Error: ${error.message || error}`;
  if (error.status === 401) text += "\nEnter the server's API key at the top right.";
  $("error-text").textContent = text;
  $("error").hidden = false;
}

function clearError() { $("error").hidden = true; $("error-text").textContent = ""; }

async function refreshStatus() {
  const conv = currentConversation();
  if (!conv) { $("status").textContent = "no conversation yet"; return; }
  try {
    const info = await json("GET", `/v1/sessions/${encodeURIComponent(conv.id)}`);
    $("status").textContent = [`${info.id} · ${info.tokens} tokens in the state · ${info.location}`, app.notice].filter(Boolean).join(" · ");
    $("status").dataset.tokens = info.tokens;
  } catch (e) { $("status").textContent = `${conv.id} · ${e.message}`; }
}

// ---- conversations -------------------------------------------------------------------------------
const currentConversation = () => app.conversations.find((c) => c.id === app.current) || null;
const exchanges = (conv) => conv.messages.filter((m) => m.role === "user" && !m.restored).length;

function addConversation(id, title, messages = [], loaded = false) {
  const conv = { id, title, loaded, messages };
  app.conversations.push(conv);
  app.current = id;
  persist();
  return conv;
}

async function ensureConversation() {
  const conv = currentConversation();
  if (conv) return conv;
  const info = await json("POST", "/v1/sessions", {});
  return addConversation(info.id, "New chat");
}

async function ensureModel() {
  if (!app.model) {
    const list = await json("GET", "/v1/models");
    app.model = list.data[0].id;
    $("model").textContent = app.model;
  }
  return app.model;
}

function settings() {
  const number = (id, fallback) => { const v = parseFloat($(id).value); return Number.isFinite(v) ? v : fallback; };
  return { max_tokens: Math.max(1, Math.round(number("max-tokens", 200))), temperature: number("temperature", 1.0), top_p: number("top-p", 0.85) };
}

// ---- turns -----------------------------------------------------------------------------------------
async function send(text) {
  const model = await ensureModel();
  const conv = await ensureConversation();
  const messages = [];
  const system = $("system").value.trim();
  if (system && !conv.loaded && exchanges(conv) === 0) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: text });
  if (conv.title === "New chat") conv.title = text.slice(0, 40);
  const user = { role: "user", content: text };
  const reply = { role: "assistant", content: "", meta: "", chunks: 0 };
  conv.messages.push(user, reply);
  render();
  const body = { model, messages, session: conv.id, stream: true, stream_options: { include_usage: true }, ...settings() };
  app.abort = new AbortController();
  let response;
  try {
    response = await api("POST", "/v1/chat/completions", body, app.abort.signal);
  } catch (e) {
    conv.messages.splice(conv.messages.indexOf(user), 2);  // refused before it began: not a turn
    throw e;
  } finally { persist(); }
  await readReply(response, reply);
}

async function readReply(response, reply) {
  reply.streaming = true;
  let finish = null, tokens = null;
  try {
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(0, chunk.error.message, chunk.error.code);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) { reply.content += choice.delta.content; reply.chunks += 1; renderReply(reply); }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (e) {
    finish = e.name === "AbortError" ? "stopped" : "error";
    if (e.name !== "AbortError") throw e;
  } finally {
    reply.streaming = false;
    reply.meta = [tokens === null ? null : `${tokens} tokens`, finish && `finish: ${finish}`].filter(Boolean).join(" · ");
    persist();
    render();
  }
}

async function rollbackTurn(conv) {
  await json("POST", `/v1/sessions/${encodeURIComponent(conv.id)}/rollback`, { turns: 1 });
  const at = conv.messages.map((m) => m.role).lastIndexOf("user");
  return conv.messages.splice(at)[0];
}

async function regenerate() {
  const conv = currentConversation();
  const user = await rollbackTurn(conv);
  render();
  await send(user.content);
}

async function undo() { await rollbackTurn(currentConversation()); }

async function fork() {
  const conv = currentConversation();
  const info = await json("POST", `/v1/sessions/${encodeURIComponent(conv.id)}/fork`);
  addConversation(info.id, `${conv.title} (fork)`, structuredClone(conv.messages), conv.loaded);
}

async function save() {
  const conv = currentConversation();
  const info = await json("POST", `/v1/sessions/${encodeURIComponent(conv.id)}/snapshot`, {});
  app.saved.push({ name: info.name, title: conv.title, tokens: info.tokens, messages: structuredClone(conv.messages) });
  persist();
  app.notice = `saved ${info.tokens} tokens to ${info.name}`;
}

async function loadState(name) {
  const info = await json("POST", "/v1/sessions", { state_file: name });
  const known = app.saved.find((s) => s.name === name);
  const messages = known ? structuredClone(known.messages).map((m) => ({ ...m, restored: true })) : [];
  messages.push({ role: "note", content: `loaded ${name}: ${info.tokens} tokens` });
  addConversation(info.id, `${known ? known.title : name} (loaded)`, messages, true);
}

// ---- rendering -------------------------------------------------------------------------------------
const elements = new WeakMap();  // message -> its element (kept off the message, which is stored as JSON)

function messageElement(message) {
  const el = document.createElement("div");
  el.className = `msg ${message.role}`;
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = message.content;
  el.append(content);
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = message.meta || "";
  el.append(meta);
  elements.set(message, el);
  renderReply(message);
  return el;
}

function renderReply(message) {
  const el = elements.get(message);
  if (!el) return;
  el.querySelector(".content").textContent = message.content;
  el.querySelector(".meta").textContent = message.meta || "";
  el.classList.toggle("streaming", !!message.streaming);
  if (message.role === "assistant") el.dataset.chunks = message.chunks || 0;
  $("messages").scrollTop = $("messages").scrollHeight;
}

function listItem(text, active, onClick) {
  const li = document.createElement("li");
  li.textContent = text;
  li.title = text;
  li.classList.toggle("active", active);
  li.addEventListener("click", onClick);
  return li;
}

function render() {
  const conv = currentConversation();
  $("messages").replaceChildren(...(conv ? conv.messages.map(messageElement) : []));
  $("conversations").replaceChildren(...app.conversations.map((c) =>
    listItem(c.title, c.id === app.current, () => action(async () => { app.current = c.id; }))));
  $("saved").replaceChildren(...app.saved.map((s) =>
    listItem(`${s.title} · ${s.tokens} tokens`, false, () => { $("load-name").value = s.name; })));
  const undoable = !!conv && exchanges(conv) > 0;
  $("regenerate").disabled = app.busy || !undoable;
  $("undo").disabled = app.busy || !undoable;
  $("fork").disabled = app.busy || !conv;
  $("save").disabled = app.busy || !conv;
  $("send").disabled = app.busy;
  $("load").disabled = app.busy;
  $("new-chat").disabled = app.busy;
  $("stop").hidden = !app.busy;
}

// ---- wiring -------------------------------------------------------------------------------------------
// Runs one user action at a time: errors are shown, and the status is refreshed before the
// buttons come back, so what the page shows when it is idle again is the session's new state.
async function action(work) {
  if (app.busy) return;
  clearError();
  app.busy = true;
  app.notice = "";
  render();
  try { await work(); } catch (e) { showError(e); } finally {
    app.abort = null;
    persist();
    render();
    await refreshStatus();
    app.busy = false;
    render();
  }
}

function sendFromComposer() {
  const text = $("message").value.trim();
  if (!text || app.busy) return;
  $("message").value = "";
  action(() => send(text));
}

async function start() {
  $("api-key").value = app.key;
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    app.key = $("api-key").value.trim();
    localStorage.setItem(KEYS.apiKey, app.key);
    app.model = null;
    action(async () => { await ensureModel(); await syncSessions(); });
  });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); sendFromComposer(); });
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendFromComposer(); }
  });
  $("regenerate").addEventListener("click", () => action(regenerate));
  $("undo").addEventListener("click", () => action(undo));
  $("fork").addEventListener("click", () => action(fork));
  $("save").addEventListener("click", () => action(save));
  $("stop").addEventListener("click", () => { if (app.abort) app.abort.abort(); });
  $("new-chat").addEventListener("click", () => action(async () => { app.current = null; }));
  $("load-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const name = $("load-name").value.trim();
    if (name) action(() => loadState(name));
  });
  $("error-close").addEventListener("click", clearError);
  render();
  await action(async () => { await ensureModel(); await syncSessions(); });
}

// Drops remembered conversations whose session the server no longer has (a restart without --state-dir).
async function syncSessions() {
  const list = await json("GET", "/v1/sessions");
  const alive = new Set(list.data.map((s) => s.id));
  app.conversations = app.conversations.filter((c) => alive.has(c.id));
  if (!currentConversation()) app.current = app.conversations.length ? app.conversations.at(-1).id : null;
}

start();
