"""The web page at `/`: pick or drop an image, see its caption, ask questions and watch the answers
arrive piece by piece (server-sent events from `POST /v1/ask/stream`, read with fetch)."""

from __future__ import annotations

import html

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mmgpt · $TITLE</title>
<style>
  body { font: 16px/1.5 system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #222; }
  main { max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  .model { color: #777; font-size: .85rem; margin-top: 0; }
  #drop { display: block; border: 2px dashed #aaa; border-radius: 8px; padding: 1.5rem; text-align: center;
          cursor: pointer; background: #fff; }
  #drop.over { border-color: #2a6; background: #efe; }
  #preview { display: block; max-width: 100%; max-height: 18rem; margin: 1rem auto; }
  #preview:not([src]) { display: none; }
  .out { background: #fff; border-radius: 6px; padding: .6rem .8rem; min-height: 1.5em; white-space: pre-wrap; }
  .out[data-state="busy"] { color: #888; }
  .out[data-state="error"], #error { color: #b00; }
  form { display: flex; gap: .5rem; margin-top: 1rem; }
  #question { flex: 1; padding: .4rem; font: inherit; }
  button { font: inherit; padding: .4rem 1rem; }
  .hint { color: #777; font-size: .85rem; }
</style>
</head>
<body>
<main>
  <h1>mmgpt</h1>
  <p class="model">$TITLE</p>
  <label id="drop" for="file">Drop an image here, or click to choose one</label>
  <input id="file" type="file" accept="image/*" hidden>
  <img id="preview" alt="the chosen image">
  <h2>Caption</h2>
  <p id="caption" class="out" data-state="idle"></p>
  <form id="ask-form">
    <input id="question" placeholder="Ask a question about the image" maxlength="1000" autocomplete="off">
    <button id="ask" type="submit" disabled>Ask</button>
  </form>
  <p id="answer" class="out" data-state="idle"></p>
  <p id="error" role="alert"></p>
  <p class="hint">Images up to $MAX_MB MB. API: <a href="/docs">/docs</a></p>
</main>
<script>
"use strict";
const MAX_BYTES = $MAX_BYTES;
const $ = (id) => document.getElementById(id);
let image = null;
let turn = 0;  // a newer image or question makes older replies stale

function problem(body, status) {
  const d = body && body.detail;
  if (Array.isArray(d)) return d.map((e) => e.msg).join("; ");
  return d || `request failed (${status})`;
}

function show(el, state, text) { el.dataset.state = state; el.textContent = text; }

function choose(file) {
  $("error").textContent = "";
  if (!file) return;
  if (file.size > MAX_BYTES) { $("error").textContent = `${file.name}: larger than ${MAX_BYTES} bytes`; return; }
  image = file;
  $("preview").src = URL.createObjectURL(file);
  $("ask").disabled = false;
  show($("answer"), "idle", "");
  caption(file, ++turn);
}

async function caption(file, mine) {
  const el = $("caption");
  show(el, "busy", "…");
  const body = new FormData();
  body.append("images", file);
  try {
    const r = await fetch("/v1/caption", { method: "POST", body });
    const j = await r.json();
    if (mine !== turn) return;
    if (r.ok) show(el, "done", j.captions[0]); else show(el, "error", problem(j, r.status));
  } catch (err) { if (mine === turn) show(el, "error", String(err)); }
}

function onEvent(raw, el) {  // one server-sent event: "event: NAME" and "data: JSON" lines
  let name = "message", data = "";
  for (const line of raw.split("\\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  const j = data ? JSON.parse(data) : {};
  if (name === "message") { el.textContent += j.text; }
  else if (name === "done") { show(el, "done", j.answer); }
  else if (name === "error") { show(el, "error", j.detail); }
}

async function ask(ev) {
  ev.preventDefault();
  const question = $("question").value.trim();
  if (!image || !question) return;
  const mine = ++turn, el = $("answer");
  show(el, "busy", "");
  const body = new FormData();
  body.append("image", image);
  body.append("question", question);
  try {
    const r = await fetch("/v1/ask/stream", { method: "POST", body });
    if (!r.ok) { const j = await r.json(); if (mine === turn) show(el, "error", problem(j, r.status)); return; }
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done || mine !== turn) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\\n\\n")) >= 0) {
        onEvent(buffer.slice(0, end), el);
        buffer = buffer.slice(end + 2);
      }
    }
    if (mine === turn && el.dataset.state === "busy") show(el, "error", "the answer stopped early");
  } catch (err) { if (mine === turn) show(el, "error", String(err)); }
}

$("file").addEventListener("change", (e) => choose(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  choose(e.dataTransfer.files[0]);
});
$("ask-form").addEventListener("submit", ask);
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
