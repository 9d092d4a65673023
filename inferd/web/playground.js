// The playground: one prompt, two to four models side by side, each answer streamed into its own pane.
//
// A pane keeps its own conversation (the shared system prompt goes first in every request) and
// measures what the person sees: time to first token and tokens per second from the browser's clock,
// tokens from the stream's usage chunk, cost from the price book (/v1/deployments) for the deployment
// the x-inferd-deployment header names, and any fallback or degradation the gateway did.

import { ApiError, costOf, formatMs, formatUsd, getJson, getKey, streamChat } from "./api.js";

const MIN_PANES = 2;
const MAX_PANES = 4;
const MIN_DECODE_MS = 50;  // below this, chunks arrive batched in a few reads and a per-token rate is noise

const $ = (id) => document.getElementById(id);
let models = [];          // chat model groups the server serves
let prices = new Map();   // deployment id -> price
const panes = [];

function sharedParams() {
  const params = {};
  const temperature = $("temperature").value;
  if (temperature !== "") params.temperature = Number(temperature);
  const maxTokens = $("max-tokens").value;
  if (maxTokens !== "") params.max_tokens = Number(maxTokens);
  const seed = $("seed").value;
  if (seed !== "") params.seed = Number(seed);
  if ($("json-mode").checked) params.response_format = { type: "json_object" };
  const tools = $("tools").value.trim();
  if (tools) params.tools = JSON.parse(tools);  // a SyntaxError is shown under the prompt
  return params;
}

function requestBody(pane) {
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...pane.messages] : [...pane.messages];
  return { model: pane.select.value, messages, stream: true, stream_options: { include_usage: true },
           ...pane.params };
}

class Pane {
  constructor() {
    const node = $("pane-template").content.firstElementChild.cloneNode(true);
    this.el = node;
    this.select = node.querySelector(".model");
    this.log = node.querySelector(".log");
    this.error = node.querySelector(".pane-error");
    this.status = node.querySelector(".status");
    this.messages = [];
    this.params = {};
    this.controller = null;
    this.lastBody = null;  // what the pane sent last: what "copy as" writes
    this.stopButton = node.querySelector(".stop");
    this.rerunButton = node.querySelector(".rerun");
    this.stopButton.addEventListener("click", () => this.stop());
    this.rerunButton.addEventListener("click", () => this.rerun());
    node.querySelector(".clear").addEventListener("click", () => this.clear());
    node.querySelector(".remove").addEventListener("click", () => removePane(this));
    node.querySelector(".copy-curl").addEventListener("click", () => showCode("curl", asCurl(this.snippetBody())));
    node.querySelector(".copy-python").addEventListener("click",
      () => showCode("Python", asPython(this.snippetBody())));
    this.fillModels();
  }

  fillModels(preferred) {
    const current = preferred || this.select.value;
    this.select.replaceChildren(...models.map((m) => new Option(m, m)));
    if (models.includes(current)) this.select.value = current;
  }

  metric(name, text) {
    this.el.querySelector(`[data-m="${name}"]`).textContent = text;
  }

  addMessage(role, text, given) {
    const li = document.createElement("li");
    li.className = role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = given && given !== "user" ? `${given} (given)` : role === "user" ? "you" : this.select.value;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    li.append(who, body);
    this.log.append(li);
    return body;
  }

  // The pane's last request; before its first, the one the form would send it now
  snippetBody() {
    if (this.lastBody) return { ...this.lastBody, model: this.select.value };
    let params = {};
    try {
      params = sharedParams();
    } catch (_) { /* bad tools JSON: leave them out */ }
    const draft = $("user").value.trim() || "Hello";
    return requestBody({ select: this.select, messages: [{ role: "user", content: draft }], params });
  }

  get busy() {
    return this.controller !== null;
  }

  // `turns`: the new messages, one user message or a whole chat pasted as JSON
  async send(turns, params) {
    for (const turn of turns) {
      this.messages.push(turn);
      this.addMessage(turn.role === "user" ? "user" : "assistant", turn.content, turn.role);
    }
    this.params = params;
    await this.run();
  }

  async run() {
    this.error.textContent = "";
    this.status.textContent = "streaming…";
    for (const m of ["ttft", "tps", "prompt", "cached", "completion", "cost", "deployment"]) this.metric(m, "–");
    const out = this.addMessage("assistant", "");
    const li = out.parentElement;
    li.setAttribute("aria-busy", "true");
    this.controller = new AbortController();
    this.stopButton.disabled = false;
    this.rerunButton.disabled = true;
    const body = requestBody(this);
    this.lastBody = body;
    const started = performance.now();
    // the clock readings ride on the pane, so anyone (a test too) can see that panes overlapped
    this.el.dataset.started = String(started);
    delete this.el.dataset.finished;
    let first = null;
    let last = null;
    let chunks = 0;
    let usage = null;
    let deployment = null;
    let text = "";
    const tools = new Map();  // tool call index -> {name, arguments}
    const live = (ended) => {
      if (first !== null) this.metric("ttft", formatMs((first - started) / 1000));
      const tokens = usage ? usage.completion_tokens : chunks;
      if (first !== null && last - first >= MIN_DECODE_MS && tokens > 1) {
        // the decode rate: tokens after the first over the time they took
        this.metric("tps", ((tokens - 1) / ((last - first) / 1000)).toFixed(1));
      } else if (ended && tokens > 0) {
        // the answer came too fast to time its tokens apart (they share network reads): the whole request's rate
        this.metric("tps", (tokens / ((ended - started) / 1000)).toFixed(1));
      }
    };
    try {
      await streamChat(body, {
        signal: this.controller.signal,
        onOpen: (headers) => {
          deployment = headers.get("x-inferd-deployment");
          const notes = [];
          const fallback = headers.get("x-inferd-fallback-from");
          const degraded = headers.get("x-inferd-degraded-from");
          if (fallback) notes.push(`fell back from ${fallback}`);
          if (degraded) notes.push(`degraded from ${degraded}`);
          this.metric("deployment", (deployment || "?") + (notes.length ? ` (${notes.join(", ")})` : ""));
          li.querySelector(".who").textContent = headers.get("x-inferd-model-group") || this.select.value;
        },
        onChunk: (chunk) => {
          if (chunk.usage) usage = chunk.usage;
          const choice = (chunk.choices || [])[0];
          if (!choice || !choice.delta) return;
          const delta = choice.delta;
          const piece = (delta.content || "") + (delta.reasoning_content || "");
          for (const call of delta.tool_calls || []) {
            const t = tools.get(call.index) || { name: "", arguments: "" };
            if (call.function && call.function.name) t.name += call.function.name;
            if (call.function && call.function.arguments) t.arguments += call.function.arguments;
            tools.set(call.index, t);
          }
          if (piece || (delta.tool_calls && delta.tool_calls.length)) {
            const now = performance.now();
            if (first === null) first = now;
            last = now;
            chunks += 1;
            text += piece;
            const calls = [...tools.values()].map((t) => `→ ${t.name}(${t.arguments})`).join("\n");
            out.textContent = calls ? (text ? `${text}\n${calls}` : calls) : text;
            live();
          }
        },
      });
      this.status.textContent = "done";
    } catch (err) {
      if (err.name === "AbortError") {
        this.status.textContent = "stopped";
      } else {
        this.status.textContent = "failed";
        this.error.textContent = err instanceof ApiError ? err.message : String(err);
      }
    } finally {
      this.controller = null;
      this.el.dataset.finished = String(performance.now());
      this.stopButton.disabled = true;
      this.rerunButton.disabled = false;
      li.removeAttribute("aria-busy");
      live(performance.now());
      if (usage) {
        const cached = (usage.prompt_tokens_details || {}).cached_tokens || 0;
        this.metric("prompt", String(usage.prompt_tokens));
        this.metric("cached", String(cached));
        this.metric("completion", String(usage.completion_tokens));
        this.metric("cost", formatUsd(costOf(prices.get(deployment), usage)));
      }
      if (text || tools.size) {
        this.messages.push({ role: "assistant", content: text });
      } else if (!out.textContent) {
        li.remove();  // nothing came: keep the log to what was said
      }
      document.dispatchEvent(new CustomEvent("inferd:pane-done"));
    }
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  // The last user turn again, on whatever model the pane now has: the answer it replaces is dropped.
  async rerun() {
    if (this.busy) return;
    while (this.messages.length && this.messages[this.messages.length - 1].role !== "user") {
      this.messages.pop();
    }
    if (!this.messages.length) return;
    const items = [...this.log.children];
    const lastUser = items.map((li) => li.className).lastIndexOf("user");
    for (const li of items.slice(lastUser + 1)) li.remove();
    await this.run();
  }

  clear() {
    this.stop();
    this.messages = [];
    this.lastBody = null;
    this.log.replaceChildren();
    this.error.textContent = "";
    this.status.textContent = "";
  }
}

function addPane(model) {
  if (panes.length >= MAX_PANES) return;
  const pane = new Pane();
  const unused = models.find((m) => !panes.some((p) => p.select.value === m));
  pane.fillModels(model || unused || models[0]);
  panes.push(pane);
  $("panes").append(pane.el);
  updatePaneButtons();
}

function removePane(pane) {
  if (panes.length <= MIN_PANES) return;
  pane.stop();
  panes.splice(panes.indexOf(pane), 1);
  pane.el.remove();
  updatePaneButtons();
}

function updatePaneButtons() {
  $("add-pane").disabled = panes.length >= MAX_PANES;
  for (const p of panes) p.el.querySelector(".remove").disabled = panes.length <= MIN_PANES;
}

function shellQuote(s) {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

function asCurl(body) {
  const auth = getKey() ? ` \\\n  -H "Authorization: Bearer $INFERD_API_KEY"` : "";
  return `curl -N ${location.origin}/v1/chat/completions \\\n  -H 'Content-Type: application/json'${auth} \\\n`
    + `  -d ${shellQuote(JSON.stringify(body, null, 2))}`;
}

// A Python literal for a JSON value (JSON's string escapes are valid Python ones)
function pyValue(v, indent) {
  if (v === null || v === undefined) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  if (typeof v !== "object") return JSON.stringify(v);
  const inner = `${indent}    `;
  if (Array.isArray(v)) {
    return v.length ? `[\n${v.map((x) => inner + pyValue(x, inner)).join(",\n")},\n${indent}]` : "[]";
  }
  const items = Object.entries(v).map(([k, x]) => `${inner}${JSON.stringify(k)}: ${pyValue(x, inner)}`);
  return items.length ? `{\n${items.join(",\n")},\n${indent}}` : "{}";
}

function asPython(body) {
  const { model, messages, stream, stream_options: streamOptions, ...rest } = body;
  const extra = Object.entries(rest).map(([k, v]) => `    ${k}=${pyValue(v, "    ")},\n`).join("");
  return `import os\nfrom openai import OpenAI\n\n`
    + `client = OpenAI(base_url="${location.origin}/v1", api_key=os.environ.get("INFERD_API_KEY", "none"))\n`
    + `stream = client.chat.completions.create(\n    model=${JSON.stringify(model)},\n`
    + `    messages=${pyValue(messages, "    ")},\n${extra}`
    + `    stream=${stream ? "True" : "False"},\n`
    + `    stream_options={"include_usage": ${streamOptions ? "True" : "False"}},\n)\n`
    + `for chunk in stream:\n    if chunk.choices:\n        print(chunk.choices[0].delta.content or "", end="")\n`;
}

async function showCode(title, text) {
  $("code-title").textContent = `Request as ${title}`;
  $("code-text").textContent = text;
  $("code-copied").textContent = "";
  $("code-dialog").showModal();
  try {
    await navigator.clipboard.writeText(text);
    $("code-copied").textContent = "Copied to the clipboard.";
  } catch (_) {
    $("code-copied").textContent = "Select the text to copy it.";
  }
}

const CHAT_ROLES = ["system", "developer", "user", "assistant"];

// A whole chat pasted as JSON: [{"role": "user", "content": "..."}, ...], ending with the user's turn
function parseChat(text) {
  const chat = JSON.parse(text);
  if (!Array.isArray(chat) || !chat.length) throw new Error("give a JSON list of messages");
  for (const [i, m] of chat.entries()) {
    if (!m || !CHAT_ROLES.includes(m.role) || typeof m.content !== "string") {
      throw new Error(`message ${i + 1} needs a role (${CHAT_ROLES.join(", ")}) and a text content`);
    }
  }
  if (chat[chat.length - 1].role !== "user") throw new Error("the last message must be the user's");
  return chat.map((m) => ({ role: m.role, content: m.content }));
}

async function sendAll(event) {
  event.preventDefault();
  $("prompt-error").textContent = "";
  const text = $("user").value.trim();
  if (!text) return;
  let params;
  try {
    params = sharedParams();
  } catch (err) {
    $("prompt-error").textContent = `Tools: ${err.message}`;
    return;
  }
  let turns = [{ role: "user", content: text }];
  if ($("as-chat").checked) {
    try {
      turns = parseChat(text);
    } catch (err) {
      $("prompt-error").textContent = `Chat: ${err.message}`;
      return;
    }
  }
  const idle = panes.filter((p) => !p.busy);
  $("user").value = "";
  await Promise.all(idle.map((p) => p.send(turns, params)));
}

export async function loadModels() {
  try {
    const [list, deployments] = await Promise.all([getJson("/v1/models"), getJson("/v1/deployments")]);
    const chat = new Set(deployments.data.filter((d) => d.endpoints.includes("chat")).map((d) => d.model));
    models = list.data.map((m) => m.id).filter((id) => chat.has(id));
    prices = new Map(deployments.data.map((d) => [d.id, d.price]));
    $("prompt-error").textContent = models.length ? "" : "This server serves no chat model.";
  } catch (err) {
    $("prompt-error").textContent = `Models: ${err.message}`;
    return;
  }
  while (panes.length < MIN_PANES) addPane();
  for (const p of panes) p.fillModels();
}

export function initPlayground() {
  $("prompt-form").addEventListener("submit", sendAll);
  $("user").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("prompt-form").requestSubmit();
  });
  $("stop-all").addEventListener("click", () => panes.forEach((p) => p.stop()));
  $("add-pane").addEventListener("click", () => addPane());
  $("clear-all").addEventListener("click", () => panes.forEach((p) => p.clear()));
}
