// The demo page: a chat that streams from /v1/chat/completions, and a live view of the
// expert cache fed by /api/cache/stream (server-sent snapshots, a few per second).
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];
let modelName = null;
let busy = false;
let previous = null; // the last cache snapshot, to show what changed
let snapshots = 0;

function apiKey() {
  return sessionStorage.getItem("edgemoe-key");
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h.Authorization = "Bearer " + apiKey();
  return h;
}

function bytes(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(2) + " GB";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + " MB";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + " kB";
  return n + " B";
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

// Reads a text/event-stream body and calls onData with each event's parsed JSON.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  busy = true;
  $("send").disabled = true;
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.classList.add("streaming");
  const started = performance.now();
  let tokens = 0;
  let firstToken = null;
  let reply = "";
  try {
    const body = {
      model: modelName,
      messages: conversation,
      stream: true,
      stream_options: { include_usage: true },
      temperature: parseFloat($("temperature").value),
      max_tokens: parseInt($("max-tokens").value, 10),
    };
    let response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (response.status === 401) {
      const key = prompt("This server needs an API key:");
      if (key) sessionStorage.setItem("edgemoe-key", key);
      response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    }
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || response.statusText);
    }
    let usage = null;
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (firstToken === null) firstToken = performance.now();
          tokens += 1;
          reply += piece;
          out.textContent = reply;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
      }
    });
    conversation.push({ role: "assistant", content: reply });
    const meta = document.createElement("span");
    meta.className = "meta";
    const seconds = (performance.now() - started) / 1000;
    const n = usage ? usage.completion_tokens : tokens;
    meta.textContent = `${n} tokens in ${seconds.toFixed(2)} s, first after ${((firstToken || performance.now()) - started).toFixed(0)} ms`;
    out.appendChild(meta);
  } catch (e) {
    out.classList.add("error");
    out.textContent = reply + (reply ? "\n" : "") + "error: " + e.message;
    conversation.pop();
  } finally {
    out.classList.remove("streaming");
    out.classList.add("done");
    busy = false;
    $("send").disabled = false;
  }
}

function renderCache(s) {
  snapshots += 1;
  document.body.dataset.snapshots = snapshots;
  $("tps").textContent = s.tokens_per_s.toFixed(1);
  $("hit-rate").textContent = (100 * s.hit_rate).toFixed(1) + "%";
  $("bytes-read").textContent = bytes(s.bytes_read);
  $("queue").textContent = s.queue + (s.running ? ` + ${s.running_requests || 1} running` : "");
  const budget = s.memory_budget || s.expert_bytes;
  $("cache-bytes").textContent = `${bytes(s.expert_cache_bytes)} of ${s.memory_budget ? "a budget of " + bytes(budget) : bytes(budget) + " (no budget)"}`;
  $("cache-bar").style.width = Math.min(100, (100 * s.expert_cache_bytes) / budget) + "%";
  $("rss").textContent = `${bytes(s.rss_bytes)} of ${bytes(s.memory_needed)} needed at most`;
  $("rss-bar").style.width = Math.min(100, (100 * s.rss_bytes) / s.memory_needed) + "%";
  const tbody = $("layers").querySelector("tbody");
  s.layers.forEach((layer, i) => {
    let row = tbody.children[i];
    if (!row) {
      row = document.createElement("tr");
      row.innerHTML = `<td>${layer.layer}</td><td class="experts"></td><td class="hits"></td><td class="misses"></td>`;
      for (let e = 0; e < s.experts_per_layer; e++) {
        const cell = document.createElement("i");
        cell.className = "cell";
        cell.title = `layer ${layer.layer}, expert ${e}`;
        row.children[1].appendChild(cell);
      }
      tbody.appendChild(row);
    }
    const before = previous ? previous.layers[i] : null;
    const was = new Set(before ? before.resident : []);
    const now = new Set(layer.resident);
    const cells = row.children[1].children;
    for (let e = 0; e < cells.length; e++) {
      let cls = "cell";
      if (now.has(e)) cls += before && !was.has(e) ? " loaded" : " resident";
      else if (was.has(e)) cls += " evicted";
      cells[e].className = cls;
    }
    const dh = before ? layer.hits - before.hits : 0;
    const dm = before ? layer.misses - before.misses : 0;
    row.querySelector(".hits").textContent = layer.hits + (dh ? ` (+${dh})` : "");
    row.querySelector(".misses").textContent = layer.misses + (dm ? ` (+${dm})` : "");
  });
  previous = s;
}

function connectCache() {
  const source = new EventSource("/api/cache/stream");
  source.onopen = () => {
    $("status").textContent = "live";
  };
  source.onmessage = (event) => {
    const s = JSON.parse(event.data);
    if (!modelName) {
      modelName = s.model;
      $("model-name").textContent = `${s.model}, ${s.layers.length} MoE layers × ${s.experts_per_layer} experts, top-${s.top_k}, context ${s.context}`;
    }
    renderCache(s);
  };
  source.onerror = () => {
    $("status").textContent = "reconnecting…";
  };
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || busy) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("reset").addEventListener("click", () => {
  conversation.length = 0;
  $("messages").textContent = "";
});
connectCache();
