// qvl web page: chat with images and videos through the server's own OpenAI-compatible API.
// Plain JS, no dependencies. Everything the model or the server says is inserted with textContent,
// never as HTML. The API key (when the server has one) lives only in sessionStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "qvl.apiKey";
const state = {
  model: null, maxModelLen: null,
  history: [],        // OpenAI messages sent so far (assistant text as the model wrote it)
  firstImage: null,   // data URL of the conversation's first image: qvl_boxes are in its pixels
  pending: [],        // attachments of the next message: {kind, name, url, info, el}
  controller: null,   // AbortController of the reply being streamed
  tokenizeSeq: 0,
};

// ------------------------------------------------------------------------------------------ helpers

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function showError(msg) { $("error-text").textContent = msg; $("error").hidden = false; }
function clearError() { $("error").hidden = true; $("error-text").textContent = ""; }

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// A non-2xx response -> HttpError with the server's message (OpenAI error body) or the raw text.
async function httpError(resp) {
  let msg = resp.statusText || "request failed";
  try {
    const text = await resp.text();
    try {
      const body = JSON.parse(text);
      msg = (body.error && body.error.message) || text;
    } catch (_) { if (text) msg = text; }
  } catch (_) { /* body unreadable: keep the status text */ }
  return new HttpError(resp.status, msg);
}

function describe(err) {
  if (err instanceof HttpError) {
    let msg = `Error ${err.status}: ${err.message}`;
    if (err.status === 401) msg += " — enter the server's API key above.";
    return msg;
  }
  if (err instanceof TypeError) return "Cannot reach the server (connection refused or dropped): " + err.message;
  return String(err && err.message ? err.message : err);
}

async function api(path, body) {
  const init = body === undefined ? { headers: headers() }
                                  : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const resp = await fetch(path, init);
  if (!resp.ok) throw await httpError(resp);
  return resp.json();
}

function needKey(message) {
  $("key-form").hidden = false;
  if (message) showError(message);
  $("api-key").focus();
}

// ------------------------------------------------------------------------------------------ model

async function loadModel() {
  try {
    const body = await api("/v1/models");
    const m = body.data[0];
    state.model = m.id;
    state.maxModelLen = m.max_model_len;
    $("model-id").textContent = m.id;
    $("max-model-len").textContent = String(m.max_model_len);
    clearError();
    if (sessionStorage.getItem(KEY_STORE)) $("key-form").hidden = true;
    updateTokens();
  } catch (err) {
    if (err instanceof HttpError && err.status === 401) needKey(describe(err));
    else showError(describe(err));
  }
}

// ------------------------------------------------------------------------------------------ attachments

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

function contentPart(att) {
  return att.kind === "video" ? { type: "video_url", video_url: { url: att.url } }
                              : { type: "image_url", image_url: { url: att.url } };
}

async function addFiles(files) {
  for (const file of files) {
    const kind = file.type.startsWith("video/") ? "video" : file.type.startsWith("image/") ? "image" : null;
    if (!kind) {
      showError(`Not an image or video: ${file.name || "(pasted item)"} (${file.type || "unknown type"})`);
      continue;
    }
    const att = { kind, name: file.name || (kind + " (pasted)"), url: await readAsDataURL(file), info: null };
    att.el = thumb(att);
    $("attachments").appendChild(att.el);
    state.pending.push(att);
  }
  updateTokens();
}

function thumb(att) {
  const box = el("div", "thumb");
  box.dataset.kind = att.kind;
  const media = el(att.kind === "video" ? "video" : "img");
  media.src = att.url;
  if (att.kind === "video") { media.muted = true; media.preload = "metadata"; } else media.alt = att.name;
  const remove = el("button", "remove", "×");
  remove.type = "button";
  remove.title = "remove";
  remove.addEventListener("click", () => {
    state.pending = state.pending.filter((a) => a !== att);
    box.remove();
    updateTokens();
  });
  box.append(media, remove, el("div", "caption name", att.name), el("div", "caption size", "…"),
             el("div", "caption tok", "counting tokens…"));
  return box;
}

// The next request's messages: history + the pending user message.
function nextMessages(text) {
  const content = state.pending.map(contentPart);
  if (text) content.push({ type: "text", text });
  if (!content.length) content.push({ type: "text", text: "" });
  return [...state.history, { role: "user", content }];
}

let tokenTimer = null;
function updateTokens() {
  clearTimeout(tokenTimer);
  tokenTimer = setTimeout(countTokens, 150);
}

// /tokenize on what would be sent: per-item resized size and tokens, and the total against the context.
async function countTokens() {
  if (state.model === null) return;
  const seq = ++state.tokenizeSeq;
  const pending = state.pending.slice();
  try {
    const body = await api("/tokenize", { model: state.model, messages: nextMessages($("prompt").value) });
    if (seq !== state.tokenizeSeq) return;
    const items = body.items.slice(body.items.length - pending.length);
    pending.forEach((att, i) => {
      const it = items[i];
      if (!it) return;
      att.info = it;
      const [ow, oh] = it.original_size, [rw, rh] = it.resized_size;
      att.el.querySelector(".size").textContent = `${ow}×${oh} → ${rw}×${rh}`;
      att.el.querySelector(".tok").textContent = `${it.tokens} tokens`;
      att.el.dataset.tokens = String(it.tokens);
    });
    const total = $("token-total");
    total.textContent = `prompt: ${body.count} / ${body.max_model_len} tokens (${body.visual_tokens} visual)`;
    total.dataset.count = String(body.count);
    total.classList.toggle("over", body.count > body.max_model_len);
  } catch (err) {
    if (seq !== state.tokenizeSeq) return;
    pending.forEach((att) => { att.el.querySelector(".tok").textContent = "not counted"; });
    $("token-total").textContent = "";
    showError(describe(err));
  }
}

// ------------------------------------------------------------------------------------------ chat

function addMessage(role, text) {
  const box = el("div", "msg " + role);
  box.append(el("div", "role", role), el("div", "media"), el("div", "text", text || ""));
  $("chat").appendChild(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

// Visible text: the grounding tags (<|box_start|> …) dropped, everything else literal.
function visibleText(raw) { return raw.replace(/<\|[a-z_]+\|>/g, " ").replace(/ {2,}/g, " ").trim(); }

// Boxes (qvl_boxes: pixels in the original image) drawn over a copy of the image, as % of its size.
function drawBoxes(msgEl, imageUrl, boxes) {
  if (!imageUrl || !boxes || !boxes.length) return;
  const fig = el("div", "grounding");
  const img = el("img");
  img.alt = "grounding";
  fig.appendChild(img);
  img.addEventListener("load", () => {
    const W = img.naturalWidth, H = img.naturalHeight;
    for (const b of boxes) {
      const p = b.pixels;
      if (!p || p.length < 4) continue;
      const xs = p.filter((_, i) => i % 2 === 0), ys = p.filter((_, i) => i % 2 === 1);
      const x1 = Math.min(...xs), x2 = Math.max(...xs), y1 = Math.min(...ys), y2 = Math.max(...ys);
      const r = el("div", "box");
      r.style.left = (100 * x1 / W) + "%";
      r.style.top = (100 * y1 / H) + "%";
      r.style.width = (100 * (x2 - x1) / W) + "%";
      r.style.height = (100 * (y2 - y1) / H) + "%";
      r.dataset.pixels = p.join(",");
      r.title = `${b.label || "box"}: ${p.join(", ")}`;
      r.appendChild(el("span", "box-label", b.label || "box"));
      fig.appendChild(r);
    }
  });
  img.src = imageUrl;
  msgEl.appendChild(fig);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// SSE: yields each `data:` payload (parsed JSON, or the string "[DONE]").
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        yield data === "[DONE]" ? data : JSON.parse(data);
      }
    }
  }
}

function sampling() {
  const out = { temperature: Number($("temperature").value || 0) };
  const maxTokens = $("max-tokens").value;
  if (maxTokens) out.max_tokens = Number(maxTokens);
  const seed = $("seed").value;
  if (seed !== "") out.seed = Number(seed);
  if ($("ignore-eos").checked) out.ignore_eos = true;
  return out;
}

async function send() {
  if (state.controller) return;
  const text = $("prompt").value.trim();
  if (!text && !state.pending.length) return;
  if (state.model === null) { await loadModel(); if (state.model === null) return; }
  clearError();
  const messages = nextMessages(text);
  const sent = state.pending;
  const userEl = addMessage("user", text);
  for (const att of sent) {
    const m = el(att.kind === "video" ? "video" : "img");
    m.src = att.url;
    if (att.kind === "video") m.controls = true;
    userEl.querySelector(".media").appendChild(m);
    if (att.kind === "image" && !state.firstImage) state.firstImage = att.url;
  }
  state.pending = [];
  $("attachments").replaceChildren();
  $("prompt").value = "";

  const reply = addMessage("assistant");
  reply.classList.add("streaming");
  const textEl = reply.querySelector(".text");
  let raw = "", finish = null, boxes = null, started = false;
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model: state.model, messages, stream: true, ...sampling() }),
    });
    if (!resp.ok) throw await httpError(resp);
    started = true;
    let done = false;
    for await (const ev of sseEvents(resp)) {
      if (ev === "[DONE]") { done = true; break; }
      if (ev.error) throw new Error("Server error: " + ev.error.message);
      for (const c of ev.choices || []) {
        if (c.delta && c.delta.content) {
          raw += c.delta.content;
          textEl.textContent = visibleText(raw);
        }
        if (c.finish_reason) finish = c.finish_reason;
        if (c.qvl_boxes) boxes = c.qvl_boxes;
      }
    }
    if (!done) throw new Error("The connection dropped before the reply finished.");
    state.history = [...messages, { role: "assistant", content: raw }];
    if (finish) reply.appendChild(el("div", "note", "finish: " + finish));
    drawBoxes(reply, state.firstImage, boxes);
  } catch (err) {
    if (err.name === "AbortError") {
      reply.appendChild(el("div", "note stopped", "stopped"));
      reply.classList.add("stopped");
    } else {
      reply.appendChild(el("div", "note stopped", "failed"));
      if (err instanceof HttpError && err.status === 401) needKey(describe(err));
      else if (started && err instanceof TypeError) showError("The connection dropped mid-reply: " + err.message);
      else showError(err instanceof HttpError || err instanceof TypeError ? describe(err) : err.message);
    }
    if (raw) state.history = [...messages, { role: "assistant", content: raw }];
  } finally {
    reply.classList.remove("streaming");
    reply.classList.add("done");
    state.controller = null;
    setBusy(false);
    updateTokens();
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  state.firstImage = null;
  state.pending = [];
  $("attachments").replaceChildren();
  $("chat").replaceChildren();
  clearError();
  updateTokens();
}

// ------------------------------------------------------------------------------------------ wiring

function init() {
  $("send").addEventListener("click", send);
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("clear").addEventListener("click", newChat);
  $("error-close").addEventListener("click", clearError);
  $("file").addEventListener("change", (e) => { addFiles([...e.target.files]); e.target.value = ""; });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
  });
  $("prompt").addEventListener("input", updateTokens);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
    $("api-key").value = "";
    loadModel();
  });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; $("drop-overlay").hidden = false; });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop-overlay").hidden = true; } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    $("drop-overlay").hidden = true;
    addFiles([...e.dataTransfer.files]);
  });
  loadModel();
}

init();
