// How the pages talk to the server: the tab's key, JSON calls, streamed chat completions.
//
// The key lives in sessionStorage: it survives a reload of this tab and goes away with it.
// Every error the API gives (OpenAI's {"error": {...}} body) becomes an ApiError with its
// message and status, so the pane or table that asked can show it.

const KEY_ITEM = "inferd-api-key";

export function getKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
  document.dispatchEvent(new CustomEvent("inferd:key"));
}

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || null;
  }
}

export function authHeaders() {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorOf(res) {
  let message = `${res.status} ${res.statusText}`;
  let code = null;
  try {
    const body = await res.json();
    if (body && body.error) {
      message = `${res.status}: ${body.error.message || message}`;
      code = body.error.code;
    }
  } catch (_) { /* not JSON: keep the status line */ }
  const err = new ApiError(res.status, message, code);
  if (res.status === 401) document.dispatchEvent(new CustomEvent("inferd:need-key", { detail: err.message }));
  return err;
}

export async function getJson(path, params) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  const res = await fetch(url, { headers: authHeaders() });
  if (!res.ok) throw await errorOf(res);
  return res.json();
}

// POST a streamed chat completion; `onChunk(obj)` gets each parsed SSE event, `onOpen(headers)` the
// response headers (which deployment answered). Resolves at [DONE]; rejects with an ApiError for an
// HTTP error or an error event, with the fetch's AbortError when `signal` stops it.
export async function streamChat(body, { signal, onOpen, onChunk }) {
  const res = await fetch("/v1/chat/completions", {
    method: "POST", signal,
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify(body),
  });
  if (!res.ok) throw await errorOf(res);
  onOpen(res.headers);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new ApiError(obj.error.status || 500, obj.error.message || "stream error", obj.error.code);
        onChunk(obj);
      }
    }
  }
  // a stream that ends without [DONE] was cut: say so rather than show a partial answer as whole
  throw new ApiError(502, "the stream ended before it was complete");
}

// Cost of one answer by the price book's prices for the deployment that gave it (USD per million tokens).
export function costOf(price, usage) {
  if (!price || !usage) return null;
  const prompt = usage.prompt_tokens || 0;
  const cached = Math.min((usage.prompt_tokens_details || {}).cached_tokens || 0, prompt);
  return ((prompt - cached) * price.input + cached * price.cached_input
          + (usage.completion_tokens || 0) * price.output) / 1e6;
}

export function formatUsd(value) {
  if (value === null || value === undefined) return "–";
  if (value === 0) return "$0";
  return value < 0.01 ? `$${value.toPrecision(3)}` : `$${value.toFixed(4)}`;
}

export function formatMs(seconds) {
  return seconds === null || seconds === undefined ? "–" : `${(seconds * 1000).toFixed(0)} ms`;
}
