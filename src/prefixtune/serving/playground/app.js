"use strict";
// The playground's logic. It lists the served models (/v1/models), shows a card per chosen one (its
// /v1/models/{name}/card), asks each the same prompt through the server's own OpenAI endpoints, streamed, or
// /v1/classify, and makes the admin calls. Why so plain: the page must ship inside the Python package and run
// as served, with no build step. Two rules hold throughout: whatever a user, a model or the server wrote is
// inserted with textContent, never as HTML; and the admin token is read only by `adminHeaders`, which only
// the upload and delete calls use.

const MAX_MODELS = 4;
const byId = (id) => document.getElementById(id);
const state = { settings: null, models: [], chosen: null, cards: new Map(), controller: null };

// ------------------------------------------------------------------------------ talking to the server
/** The server's error message from a failed response (OpenAI's {"error": {"message"}} shape), else its status. */
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) {
    // not JSON: the status line says what there is to say
  }
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

async function getJSON(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(await errorOf(response));
  return response.json();
}

function postJSON(url, body, signal, headers = {}) {
  return fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...headers },
    body: JSON.stringify(body),
    signal,
  });
}

/** The JSON events of a server-sent event stream, until [DONE]. */
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim())
        .join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// ------------------------------------------------------------------------------ small DOM helpers
function show(element, text) {
  element.textContent = text || "";
  element.hidden = !text;
}

const notice = (text) => show(byId("notice"), text);

function adminStatus(text, failed = false) {
  const status = byId("admin-status");
  status.textContent = text;
  status.classList.toggle("error", failed);
}

function addMeta(card, field, term, value) {
  if (value === null || value === undefined || value === "") return;
  const list = card.querySelector(".meta");
  let dd = list.querySelector(`dd[data-field="${field}"]`);
  if (!dd) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    dd = document.createElement("dd");
    dd.dataset.field = field;
    list.append(dt, dd);
  }
  dd.textContent = String(value);
}

const formatNumber = (v) => (Number.isInteger(v) ? v.toLocaleString("en") : v.toFixed(4));

// ------------------------------------------------------------------------------ models and cards
async function loadModels() {
  const list = await getJSON("v1/models");
  state.models = list.data;
  const ids = state.models.map((m) => m.id);
  // first visit: the bare model and two prefixes, to compare at once
  state.chosen = state.chosen === null ? ids.slice(0, 3) : state.chosen.filter((id) => ids.includes(id));
  renderModelList();
  renderDeleteList();
  renderCards();
}

function describe(model) {
  if (!model.parent) return "bare model, no prefix";
  return [model.method, model.num_virtual_tokens && `${model.num_virtual_tokens} tokens`].filter(Boolean).join(", ");
}

function renderModelList() {
  const list = byId("model-list");
  list.replaceChildren();
  for (const model of state.models) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = model.id;
    box.checked = state.chosen.includes(model.id);
    box.disabled = !box.checked && state.chosen.length >= MAX_MODELS;
    box.addEventListener("change", () => {
      const checked = new Set([...list.querySelectorAll("input:checked")].map((b) => b.value));
      state.chosen = state.models.map((m) => m.id).filter((id) => checked.has(id));
      renderModelList();
      renderCards();
    });
    const name = document.createElement("span");
    name.className = "model-name";
    name.textContent = model.id;
    const what = document.createElement("small");
    what.textContent = describe(model);
    label.append(box, name, what);
    list.append(label);
  }
}

function renderDeleteList() {
  const select = byId("delete-name");
  select.replaceChildren();
  for (const model of state.models.filter((m) => m.parent)) {
    const option = document.createElement("option");
    option.value = option.textContent = model.id;
    select.append(option);
  }
}

function renderCards() {
  const cards = byId("cards");
  for (const id of [...state.cards.keys()]) {
    if (!state.chosen.includes(id)) state.cards.delete(id);
  }
  cards.replaceChildren(
    ...state.chosen.map((id) => {
      if (!state.cards.has(id)) state.cards.set(id, newCard(state.models.find((m) => m.id === id)));
      return state.cards.get(id);
    }),
  );
}

function newCard(model) {
  const card = byId("card-template").content.firstElementChild.cloneNode(true);
  card.dataset.model = model.id;
  card.querySelector(".name").textContent = model.id;
  if (model.parent) {
    addMeta(card, "method", "method", model.method);  // until the card from its folder says more
    addMeta(card, "num_virtual_tokens", "length", model.num_virtual_tokens && `${model.num_virtual_tokens} virtual tokens`);
    fillCard(card, model.id);
  } else {
    addMeta(card, "kind", "kind", describe(model));
  }
  addMeta(card, "task", "task", model.task);
  return card;
}

/** The prefix's card from its folder: method, length, base model, parameters, curves and test metrics. */
async function fillCard(card, id) {
  const name = encodeURIComponent(id);
  let facts;
  try {
    facts = await getJSON(`v1/models/${name}/card`);
  } catch (error) {
    show(card.querySelector(".card-error"), `card: ${error.message}`);
    return;
  }
  addMeta(card, "method", "method", facts.reparam ? `${facts.method} (${facts.reparam} reparameterisation)` : facts.method);
  addMeta(card, "num_virtual_tokens", "length", facts.num_virtual_tokens && `${facts.num_virtual_tokens} virtual tokens`);
  const architecture = facts.architecture && (facts.base_model ? `(${facts.architecture})` : facts.architecture);
  addMeta(card, "base_model", "base model", [facts.base_model, architecture].filter(Boolean).join(" "));
  addMeta(card, "trainable_parameters", "trainable parameters", formatNumber(facts.trainable_parameters));
  addMeta(card, "dataset", "data set", facts.dataset);
  if (facts.curves) {
    const img = card.querySelector(".curves");
    img.addEventListener("error", () => (img.hidden = true), { once: true });
    img.src = `v1/models/${name}/curves.png`;
    img.hidden = false;
  }
  const metrics = Object.entries(facts.test_metrics || {});
  const table = card.querySelector(".metrics");
  table.querySelector("tbody").replaceChildren(
    ...metrics.map(([metric, value]) => {
      const row = document.createElement("tr");
      const th = document.createElement("th");
      th.textContent = metric;
      const td = document.createElement("td");
      td.textContent = formatNumber(value);
      row.append(th, td);
      return row;
    }),
  );
  table.hidden = metrics.length === 0;
}

// ------------------------------------------------------------------------------ asking
function generationRequest() {
  const mode = byId("mode").value;
  const body = {
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number(byId("temperature").value),
    max_tokens: Number(byId("max-tokens").value),
  };
  const stop = byId("stop").value.split("\n").filter((s) => s.length > 0);
  if (stop.length) body.stop = stop;
  const text = byId("prompt").value;
  if (mode === "chat") {
    const system = byId("system").value;
    body.messages = [...(system ? [{ role: "system", content: system }] : []), { role: "user", content: text }];
  } else {
    body.prompt = text;
  }
  return { url: mode === "chat" ? "v1/chat/completions" : "v1/completions", chat: mode === "chat", body };
}

async function streamInto(card, model, request, signal) {
  const response = await postJSON(request.url, { ...request.body, model }, signal);
  if (!response.ok) throw new Error(await errorOf(response));
  const answer = card.querySelector(".answer");
  let text = "";
  let finish = null;
  let usage = null;
  for await (const event of events(response)) {
    if (event.error) throw new Error(event.error.message);
    for (const choice of event.choices || []) {
      const piece = request.chat ? choice.delta && choice.delta.content : choice.text;
      if (piece) {
        text += piece;
        answer.textContent = text;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (event.usage) usage = event.usage;
  }
  const tokens = usage ? `${usage.completion_tokens} tokens` : "";
  return [`finished: ${finish || "?"}`, tokens].filter(Boolean).join(" · ");
}

async function classifyInto(card, model, text, signal) {
  const response = await postJSON("v1/classify", { model, input: text }, signal);
  if (!response.ok) throw new Error(await errorOf(response));
  const row = (await response.json()).data[0];
  const bars = card.querySelector(".bars");
  bars.replaceChildren(
    ...Object.entries(row.probabilities).map(([label, p]) => {
      const bar = document.createElement("div");
      bar.className = label === row.label ? "bar best" : "bar";
      bar.dataset.label = label;
      bar.dataset.probability = String(p);
      const name = document.createElement("span");
      name.className = "label";
      name.textContent = label;
      const track = document.createElement("div");
      track.className = "track";
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.style.width = `${(100 * p).toFixed(2)}%`;
      track.append(fill);
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = `${(100 * p).toFixed(1)}%`;
      bar.append(name, track, value);
      return bar;
    }),
  );
  return `label: ${row.label}`;
}

async function ask(card, model, text, request, signal) {
  card.dataset.state = "running";
  card.querySelector(".answer").textContent = "";
  card.querySelector(".bars").replaceChildren();
  show(card.querySelector(".card-error"), "");
  const status = card.querySelector(".status");
  status.textContent = "…";
  try {
    status.textContent = request
      ? await streamInto(card, model, request, signal)
      : await classifyInto(card, model, text, signal);
    card.dataset.state = "done";
  } catch (error) {
    const stopped = error.name === "AbortError";
    status.textContent = stopped ? "stopped" : "failed";
    if (!stopped) show(card.querySelector(".card-error"), error.message);
    card.dataset.state = stopped ? "stopped" : "error";
  }
}

async function run() {
  notice("");
  const text = byId("prompt").value;
  if (!state.chosen || !state.chosen.length) return notice("Choose at least one model.");
  if (!text.trim()) return notice("Type a prompt first.");
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  const request = state.settings.task === "classification" ? null : generationRequest();
  byId("cancel").disabled = false;
  try {
    await Promise.all(state.chosen.map((id) => ask(state.cards.get(id), id, text, request, controller.signal)));
  } finally {
    if (state.controller === controller) {
      state.controller = null;
      byId("cancel").disabled = true;
    }
  }
}

// ------------------------------------------------------------------------------ admin
/** The only reader of the admin token: the upload and delete calls, and nothing else, send it. */
function adminHeaders() {
  const token = byId("admin-token").value.trim();
  if (!token) throw new Error("Type the admin token first.");
  return { Authorization: `Bearer ${token}` };
}

function base64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

async function upload() {
  try {
    const headers = adminHeaders();
    const name = byId("upload-name").value.trim();
    const [configFile] = byId("upload-config").files;
    const [weightsFile] = byId("upload-weights").files;
    if (!name) throw new Error("Name the prefix.");
    if (!configFile || !weightsFile) throw new Error("Choose its prefixtune_config.json and prefixtune_model.safetensors.");
    let config;
    try {
      config = JSON.parse(await configFile.text());
    } catch (error) {
      throw new Error(`${configFile.name} is not JSON: ${error.message}`);
    }
    adminStatus(`uploading ${name}…`);
    const weights = base64(new Uint8Array(await weightsFile.arrayBuffer()));
    const query = byId("upload-replace").checked ? "?replace=true" : "";
    const response = await postJSON(`admin/prefixes/${encodeURIComponent(name)}${query}`, { config, weights }, undefined, headers);
    if (!response.ok) throw new Error(await errorOf(response));
    adminStatus(`uploaded ${name}`);
    state.cards.delete(name); // a replaced prefix gets a fresh card
    await loadModels();
  } catch (error) {
    adminStatus(error.message, true);
  }
}

async function remove() {
  try {
    const headers = adminHeaders();
    const name = byId("delete-name").value;
    if (!name) throw new Error("There is no prefix to delete.");
    if (!window.confirm(`Delete the prefix ${name} from the server's folder?`)) return;
    const response = await fetch(`admin/prefixes/${encodeURIComponent(name)}`, { method: "DELETE", headers });
    if (!response.ok) throw new Error(await errorOf(response));
    adminStatus(`deleted ${name}`);
    await loadModels();
  } catch (error) {
    adminStatus(error.message, true);
  }
}

// ------------------------------------------------------------------------------ start
function showMode() {
  const chat = byId("mode").value === "chat";
  for (const element of document.querySelectorAll(".chat-only")) element.hidden = !chat;
}

async function start() {
  try {
    state.settings = await getJSON("playground/settings");
  } catch (error) {
    return notice(`Cannot read the server's settings: ${error.message}`);
  }
  const s = state.settings;
  const generates = s.task !== "classification";
  byId("base-model").textContent = s.model;
  byId("task").textContent = s.task;
  for (const element of document.querySelectorAll(".generate-only")) element.hidden = !generates;
  byId("prompt-label").textContent = generates ? "Prompt" : "Text to classify";
  byId("run").textContent = generates ? "Run" : "Classify";
  byId("mode").querySelector('option[value="chat"]').disabled = !s.chat;
  const maxTokens = byId("max-tokens");
  maxTokens.max = String(s.max_tokens_limit);
  maxTokens.value = String(Math.min(Number(maxTokens.value), s.max_tokens_limit));
  byId("admin").hidden = !s.admin;

  byId("mode").addEventListener("change", showMode);
  byId("run").addEventListener("click", run);
  byId("cancel").addEventListener("click", () => state.controller && state.controller.abort());
  byId("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) run();
  });
  byId("upload").addEventListener("click", upload);
  byId("delete").addEventListener("click", remove);
  showMode();
  try {
    await loadModels();
  } catch (error) {
    notice(`Cannot list the models: ${error.message}`);
  }
}

start();
