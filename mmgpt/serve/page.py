"""The web page at `/`: a chat about images. Pick, drop or paste one or more images (each gets its caption
from `POST /v1/caption`), ask, and watch the answer stream in; every question is sent with the whole
conversation to the OpenAI-compatible `POST /v1/chat/completions` (`stream: true`, server-sent events read
with fetch), so follow-ups about "it" or "the second image" work and the server reuses the past it kept.
The conversation's images stay in view as numbered thumbnails (those not sent yet can be removed);
Reset starts over. When the server wants
an API key, the page asks for it and keeps it in the page only (never stored)."""

from __future__ import annotations

import html

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mmgpt · $TITLE</title>
<style>
  body { font: 16px/1.5 system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #222; }
  main { max-width: 44rem; margin: 2rem auto; padding: 0 1rem; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  h2 { font-size: 1rem; margin: 1rem 0 .3rem; color: #555; }
  .model { color: #777; font-size: .85rem; margin-top: 0; }
  #drop { display: block; border: 2px dashed #aaa; border-radius: 8px; padding: 1.2rem; text-align: center;
          cursor: pointer; background: #fff; }
  #drop.over { border-color: #2a6; background: #efe; }
  #thumbs { display: flex; flex-wrap: wrap; gap: .5rem; margin: .8rem 0 0; }
  #thumbs:empty { display: none; }
  .thumb { position: relative; margin: 0; width: 6rem; }
  .thumb img { width: 6rem; height: 6rem; object-fit: cover; border-radius: 6px; display: block; background: #ddd; }
  .thumb.pending img { outline: 2px dashed #2a6; outline-offset: 2px; }
  .thumb .n { position: absolute; top: .2rem; left: .2rem; background: #000a; color: #fff; border-radius: 4px;
              padding: 0 .35rem; font-size: .75rem; }
  .thumb .x { position: absolute; top: .2rem; right: .2rem; border: 0; border-radius: 4px; padding: 0 .4rem;
              background: #000a; color: #fff; font-size: .8rem; line-height: 1.4; cursor: pointer; }
  .thumb:not(.pending) .x { display: none; }
  .thumb figcaption { font-size: .75rem; color: #555; line-height: 1.2; margin-top: .2rem; overflow-wrap: anywhere; }
  .out { background: #fff; border-radius: 6px; padding: .6rem .8rem; min-height: 1.5em; white-space: pre-wrap; }
  .out[data-state="busy"] { color: #888; }
  .out[data-state="error"], #error { color: #b00; }
  #log { display: flex; flex-direction: column; gap: .5rem; margin-top: 1rem; }
  .msg { border-radius: 8px; padding: .5rem .8rem; max-width: 85%; white-space: pre-wrap; overflow-wrap: anywhere; }
  .msg.user { align-self: flex-end; background: #dfeee3; }
  .msg.user.failed { opacity: .6; }
  .msg.user img { height: 2.5rem; width: 2.5rem; object-fit: cover; border-radius: 4px; margin-right: .3rem;
                  vertical-align: middle; }
  .msg.assistant { align-self: flex-start; background: #fff; min-width: 2rem; min-height: 1.5em; }
  .msg.assistant[data-state="busy"]:empty::after { content: "…"; color: #888; }
  .msg.assistant[data-state="error"] { color: #b00; }
  form { display: flex; gap: .5rem; margin-top: 1rem; }
  #question { flex: 1; padding: .4rem; font: inherit; }
  button { font: inherit; padding: .4rem 1rem; }
  .hint, details { color: #777; font-size: .85rem; }
  details { margin-top: .5rem; }
  #key { font: inherit; padding: .2rem .4rem; width: 20rem; max-width: 100%; }
</style>
</head>
<body>
<main>
  <h1>mmgpt</h1>
  <p class="model">$TITLE</p>
  <label id="drop" for="file">Drop images here, paste them, or click to choose (several at once is fine)</label>
  <input id="file" type="file" accept="image/*" multiple hidden>
  <div id="thumbs" aria-label="the images of the conversation"></div>
  <h2>Caption of the latest image</h2>
  <p id="caption" class="out" data-state="idle"></p>
  <div id="log" aria-live="polite"></div>
  <form id="ask-form">
    <input id="question" placeholder="Ask about the images" maxlength="1000" autocomplete="off">
    <button id="ask" type="submit" disabled>Send</button>
    <button id="reset" type="button">Reset</button>
  </form>
  <p id="error" role="alert"></p>
  <details id="key-box"><summary>API key</summary>
    <input id="key" type="password" autocomplete="off" placeholder="only if the server was started with --api-key">
    (kept in this page only)
  </details>
  <p class="hint">Images up to $MAX_MB MB. Each question is sent with the whole conversation to
    <code>/v1/chat/completions</code> (OpenAI-compatible). API: <a href="/docs">/docs</a></p>
</main>
<script>
"use strict";
const MAX_BYTES = $MAX_BYTES;
const SHRINK_BYTES = 1.5 * 2 ** 20, SHRINK_SIDE = 1024;  // larger images travel as a 1024-px JPEG
const $ = (id) => document.getElementById(id);
let messages = [];  // the conversation so far, in OpenAI's shape: sent whole with every question
let images = [];    // every image of the conversation, in order: {name, file, src, url, figure, sent, bad}
let pending = [];   // images added since the last question: they join the next one
let epoch = 0;      // Reset starts a new epoch: replies to an older conversation are dropped
let busy = null;    // the AbortController of the answer being streamed

function show(el, state, text) { el.dataset.state = state; el.textContent = text; }
function fail(text) { $("error").textContent = text; }
function ready() { $("ask").disabled = busy !== null || !images.some((im) => !im.bad); }

function headers(extra) {
  const key = $("key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function problem(r) {  // a failed response -> one line for the user
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON */ }
  if (r.status === 401) {
    $("key-box").open = true;
    $("key").focus();
    return $("key").value.trim() ? "the server refused this API key" : "this server needs an API key: enter it below";
  }
  if (body && body.error && body.error.message) return body.error.message;  // OpenAI's shape
  const d = body && body.detail;
  if (Array.isArray(d)) return d.map((e) => e.msg).join("; ");
  return d || `request failed (${r.status})`;
}

function readURL(blob) {
  return new Promise((ok, no) => {
    const reader = new FileReader();
    reader.onload = () => ok(reader.result);
    reader.onerror = () => no(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function dataURL(file) {  // what the chat sends: the file itself, or a smaller copy of a large one
  if (file.size <= SHRINK_BYTES) return readURL(file);
  try {
    const bitmap = await createImageBitmap(file);
    const scale = Math.min(1, SHRINK_SIDE / Math.max(bitmap.width, bitmap.height));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    const g = canvas.getContext("2d");
    g.fillStyle = "#fff";  // transparency on white, as the server reads it
    g.fillRect(0, 0, canvas.width, canvas.height);
    g.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    const blob = await new Promise((ok) => canvas.toBlob(ok, "image/jpeg", 0.92));
    return readURL(blob || file);
  } catch (_) {
    return readURL(file);  // the browser cannot decode it: the server says why
  }
}

function thumb(item) {
  const fig = document.createElement("figure");
  fig.className = "thumb pending";
  fig.title = `${item.name}: joins your next question`;
  const img = document.createElement("img");
  img.src = item.src;
  img.alt = item.name;
  const n = document.createElement("span");
  n.className = "n";
  const x = document.createElement("button");
  x.className = "x";
  x.type = "button";
  x.textContent = "×";
  x.title = x.ariaLabel = `remove ${item.name}`;
  x.addEventListener("click", () => { if (pending.includes(item)) discard(item); });
  const cap = document.createElement("figcaption");
  fig.append(img, n, x, cap);
  $("thumbs").append(fig);
  item.figure = fig;
  number();
}

function number() {  // thumbnails carry the image's place in the conversation: "1", "2", ...
  images.forEach((im, i) => { im.figure.querySelector(".n").textContent = String(i + 1); });
}

function add(files) {
  fail("");
  for (const file of files) {
    if (file.size > MAX_BYTES) { fail(`${file.name}: larger than ${MAX_BYTES} bytes`); continue; }
    const item = { name: file.name || "pasted image", file, src: URL.createObjectURL(file), sent: false, bad: false };
    item.url = dataURL(file);
    images.push(item);
    pending.push(item);
    thumb(item);
    caption(item, epoch);
  }
  ready();
}

function discard(item) {  // an image removed, or one the server cannot read, leaves before it is sent
  item.bad = true;
  images = images.filter((im) => im !== item);
  pending = pending.filter((im) => im !== item);
  item.figure.remove();  // its object URL lives on until Reset: a failed question's bubble may still show it
  number();
  ready();
}

async function caption(item, mine) {
  const el = $("caption");
  show(el, "busy", "…");
  const body = new FormData();
  body.append("images", item.file, item.name);
  try {
    const r = await fetch("/v1/caption", { method: "POST", body, headers: headers({}) });
    if (mine !== epoch || item.bad) return;
    const latest = () => images[images.length - 1] === item || !images.length;
    if (r.ok) {
      const text = (await r.json()).captions[0];
      item.figure.querySelector("figcaption").textContent = text;
      if (latest()) show(el, "done", text);
      return;
    }
    const why = await problem(r);
    if (why.startsWith("images[0]: ")) {  // this image: the server cannot read it
      if (!item.sent) discard(item);
      show(el, "error", `${item.name}: ${why.slice(11)}`);
    } else if (latest()) show(el, "error", why);
  } catch (err) { if (mine === epoch) show(el, "error", String(err)); }
}

function bubble(role, text, pictures) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  for (const im of pictures || []) {
    const img = document.createElement("img");
    img.src = im.src;
    img.alt = im.name;
    el.append(img);
  }
  el.append(text);
  $("log").append(el);
  el.scrollIntoView({ block: "nearest" });
  return el;
}

async function stream(r, el) {  // OpenAI's chunks as server-sent events -> the answer, shown as it grows
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", answer = "", finished = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") { finished = true; continue; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "generation failed");
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        answer += delta.content;
        el.textContent = answer;
        el.scrollIntoView({ block: "nearest" });
      }
    }
  }
  if (!finished) throw new Error("the answer stopped early");
  return answer;
}

async function ask(ev) {
  ev.preventDefault();
  const text = $("question").value.trim();
  if (!text || busy) return;
  if (!images.length) { fail("add an image first: drop one above, or click to choose"); return; }
  fail("");
  const mine = epoch, mineImages = pending;
  pending = [];
  const user = { role: "user", content: [] };
  const sent = bubble("user", text, mineImages);
  const el = bubble("assistant", "");
  const old = $("answer");
  if (old) old.removeAttribute("id");
  el.id = "answer";  // the latest answer
  show(el, "busy", "");
  $("question").value = "";
  busy = new AbortController();
  ready();
  try {
    for (const im of mineImages) user.content.push({ type: "image_url", image_url: { url: await im.url } });
    user.content.push({ type: "text", text });
    const body = JSON.stringify({ messages: [...messages, user], stream: true });
    if (new Blob([body]).size > MAX_BYTES) {  // bytes, as the server counts them
      throw new Error(`the conversation's images take more than the ${MAX_BYTES} bytes the server reads at once: ` +
                      "Reset, or use smaller images");
    }
    const r = await fetch("/v1/chat/completions", {
      method: "POST", body, signal: busy.signal, headers: headers({ "Content-Type": "application/json" }),
    });
    if (!r.ok) throw new Error(await problem(r));
    const answer = await stream(r, el);
    if (mine !== epoch) return;
    messages.push(user, { role: "assistant", content: answer });
    for (const im of mineImages) { im.sent = true; im.figure.classList.remove("pending"); im.figure.title = im.name; }
    show(el, "done", answer);
  } catch (err) {
    if (mine !== epoch) return;  // Reset stopped it
    show(el, "error", err.message || String(err));
    sent.classList.add("failed");
    pending = mineImages.filter((im) => !im.bad).concat(pending);  // they wait for the next question
    if (!$("question").value) $("question").value = text;
  } finally {
    if (mine === epoch) { busy = null; ready(); }
  }
}

function reset() {
  epoch += 1;
  if (busy) busy.abort();  // the server stops generating when the stream is closed
  busy = null;
  for (const im of images) URL.revokeObjectURL(im.src);
  messages = []; images = []; pending = [];
  $("thumbs").replaceChildren();
  $("log").replaceChildren();
  show($("caption"), "idle", "");
  fail("");
  $("question").value = "";
  ready();
}

$("file").addEventListener("change", (e) => { add([...e.target.files]); e.target.value = ""; });
const zone = $("drop");
zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  zone.classList.remove("over");
  add([...e.dataTransfer.files]);
});
document.addEventListener("paste", (e) => {  // images pasted anywhere in the chat (not in other sections)
  if (e.target !== document.body && !(e.target.closest && e.target.closest("main"))) return;
  const files = [...(e.clipboardData ? e.clipboardData.files : [])].filter((f) => f.type.startsWith("image/"));
  if (files.length) { e.preventDefault(); add(files); }
});
$("ask-form").addEventListener("submit", ask);
$("reset").addEventListener("click", reset);
</script>
</body>
</html>
"""


def render_page(title: str, max_upload_bytes: int) -> str:
    return (
        PAGE.replace("$TITLE", html.escape(title))
        .replace("$MAX_BYTES", str(int(max_upload_bytes)))
        .replace("$MAX_MB", f"{max_upload_bytes / 2**20:g}")
    )
